"""EinsumDense curvature block: factors, one step, capture, training, matching.

References are independent of the block's equation parsing: the pre-activations are
recomputed with ``tf.einsum`` inside a ``tf.GradientTape`` on the *summed* per-example
loss (so ``dL/ds`` is each example's own gradient ``g``), and each layer's rows ``a`` and
``g`` are laid out by hand in numpy. Conventions (``docs/math.md``): ``A = E_n[sum_t a a^T]``
(bias as a trailing 1), ``G = E_n[mean_t g g^T]``, kernel matrix ``[contracted, produced]``
in kernel axis order, gradient matrix ``M = [dKernel; dBias]``.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.einsum_dense import EinsumDenseBlock
from keras_hoopt.capture import ForwardRecord

BATCH, STEPS, FEATURES, CLASSES = 16, 3, 4, 3
DAMPING = 0.05  # large enough that the damping terms matter in the step


def _ones(rows):
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


# Per layer: equation, output_shape, bias_axes, activation, and by hand (numpy):
#   rows(x, g) -> (a rows with the bias column where folded, g rows, locations per example)
#   matrix(kernel, bias) -> [d_in (+1), d_out] in the same layout
B, T, F = BATCH, STEPS, FEATURES
LAYERS = {
    # MultiHeadAttention's query/key/value projection: [B, T, F] -> [B, T, heads=2, dim=5].
    "proj": dict(
        equation="abc,cde->abde", output_shape=(T, 2, 5), bias_axes="de", activation="tanh",
        rows=lambda x, g: (_ones(x.reshape(B * T, F)), g.reshape(B * T, 10), T),
        matrix=lambda k, b: np.concatenate([k.reshape(F, 10), b.reshape(1, 10)]),
    ),
    # Its output projection, a 4-D input: [B, T, 2, 5] -> [B, T, 4].
    "out4d": dict(
        equation="abcd,cde->abe", output_shape=(T, 4), bias_axes="e", activation=None,
        rows=lambda x, g: (_ones(x.reshape(B * T, 10)), g.reshape(B * T, 4), T),
        matrix=lambda k, b: np.concatenate([k.reshape(10, 4), b.reshape(1, 4)]),
    ),
    # Ellipsis with bias.
    "ellipsis": dict(
        equation="...b,bc->...c", output_shape=6, bias_axes="c", activation="tanh",
        rows=lambda x, g: (_ones(x.reshape(B * T, F)), g.reshape(B * T, 6), T),
        matrix=lambda k, b: np.concatenate([k, b[None]]),
    ),
    # Kernel produced axes (h, k) in the other order than the output's (k, h); bias over (k, h).
    "permuted": dict(
        equation="bsd,dhk->bskh", output_shape=(T, 2, 3), bias_axes="kh", activation=None,
        rows=lambda x, g: (_ones(x.reshape(B * T, F)), g.transpose(0, 1, 3, 2).reshape(B * T, 6), T),
        matrix=lambda k, b: np.concatenate([k.reshape(F, 6), b.T.reshape(1, 6)]),
    ),
    # Bias over one of the two produced axes: not folded, the kernel alone is preconditioned.
    "partial_bias": dict(
        equation="abc,cde->abde", output_shape=(T, 2, 2), bias_axes="e", activation=None,
        rows=lambda x, g: (x.reshape(B * T, F), g.reshape(B * T, 4), T),
        matrix=lambda k, b: k.reshape(F, 4),
    ),
    # Trailing ellipsis: contracts axis 1, the ellipsis axis is a location; bias shape (5, 1).
    "right_ellipsis": dict(
        equation="ab...,bc->ac...", output_shape=5, bias_axes="c", activation="tanh",
        rows=lambda x, g: (_ones(x.transpose(0, 2, 1).reshape(B * F, T)), g.transpose(0, 2, 1).reshape(B * F, 5), F),
        matrix=lambda k, b: np.concatenate([k, b.reshape(1, 5)]),
    ),
    # An input axis in neither kernel nor output: summed by the einsum (one location).
    "summed": dict(
        equation="abc,cd->ad", output_shape=3, bias_axes="d", activation="tanh",
        rows=lambda x, g: (_ones(x.sum(axis=1)), g, 1),
        matrix=lambda k, b: np.concatenate([k, b[None]]),
    ),
}
HEAD = dict(equation="ab,bc->ac", output_shape=CLASSES, bias_axes="c", activation=None)


def _layer(name, spec):
    return keras.layers.EinsumDense(
        spec["equation"], spec["output_shape"], bias_axes=spec["bias_axes"], activation=spec["activation"], name=name
    )


def _model():
    """One model covering every equation (one traced step): branches on the input, a linear head."""
    x = keras.Input((STEPS, FEATURES))
    layers = {name: _layer(name, spec) for name, spec in LAYERS.items()}
    outputs = {}
    for name in LAYERS:
        outputs[name] = layers[name](outputs["proj"] if name == "out4d" else x)
    features = keras.layers.Concatenate()([keras.layers.Flatten()(outputs[n]) for n in LAYERS])
    head = _layer("head", HEAD)
    return keras.Model(x, head(features)), layers, head


def _pre_activation(layer, h):
    s = tf.einsum(layer.equation, h, layer.kernel)
    return s + layer.bias if layer.bias is not None else s


def _reference(layers, head, x, y):
    """Layer inputs, per-example output gradients ``g`` (summed loss) and mean-loss gradients."""
    with tf.GradientTape(persistent=True) as tape:
        ins, pre, post = {}, {}, {}
        for name, layer in layers.items():
            ins[name] = post["proj"] if name == "out4d" else tf.constant(x)
            pre[name] = _pre_activation(layer, ins[name])
            tape.watch(pre[name])
            post[name] = layer.activation(pre[name])
        features = tf.concat([tf.reshape(post[n], (BATCH, -1)) for n in LAYERS], axis=1)
        ins["head"], pre["head"] = features, _pre_activation(head, features)
        tape.watch(pre["head"])
        per_example = keras.losses.sparse_categorical_crossentropy(tf.constant(y), pre["head"], from_logits=True)
        total, mean = tf.reduce_sum(per_example), tf.reduce_mean(per_example)
    g = tape.gradient(total, pre)
    params = {n: l.trainable_variables for n, l in {**layers, "head": head}.items()}
    grads = tape.gradient(mean, params)
    f64 = lambda t: np.asarray(t, np.float64)  # noqa: E731
    return ({n: f64(v) for n, v in ins.items()}, {n: f64(v) for n, v in g.items()},
            {n: [f64(v) for v in vs] for n, vs in grads.items()})


def _kron_step(a_factor, g_factor, m, damping):
    """``-(kron(A + pi sqrt(l) I, G + sqrt(l)/pi I))^-1 vec(M)`` in the ``(d_in, d_out)`` layout."""
    d_in, d_out = m.shape
    pi = np.sqrt((np.trace(a_factor) / d_in) / (np.trace(g_factor) / d_out))
    root = np.sqrt(damping)
    big = np.kron(a_factor + pi * root * np.eye(d_in), g_factor + root / pi * np.eye(d_out))
    return -np.linalg.solve(big, m.reshape(-1)).reshape(d_in, d_out)


def _assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


@pytest.fixture(scope="module")
def one_kfac_step():
    """One eager K-FAC step (lr 1, momentum 0, no decay, no KL clip) with its numpy reference."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    model, layers, head = _model()
    optimizer = keras_hoopt.KFAC(
        learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=DAMPING, inverse_update_interval=1,
        step_size="fixed", fisher="empirical",
        fallback="momentum",  # what no block covers moves by -lr * grad
    )
    # The bias of `partial_bias` is the one variable no block covers.
    with pytest.warns(UserWarning, match="no curvature block for partial_bias"):
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False, run_eagerly=True)  # eager: the code under test is the same, no trace
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=BATCH).astype("int32")
    ins, g, grads = _reference(layers, head, x, y)
    before = {n: [v.numpy().astype(np.float64) for v in l.trainable_variables] for n, l in {**layers, "head": head}.items()}
    model.train_on_batch(x, y)
    after = {n: [v.numpy().astype(np.float64) for v in l.trainable_variables] for n, l in {**layers, "head": head}.items()}
    specs = dict(LAYERS, head=dict(
        HEAD, rows=lambda x, g: (_ones(x), g, 1), matrix=lambda k, b: np.concatenate([k, b[None]]),
    ))
    results = {}
    for name, spec in specs.items():
        a, g_rows, locations = spec["rows"](ins[name], g[name])
        results[name] = dict(
            a=a, g=g_rows, locations=locations, grads=grads[name], before=before[name], after=after[name],
            matrix=spec["matrix"], statistics={s: optimizer.statistic(name, s) for s in ("A", "G")},
        )
    summary = {row["layer"]: row for row in optimizer.curvature_summary()}
    keras.backend.clear_session()
    return results, summary


def test_factors_match_numpy_per_example_rows(one_kfac_step):
    results, summary = one_kfac_step
    for name, r in results.items():
        assert summary[name]["kind"] == "einsum_dense", name
        a, g = r["a"], r["g"]
        assert g.shape[0] == BATCH * r["locations"] and a.shape[0] == g.shape[0], name
        # The reference layout is the kernel's: a^T g / B is the mean loss's kernel (+ bias) gradient.
        bias = r["grads"][1] if len(r["grads"]) == 2 else None
        _assert_close(a.T @ g / BATCH, r["matrix"](r["grads"][0], bias), 1e-5, f"{name} gradient layout")
        np.testing.assert_allclose(r["statistics"]["A"], a.T @ a / BATCH, rtol=1e-4, atol=1e-6, err_msg=name)
        _assert_close(r["statistics"]["G"], g.T @ g / g.shape[0], 1e-4, f"{name} G")
    assert results["partial_bias"]["statistics"]["A"].shape == (FEATURES, FEATURES)  # no bias row
    assert results["out4d"]["statistics"]["A"].shape == (11, 11)  # 2 * 5 contracted + bias
    assert results["permuted"]["statistics"]["G"].shape == (6, 6)


def test_one_kfac_step_equals_dense_kronecker_solve(one_kfac_step):
    results, _ = one_kfac_step
    for name, r in results.items():
        a, g = r["a"], r["g"]
        a_factor, g_factor = a.T @ a / BATCH, g.T @ g / g.shape[0]
        expected = _kron_step(a_factor, g_factor, a.T @ g / BATCH, DAMPING)
        moved = [after - before for after, before in zip(r["after"], r["before"])]
        bias_moved = moved[1] if len(moved) == 2 else None
        _assert_close(r["matrix"](moved[0], bias_moved), expected, 1e-4, name)
    # The bias the block does not cover took the first-order step -lr * grad.
    r = results["partial_bias"]
    np.testing.assert_allclose(r["after"][1] - r["before"][1], -r["grads"][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_capture_call_equals_layer_call(policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(3)
    cases = [("abcd,cde->abe", (2, 3), "e", "relu", (4, 2, 3, 5)),
             ("...b,bc->...c", 6, "c", "tanh", (4, 3, 2, 5)),
             ("bsd,dhk->bskh", (3, 2, 4), "kh", None, (4, 3, 5)),
             ("ab...,bc->ac...", 3, None, "gelu", (4, 2, 5))]
    for equation, output_shape, bias_axes, activation, shape in cases:
        layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation=activation)
        layer.build(shape)
        if bias_axes:
            layer.bias.assign(rng.normal(size=layer.bias.shape))
        x = tf.constant(rng.normal(size=shape).astype("float32"))
        expected = layer(x)
        record = ForwardRecord()
        original = layer.call

        def captured(inputs, training=None, layer=layer, original=original):
            return EinsumDenseBlock.capture_call(layer, original, record.new_call(layer), inputs, training=training)

        object.__setattr__(layer, "call", captured)
        actual = layer(x)
        assert actual.dtype == expected.dtype == layer.compute_dtype, equation
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=equation)
        (call,) = record.calls[id(layer)]
        assert call.inputs is not None and call.inputs.shape == x.shape
        kernel = layer.kernel.numpy().astype(np.float64)
        pre = np.einsum(equation, x.numpy().astype(np.float64), kernel)
        if policy != "float32":
            # TensorFlow 2.21's float16 einsum with an ellipsis is wrong on CPUs with AVX512-FP16/AMX
            # (relative error 1.4 for "...b,bc->...c"; the same product as a matmul is right), and the
            # layer computes with it: where that kernel disagrees with numpy, the reference is the
            # layer's own float16 einsum, so the test still checks which tensor the capture records.
            own = tf.einsum(equation, tf.cast(x, layer.compute_dtype), tf.cast(layer.kernel, layer.compute_dtype))
            own = np.asarray(own, np.float64)
            if np.linalg.norm(own - pre) > 2e-2 * np.linalg.norm(pre):
                pre = own
        if bias_axes:
            pre = pre + layer.bias.numpy()
        tol = 1e-5 if policy == "float32" else 2e-2
        _assert_close(call.output.numpy(), pre, tol, f"{equation} pre-activation")


def _attention_model(attention):
    x = keras.Input((5, 8))
    h = keras.layers.GlobalAveragePooling1D()(attention(x, x))
    return keras.Model(x, keras.layers.Dense(3, dtype="float32", name="logits")(h))


def _classification_data(rng):
    x = rng.normal(size=(64, 5, 8)).astype("float32")
    y = (x.reshape(64, -1) @ rng.normal(size=(40, 3))).argmax(-1).astype("int32")
    return x, y


def _compile_spngd(model, **kwargs):
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)
    return optimizer


def test_group_query_attention_projections_are_captured():
    model = _attention_model(
        keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2, name="gqa")
    )
    optimizer = _compile_spngd(model, run_eagerly=True)  # one eager step: capture, not speed, is tested
    x, y = _classification_data(np.random.default_rng(1))
    model.train_on_batch(x[:16], y[:16])
    rows = {r["layer"]: r for r in optimizer.curvature_summary()}
    for n in ["query", "key", "value", "attention_output"]:
        assert rows[n]["kind"] == "einsum_dense" and rows[n]["refreshes"] == 1 and rows[n]["inversions"] > 0, n
    # query "bqm,muh->bquh": 8 + bias -> 4 query heads x 4; key "bkm,mvh->bkvh": -> 2 x 4;
    # output "bquh,uhm->bqm": 4 x 4 + bias -> 8.
    assert rows["query"]["factor_shapes"] == {"A": (9, 9), "G": (16, 16)}
    assert rows["key"]["factor_shapes"] == {"A": (9, 9), "G": (8, 8)}
    assert rows["attention_output"]["factor_shapes"] == {"A": (17, 17), "G": (8, 8)}


def test_matches_accepts_subclasses_and_rejects_unsupported():
    class KeepsCall(keras.layers.EinsumDense):
        pass

    class OverridesCall(keras.layers.EinsumDense):
        def call(self, inputs, training=None):
            return super().call(inputs, training=training) * 2.0

    def built(cls, equation, output_shape, input_shape, **kwargs):
        layer = cls(equation, output_shape, **kwargs)
        layer.build(input_shape)
        return layer

    dense = built(keras.layers.EinsumDense, "abc,cde->abde", (3, 2, 4), (None, 3, 5), bias_axes="de")
    assert block_type_for(dense) is EinsumDenseBlock
    assert block_type_for(built(KeepsCall, "...b,bc->...c", 4, (None, 3, 5))) is EinsumDenseBlock
    assert block_type_for(built(OverridesCall, "ab,bc->ac", 4, (None, 5))) is None
    # Unbuilt layers (a subclassed model at compile time) are judged from their config.
    assert EinsumDenseBlock.matches(keras.layers.EinsumDense("abcd,cde->abe", (3, 4), bias_axes="e"))

    lora = built(keras.layers.EinsumDense, "ab,bc->ac", 4, (None, 5), lora_rank=2)
    assert lora.lora_enabled and not EinsumDenseBlock.matches(lora)
    assert not EinsumDenseBlock.matches(keras.layers.EinsumDense("ab,bc->ac", 4, lora_rank=2))  # not yet built
    later = built(keras.layers.EinsumDense, "ab,bc->ac", 4, (None, 5))
    later.enable_lora(2)
    assert not EinsumDenseBlock.matches(later)
    quantized = built(keras.layers.EinsumDense, "ab,bc->ac", 4, (None, 5))
    quantized.quantize("int8")
    assert not EinsumDenseBlock.matches(quantized)

    # A kernel axis in the input and the output (one matrix per slice): not handled.
    assert not EinsumDenseBlock.matches(built(keras.layers.EinsumDense, "abc,bcd->abd", (3, 4), (None, 3, 5)))
    # A contracted first axis leaves no example axis; a repeated axis is a diagonal.
    assert not EinsumDenseBlock.matches(keras.layers.EinsumDense("ab,ac->cb", (4, 5)))
    assert not EinsumDenseBlock.matches(keras.layers.EinsumDense("abb,bc->ac", 4))

    # A bias over part of the produced axes is left to the first-order update.
    partial = built(keras.layers.EinsumDense, "abc,cde->abde", (3, 2, 4), (None, 3, 5), bias_axes="e")
    assert [v.path for v in EinsumDenseBlock(partial).variables] == [partial.kernel.path]
    location_bias = built(keras.layers.EinsumDense, "abc,cd->abd", (3, 4), (None, 3, 5), bias_axes="b")
    assert len(EinsumDenseBlock(location_bias).variables) == 1
    assert len(EinsumDenseBlock(dense).variables) == 2 and EinsumDenseBlock(dense).input_dim == 6

"""Unit-wise Fisher blocks of LayerNormalization, RMSNormalization and GroupNormalization.

References are independent of the blocks' own ``xhat``: per-example gradients of every
gamma/beta are ``tf.GradientTape`` gradients of each example's own loss (the model in training
mode, same weights; these layers' statistics are per example), flattened row-major like the
variables. From them, in numpy:
``F_c = E_n[v_{n,c} v_{n,c}^T]`` with ``v_{n,c} = (dl_n/dgamma_c, dl_n/dbeta_c)`` and one
step ``-(F_c + lambda I)^-1 E_n[v_{n,c}]`` per unit.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.blocks.group_norm import GroupNormBlock
from keras_hoopt.blocks.layer_norm import LayerNormBlock
from keras_hoopt.blocks.registry import block_type_for
from keras_hoopt.blocks.rms_norm import RMSNormBlock
from keras_hoopt.capture import ForwardRecord, LayerCall

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SHAPE = (3, 2, 6)  # per-example input of every normalisation layer: (H, W, C)

# name -> (layer factory, expected k); every config of every layer type, one branch each.
CONFIGS = {
    "ln": (lambda n: keras.layers.LayerNormalization(name=n), 2),
    "ln_axes": (lambda n: keras.layers.LayerNormalization(axis=[-1, 1], name=n), 2),  # variable (6, 3)
    "ln_scale_only": (lambda n: keras.layers.LayerNormalization(axis=[2, 3], center=False, name=n), 1),
    "ln_center_only": (lambda n: keras.layers.LayerNormalization(scale=False, name=n), 1),
    "ln_rms": (lambda n: keras.layers.LayerNormalization(rms_scaling=True, name=n), 1),
    "ln_rms_no_scale": (lambda n: keras.layers.LayerNormalization(rms_scaling=True, scale=False, name=n), 1),
    "rms": (lambda n: keras.layers.RMSNormalization(name=n), 1),
    "rms_axes": (lambda n: keras.layers.RMSNormalization(axis=[2, 3], name=n), 1),
    "gn": (lambda n: keras.layers.GroupNormalization(groups=3, name=n), 2),
    "gn_scale_only": (lambda n: keras.layers.GroupNormalization(groups=2, center=False, name=n), 1),
    "gn_instance_center_only": (lambda n: keras.layers.GroupNormalization(groups=-1, scale=False, name=n), 1),
    "gn_axis1": (lambda n: keras.layers.GroupNormalization(groups=3, axis=1, name=n), 2),
    "ln_called_twice": (lambda n: keras.layers.LayerNormalization(name=n), 2),  # shared: calls' gradients add
}
BLOCK_TYPES = {"ln": LayerNormBlock, "rm": RMSNormBlock, "gn": GroupNormBlock}


def _make(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling=True is deprecated in Keras
        return CONFIGS[name][0](name)


def _randomize(layers, rng):
    """Gamma around 1, beta around 0, so that every term of F matters."""
    for layer in layers:
        for v in layer.trainable_variables:
            value = rng.uniform(0.5, 1.5, v.shape) if "beta" not in v.path else rng.normal(0, 0.3, v.shape)
            v.assign(value.astype("float32"))


def _branches_model(names):
    """Dense trunk -> one branch per config (norm, tanh, flatten) -> concat -> Dense logits.

    A ``*_called_twice`` layer is applied twice on its branch (norm, Dense, same norm).
    """
    inputs = keras.Input((3, 2, 4))
    trunk = keras.layers.Dense(SHAPE[-1], activation="tanh", name="trunk")(inputs)
    norms = [_make(n) for n in names]
    flat = []
    for norm in norms:
        h = norm(trunk)
        if norm.name.endswith("_called_twice"):
            h = norm(keras.layers.Dense(SHAPE[-1], name=f"{norm.name}_between")(h))
        flat.append(keras.layers.Flatten()(keras.layers.Activation("tanh")(h)))
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Concatenate()(flat))
    return keras.Model(inputs, outputs), norms


def _per_example_unit_gradients(model, norms, x, y):
    """``{name: [B, units, k]}`` per-example (dgamma, dbeta): the gradient of each example's loss."""
    variables = [v for norm in norms for v in norm.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        logits = tf.cast(model(tf.constant(x), training=True), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(tf.constant(y), logits, from_logits=True)
        per_loss = [losses[n] for n in range(len(x))]
    # rows[n][j]: dl_n / d variables[j]
    rows = [[g.numpy().reshape(-1) for g in tape.gradient(loss, variables)] for loss in per_loss]
    out, j = {}, 0
    for norm in norms:
        k = len(norm.trainable_variables)
        out[norm.name] = np.array([[r[j + i] for i in range(k)] for r in rows], np.float64).transpose(0, 2, 1)
        j += k
    return out


def _assert_close(actual, expected, rtol, what=""):
    """Relative Frobenius-norm closeness."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


def _data(rng, batch):
    x = rng.normal(size=(batch, 3, 2, 4)).astype("float32")
    y = rng.integers(0, 3, size=batch).astype("int32")
    return x, y


# ---------------------------------------------------------------------------------------
# 1. F and one K-FAC step against numpy, every layer and config in one step


def test_unitwise_fisher_and_step_match_per_example_gradients():
    rng = np.random.default_rng(0)
    batch, damping = 8, 0.05
    model, norms = _branches_model(list(CONFIGS))
    _randomize(norms, rng)
    optimizer = keras_hoopt.KFAC(
        learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=damping, inverse_update_interval=1,
        step_size="fixed", fisher="empirical",
    )
    # Eager step: tracing these 15 blocks costs ~20 s here; the traced (tf.cond) path is checked
    # numerically by the mixed-precision test below and end to end by the fit tests.
    model.compile(optimizer=optimizer, loss=LOSS, run_eagerly=True)
    x, y = _data(rng, batch)
    per_example = _per_example_unit_gradients(model, norms, x, y)
    before = {n.name: [v.numpy().astype(np.float64) for v in n.trainable_variables] for n in norms}
    model.train_on_batch(x, y)

    kinds = {row["layer"]: row["kind"] for row in optimizer.curvature_summary()}
    for norm in norms:
        name, k = norm.name, CONFIGS[norm.name][1]
        assert kinds[name] == BLOCK_TYPES[name[:2]].kind, name
        v = per_example[name]  # [B, units, k]
        assert v.shape[-1] == k, name
        expected_f = np.einsum("nci,ncj->cij", v, v) / batch
        f = optimizer.statistic(name, "F")
        assert f.shape == expected_f.shape, name
        _assert_close(f, expected_f, 1e-4, f"{name} F")
        # One step: delta(gamma, beta)_c = -(F_c + lambda I)^-1 E_n[v_{n,c}].
        grad = v.mean(axis=0)
        step = -np.linalg.solve(expected_f + damping * np.eye(k), grad[..., None])[..., 0]
        after = [w.numpy().astype(np.float64) for w in norm.trainable_variables]
        moved = np.stack([(a - b).reshape(-1) for a, b in zip(after, before[name])], axis=-1)
        _assert_close(moved, step, 1e-3, f"{name} step")
        # Not the plain gradient: the preconditioner changed the direction.
        assert np.linalg.norm(moved + grad) > 1e-2 * np.linalg.norm(grad), name


# ---------------------------------------------------------------------------------------
# 2. capture_call reproduces the layer, and its tap is the layer output


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_capture_call_equals_the_layer_call(policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(4,) + SHAPE).astype("float32"))
    if policy == "mixed_float16":
        x = tf.cast(x, tf.float16)  # what a preceding mixed-precision layer hands on
    for name in CONFIGS:
        layer = _make(name)
        layer.build(x.shape)
        _randomize([layer], rng)
        expected = layer(x)
        record = LayerCall(ForwardRecord())
        original = type(layer).call.__get__(layer)
        block_type = block_type_for(layer)
        # Installed as keras_hoopt.capture does: on the instance, run by Layer.__call__
        # (its input conversion and autocast scope included).
        object.__setattr__(layer, "call", lambda *a, **k: block_type.capture_call(layer, original, record, *a, **k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = layer(x)
        assert actual.dtype == expected.dtype == tf.as_dtype(layer.compute_dtype), name
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=name)
        np.testing.assert_array_equal(record.output.numpy(), expected.numpy(), err_msg=name)
        np.testing.assert_array_equal(tf.cast(record.inputs, x.dtype).numpy(), x.numpy(), err_msg=name)


# ---------------------------------------------------------------------------------------
# 3. matches / layer_variables


def test_matches_accepts_subclasses_and_rejects_what_it_cannot_handle():
    class MyLayerNorm(keras.layers.LayerNormalization):
        pass

    class MyRMSNorm(keras.layers.RMSNormalization):
        pass

    class MyGroupNorm(keras.layers.GroupNormalization):
        pass

    class OwnCall(keras.layers.LayerNormalization):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    class OwnGroupCall(keras.layers.GroupNormalization):
        def call(self, inputs):
            return keras.ops.relu(super().call(inputs))

    assert block_type_for(MyLayerNorm()) is LayerNormBlock
    assert block_type_for(MyRMSNorm()) is RMSNormBlock
    assert block_type_for(MyGroupNorm(groups=2)) is GroupNormBlock
    assert block_type_for(OwnCall()) is None
    assert block_type_for(OwnGroupCall(groups=2)) is None
    assert block_type_for(keras.layers.LayerNormalization(center=False, scale=False)) is None
    assert block_type_for(keras.layers.GroupNormalization(groups=2, center=False, scale=False)) is None
    assert block_type_for(keras.layers.GroupNormalization(groups=2, axis=[-1])) is None  # not a Keras config
    assert block_type_for(keras.layers.UnitNormalization()) is None  # no parameters

    # Variables in (gamma, beta) order; rms_scaling keeps gamma only, even with scale=False.
    for name, shapes in [
        ("ln_axes", [(6, 3), (6, 3)]),
        ("ln_center_only", [(6,)]),
        ("ln_rms_no_scale", [(6,)]),
        ("rms_axes", [(2, 6)]),
        ("gn_scale_only", [(6,)]),
        ("gn_axis1", [(3,), (3,)]),
    ]:
        layer = _make(name)
        layer.build((None,) + SHAPE)
        block = block_type_for(layer)(layer)
        assert [tuple(v.shape) for v in block.variables] == shapes, name
        assert [v.path for v in block.variables] == [v.path for v in layer.trainable_variables], name
        assert block.statistic_shapes() == {"F": (int(np.prod(shapes[0])), len(shapes), len(shapes))}, name


# ---------------------------------------------------------------------------------------
# 4. Training: SP-NGD in model.fit, graph / XLA / mixed precision


def _token_model(seed=0):
    """A tiny token model: each normalisation layer type once, then pooled logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 8))
    h = keras.layers.LayerNormalization(name="ln")(inputs)
    h = keras.layers.RMSNormalization(name="rms")(h)
    h = keras.layers.GroupNormalization(groups=4, name="gn")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _sequences(n=128, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.0, size=(3, 6, 8))
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(size=(n, 6, 8))
    return x.astype("float32"), y.astype("int32")


@pytest.mark.parametrize("jit_compile", [False])  # XLA: tests/test_architectures.py (transformers)
def test_spngd_fit_trains_every_normalization_layer(jit_compile):
    model = _token_model()
    optimizer = keras_hoopt.SPNGD()  # the defaults: the quadratic model's step
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    x, y = _sequences()
    before = {n: [v.numpy().copy() for v in model.get_layer(n).trainable_variables] for n in ("ln", "rms", "gn")}
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    summary = {row["layer"]: row for row in optimizer.curvature_summary()}
    for name, kind in [("ln", "layernorm"), ("rms", "rmsnorm"), ("gn", "groupnorm")]:
        row = summary[name]
        assert row["kind"] == kind
        assert row["refreshes"] >= 1 and row["inversions"] >= 1, row
        assert row["nonfinite_skips"] == 0 and row["failed_inversions"] == 0, row
        f = optimizer.statistic(name, "F")
        assert np.all(np.isfinite(f)) and not np.allclose(f, np.eye(f.shape[-1])), name  # refreshed, not the init
        moved = [v.numpy() - b for v, b in zip(model.get_layer(name).trainable_variables, before[name])]
        assert all(np.abs(m).max() > 0 for m in moved), name


def test_mixed_float16_fisher_matches_reference_and_spngd_trains():
    """Under mixed_float16 the loss-scaled float16 output gradients give the same F (traced step)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(2)
    names = ["ln", "ln_rms", "rms", "gn"]
    model, norms = _branches_model(names)
    _randomize(norms, rng)
    # factor_decay=0 and a first step: F is this batch's, at the weights before the step.
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, momentum=0.0, factor_decay=0.0, damping=0.05, kl_clip=1e-2,
                                  fisher="empirical")
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # float16 gradients are loss-scaled
    x, y = _data(rng, 8)
    per_example = _per_example_unit_gradients(model, norms, x, y)
    model.train_on_batch(x, y)
    for norm in norms:
        v = per_example[norm.name]
        _assert_close(optimizer.statistic(norm.name, "F"), np.einsum("nci,ncj->cij", v, v) / 8, 2e-2, norm.name)
    # Same train function: a few more steps on the batch lower its loss.
    losses = model.fit(x, y, batch_size=8, epochs=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert all(row["nonfinite_skips"] == 0 for row in optimizer.curvature_summary())

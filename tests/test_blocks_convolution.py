"""Conv1D / Conv3D / Conv{1,2,3}DTranspose curvature blocks (KFC): rows, factors, step, capture, training.

References are independent of the blocks' patch extraction: per-example kernel gradients come
from ``tf.GradientTape`` (one example at a time, through TensorFlow's own convolution
gradients), im2col patches from explicit numpy loops with explicit zero padding (TensorFlow's
``"same"`` rule written out), and the preconditioned step from ``np.kron`` / ``np.linalg.solve``.
Conventions (``docs/math.md``): ``A = E_n[sum_t a a^T]`` (bias as a trailing 1),
``G = E_n[mean_t g g^T]``.

* Direct convolutions: ``a_t`` = input patch at output location ``t``, ``g_t`` = output
  gradient there; gradient matrix ``[kernel.reshape(-1, C_out); bias]``.
* Transposed convolutions: over *input* locations ``t``: ``a_t = x_t`` (``C_in``), ``g_t`` =
  output-gradient patch that ``x_t`` feeds (``prod(k) C_out``); gradient matrix
  ``kernel.reshape(-1, C_in)^T``; the bias takes the first-order update.

TensorFlow on CPU runs neither ``channels_first`` convolutions nor dilated transposed ones
outside XLA, so those configurations are checked under ``jit_compile``.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.conv1d import Conv1DBlock
from keras_hoopt.blocks.conv2d import Conv2DBlock
from keras_hoopt.blocks.conv3d import Conv3DBlock
from keras_hoopt.blocks.conv_transpose import Conv1DTransposeBlock, Conv2DTransposeBlock, Conv3DTransposeBlock
from keras_hoopt.capture import ForwardRecord

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CLASSES = 3
TRANSPOSES = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)

# (layer class, kwargs): every option the blocks claim, run eagerly on CPU.
CONFIGS = [
    (L.Conv1D, dict(kernel_size=3)),
    (L.Conv1D, dict(kernel_size=3, strides=2, padding="same")),
    (L.Conv1D, dict(kernel_size=2, padding="causal", dilation_rate=2, use_bias=False)),
    (L.Conv1D, dict(kernel_size=3, padding="same", dilation_rate=2)),
    (L.Conv1D, dict(kernel_size=4, strides=3, padding="causal")),
    (L.Conv3D, dict(kernel_size=2)),
    (L.Conv3D, dict(kernel_size=(2, 3, 2), strides=(2, 1, 2), padding="same", use_bias=False)),
    (L.Conv3D, dict(kernel_size=2, padding="same", dilation_rate=(2, 1, 2))),
    (L.Conv1DTranspose, dict(kernel_size=3, strides=2)),
    (L.Conv1DTranspose, dict(kernel_size=3, strides=2, padding="same", output_padding=1)),
    (L.Conv1DTranspose, dict(kernel_size=2, strides=3)),  # stride > kernel: outputs no tap reaches
    (L.Conv1DTranspose, dict(kernel_size=4, strides=2, padding="same", use_bias=False)),
    (L.Conv2DTranspose, dict(kernel_size=3, strides=2, padding="same", output_padding=1)),
    (L.Conv2DTranspose, dict(kernel_size=(2, 3), strides=(2, 1))),
    (L.Conv3DTranspose, dict(kernel_size=2, strides=2, padding="same")),
    (L.Conv3DTranspose, dict(kernel_size=(3, 2, 2), strides=(1, 2, 1), output_padding=(0, 1, 0))),
]
# Only under XLA on CPU.
XLA_CONFIGS = [
    (L.Conv1D, dict(kernel_size=3, padding="causal", data_format="channels_first")),
    (L.Conv3D, dict(kernel_size=2, strides=(1, 2, 1), padding="same", data_format="channels_first")),
    (L.Conv1DTranspose, dict(kernel_size=3, strides=2, padding="same", data_format="channels_first")),
    (L.Conv2DTranspose, dict(kernel_size=3, padding="same", dilation_rate=2)),
    (L.Conv3DTranspose, dict(kernel_size=2, dilation_rate=(1, 2, 1), data_format="channels_first")),
]
SPATIAL = {1: (9,), 2: (5, 4), 3: (4, 5, 4)}
C_IN, C_OUT = 2, 3


def _rank(cls):
    return {L.Conv1D: 1, L.Conv3D: 3, L.Conv1DTranspose: 1, L.Conv2DTranspose: 2, L.Conv3DTranspose: 3}[cls]


def _input_shape(cls, kwargs):
    spatial = SPATIAL[_rank(cls)]
    return (C_IN, *spatial) if kwargs.get("data_format") == "channels_first" else (*spatial, C_IN)


def _make(cls, kwargs, name, activation=None):
    return cls(C_OUT, name=name, activation=activation, **kwargs)


def _last(x, kwargs):
    """numpy channels_first -> channels_last."""
    if kwargs.get("data_format") == "channels_first":
        return np.moveaxis(x, 1, -1)
    return x


# --------------------------------------------------------------------------- numpy references
def _np_patches(x, kernel_size, strides, dilation, padding):
    """``[B, T, prod(k) * C]`` patches of channels-last ``x`` by explicit loops (taps row-major, then C)."""
    spatial, channels = x.shape[1:-1], x.shape[-1]
    rank = len(spatial)
    kernel_size, strides, dilation = (tuple(np.broadcast_to(v, rank)) for v in (kernel_size, strides, dilation))
    if padding == "causal":
        left = dilation[0] * (kernel_size[0] - 1)
        x = np.concatenate([np.zeros((x.shape[0], left, channels)), x], axis=1)
        spatial, padding = x.shape[1:-1], "valid"
    outs, befores = [], []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilation):
        effective = (k - 1) * d + 1
        if padding == "same":
            out = -(-n // s)
            befores.append(max((out - 1) * s + effective - n, 0) // 2)
        else:
            out = (n - effective) // s + 1
            befores.append(0)
        outs.append(out)
    taps = list(itertools.product(*(range(k) for k in kernel_size)))
    patches = np.zeros((x.shape[0], *outs, len(taps), channels))
    for location in itertools.product(*(range(o) for o in outs)):
        for j, tap in enumerate(taps):
            source = [o * s - b + i * d for o, s, b, i, d in zip(location, strides, befores, tap, dilation)]
            if all(0 <= r < n for r, n in zip(source, spatial)):  # zero padding outside
                patches[(slice(None), *location, j)] = x[(slice(None), *source)]
    return patches.reshape(x.shape[0], -1, len(taps) * channels)


def _np_rows(layer, x, g):
    """``(a, g)`` rows ``[B, T, d]`` of the block's factorisation, from numpy (channels-last) arrays."""
    geometry = (layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
    if isinstance(layer, TRANSPOSES):
        return x.reshape(x.shape[0], -1, x.shape[-1]), _np_patches(g, *geometry)
    a = _np_patches(x, *geometry)
    if layer.use_bias:
        a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=-1)
    return a, g.reshape(g.shape[0], -1, g.shape[-1])


def _np_gradient_matrix(layer, kernel_grad, bias_grad):
    """The layout the factors act on: ``[dK.reshape(-1, C_out); db]`` or ``dK.reshape(-1, C_in)^T``."""
    if isinstance(layer, TRANSPOSES):
        return kernel_grad.reshape(-1, kernel_grad.shape[-1]).T
    matrix = kernel_grad.reshape(-1, kernel_grad.shape[-1])
    return np.concatenate([matrix, bias_grad[None]]) if layer.use_bias else matrix


def _per_example_gradients(layer, x, g, jit):
    """``[(dKernel_n, dBias_n)]`` of ``<g_n, layer(x_n)>`` for each example ``n``, by GradientTape."""

    def one(xn, gn):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(layer(xn) * gn)
        return tape.gradient(total, layer.trainable_variables)

    one = tf.function(one, jit_compile=True) if jit else one
    out = []
    for n in range(x.shape[0]):
        grads = [v.numpy().astype(np.float64) for v in one(tf.constant(x[n:n + 1]), tf.constant(g[n:n + 1]))]
        out.append((grads[0], grads[1] if layer.use_bias else None))
    return out


def _assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


# --------------------------------------------------------------------------- 1. rows: exact per-example gradients
def _check_rows_reproduce_gradients(configs, jit):
    rng = np.random.default_rng(0)
    batch = 3
    for k, (cls, kwargs) in enumerate(configs):
        layer = _make(cls, kwargs, f"l{k}")
        x = rng.normal(size=(batch, *_input_shape(cls, kwargs))).astype("float32")
        layer.build(x.shape)
        block = block_type_for(layer)(layer)
        s_shape = layer.compute_output_shape(x.shape)
        g = rng.normal(size=s_shape).astype("float32")
        per_example = _per_example_gradients(layer, x, g, jit)

        call = ForwardRecord().new_call(layer)
        call.inputs = tf.constant(x)
        a_rows = block.input_rows(call).numpy().astype(np.float64)
        g_rows = block.output_rows(tf.constant(g)).numpy().astype(np.float64)
        a_rows, g_rows = a_rows.reshape(batch, -1, a_rows.shape[-1]), g_rows.reshape(batch, -1, g_rows.shape[-1])
        assert a_rows.shape[1] == g_rows.shape[1], (cls.__name__, kwargs)  # one location count
        outer = np.einsum("nti,nto->nio", a_rows, g_rows)  # sum over locations of a_t g_t^T
        for n, (dk, db) in enumerate(per_example):
            expected = _np_gradient_matrix(layer, dk, db)
            _assert_close(outer[n], expected, 1e-5, f"{cls.__name__} {kwargs} example {n}")
            grads = [dk] + ([db] if block.has_bias else [])
            _assert_close(block.gradient_matrix([tf.constant(v, tf.float32) for v in grads]), expected, 1e-6)
        # The independent numpy im2col gives the same rows.
        np_a, np_g = _np_rows(layer, _last(x, kwargs).astype(np.float64), _last(g, kwargs).astype(np.float64))
        _assert_close(a_rows, np_a, 1e-6, f"a rows {cls.__name__} {kwargs}")
        _assert_close(g_rows, np_g, 1e-6, f"g rows {cls.__name__} {kwargs}")


def test_per_location_outer_products_sum_to_the_per_example_kernel_gradient():
    _check_rows_reproduce_gradients(CONFIGS, jit=False)


def test_channels_first_and_dilated_transposes_under_xla():
    _check_rows_reproduce_gradients(XLA_CONFIGS, jit=True)


# --------------------------------------------------------------------------- 2. factors from a K-FAC step
def _kfac(**kwargs):
    config = dict(learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=1e-3,
                  inverse_update_interval=1, step_size="fixed", fisher="empirical")
    config.update(kwargs)
    return keras_hoopt.KFAC(**config)


def _branches_model(configs):
    """One input per rank, a branch per configuration (layer, then tanh), flattened into Dense logits."""
    inputs = {}
    layers, flat = [], []
    for k, (cls, kwargs) in enumerate(configs):
        shape = _input_shape(cls, kwargs)
        if shape not in inputs:
            inputs[shape] = keras.Input(shape, name=f"in{len(inputs)}")
        layer = _make(cls, kwargs, f"b{k}")
        layers.append(layer)
        flat.append(L.Flatten()(L.Activation("tanh")(layer(inputs[shape]))))
    head = L.Dense(CLASSES, name="head")
    model = keras.Model(list(inputs.values()), head(L.Concatenate()(flat)))
    return model, list(inputs), layers, head


def _reference(model, shapes, layers, head, xs, y, jit):
    """Per-layer pre-activations' per-example gradients of the summed loss, and the kernel gradients
    of the mean loss (both by GradientTape), before the step."""
    configs_inputs = [shapes.index(tuple(layer.input.shape[1:])) for layer in layers]

    def run(xs, y):
        with tf.GradientTape(persistent=True) as tape:
            pre = [layer(xs[i]) for layer, i in zip(layers, configs_inputs)]
            for s in pre:
                tape.watch(s)
            logits = head(tf.concat([tf.reshape(tf.tanh(s), (tf.shape(s)[0], -1)) for s in pre], axis=1))
            total = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            mean = total / tf.cast(tf.shape(y)[0], tf.float32)
        grads = tape.gradient(total, pre)
        weights = tape.gradient(mean, [l.trainable_variables for l in layers])
        return grads, weights

    run = tf.function(run, jit_compile=True) if jit else run
    grads, weights = run([tf.constant(x) for x in xs], tf.constant(y))
    return [g.numpy().astype(np.float64) for g in grads], [[w.numpy().astype(np.float64) for w in ws] for ws in weights]


def _check_factors(configs, optimizer, xs, y, jit):
    """One step of ``optimizer`` on a branches model: its factors against numpy's. Returns the model."""
    batch = len(y)
    model, shapes, layers, head = _branches_model(configs)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit, run_eagerly=not jit)
    grads, _ = _reference(model, shapes, layers, head, xs, y, jit)
    # One step through `fit` (the train function a later `fit` reuses: no second XLA compile).
    model.fit(xs, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    summary = {row["layer"]: row["kind"] for row in optimizer.curvature_summary()}
    for layer, (_, kwargs), g in zip(layers, configs, grads):
        x = xs[shapes.index(tuple(layer.input.shape[1:]))]
        a, g_rows = _np_rows(layer, _last(x, kwargs).astype(np.float64), _last(g, kwargs))
        locations = a.shape[1]
        a, g_rows = a.reshape(batch * locations, -1), g_rows.reshape(batch * locations, -1)
        expected_a = a.T @ a / batch  # sum over locations, mean over examples
        expected_g = g_rows.T @ g_rows / (batch * locations)  # mean over locations and examples
        what = f"{layer.name} {type(layer).__name__} {kwargs}"
        assert summary[layer.name] == block_type_for(layer).kind, what
        _assert_close(optimizer.statistic(layer.name, "A"), expected_a, 1e-5, f"A {what}")
        _assert_close(optimizer.statistic(layer.name, "G"), expected_g, 1e-4, f"G {what}")
    return model


def _branch_inputs(configs, rng, n):
    shapes = list(dict.fromkeys(_input_shape(cls, kwargs) for cls, kwargs in configs))
    xs = [rng.normal(size=(n, *shape)).astype("float32") for shape in shapes]
    y = (xs[0].mean(axis=tuple(range(1, xs[0].ndim))) > 0).astype("int32")
    y += xs[-1].mean(axis=tuple(range(1, xs[-1].ndim))) > 0  # learnable labels in {0, 1, 2}
    return xs, y


def test_factors_match_numpy_im2col():
    # Eager step: tracing sixteen blocks costs more than it tests (the graph and XLA paths run
    # the same patch code and are covered below).
    xs, y = _branch_inputs(CONFIGS, np.random.default_rng(1), 6)
    _check_factors(CONFIGS, _kfac(learning_rate=1e-3), xs, y, jit=False)


def test_spngd_under_jit_compile_factors_then_training():
    # jit_compile=True on configurations TensorFlow's CPU kernels run only under XLA. SP-NGD's
    # first refresh takes the batch statistic, so its first step's factors are checked too.
    configs = [XLA_CONFIGS[i] for i in (0, 3, 4)]  # compiling the step costs ~5 s a block on CPU
    xs, y = _branch_inputs(configs, np.random.default_rng(6), 96)
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2, fisher="empirical")  # the reference's g
    model = _check_factors(configs, optimizer, [x[:16] for x in xs], y[:16], jit=True)
    losses = model.fit(xs, y, batch_size=16, epochs=4, shuffle=False, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


# --------------------------------------------------------------------------- 3. one K-FAC step
def _kron_step(a_factor, g_factor, m, damping):
    """``-(A (x) G + damping terms)^-1 vec(M)`` with pi-damping, as a ``[d_a, d_g]`` matrix."""
    d_a, d_g = m.shape
    pi = np.sqrt((np.trace(a_factor) / d_a) / (np.trace(g_factor) / d_g))
    root = np.sqrt(damping)
    big = np.kron(a_factor + pi * root * np.eye(d_a), g_factor + root / pi * np.eye(d_g))
    return -np.linalg.solve(big, m.reshape(-1)).reshape(d_a, d_g)


def test_kfac_step_equals_dense_kronecker_solve():
    rng = np.random.default_rng(2)
    batch, damping = 16, 0.05
    configs = [
        (L.Conv1D, dict(kernel_size=3, padding="causal", dilation_rate=2)),
        (L.Conv3D, dict(kernel_size=2, strides=(1, 2, 1), padding="same")),
        (L.Conv1DTranspose, dict(kernel_size=3, strides=2, padding="same", use_bias=False)),
        (L.Conv2DTranspose, dict(kernel_size=3, strides=2, output_padding=1)),  # bias: first order
    ]
    model, shapes, layers, head = _branches_model(configs)
    # fallback="momentum": the transposes' bias (no block) takes plain SGD, here -1 x its gradient.
    model.compile(optimizer=_kfac(damping=damping, fallback="momentum"), loss=LOSS, jit_compile=False)
    xs = [rng.normal(size=(batch, *shape)).astype("float32") for shape in shapes]
    y = rng.integers(0, CLASSES, size=batch).astype("int32")
    grads, mean_grads = _reference(model, shapes, layers, head, xs, y, jit=False)
    before = [[v.numpy().astype(np.float64) for v in layer.trainable_variables] for layer in layers]
    model.train_on_batch(xs, y)
    for layer, (_, kwargs), g, weight_grads, old in zip(layers, configs, grads, mean_grads, before):
        new = [v.numpy().astype(np.float64) for v in layer.trainable_variables]
        x = xs[shapes.index(tuple(layer.input.shape[1:]))].astype(np.float64)
        a, g_rows = _np_rows(layer, x, g)
        locations = a.shape[1]
        a, g_rows = a.reshape(batch * locations, -1), g_rows.reshape(batch * locations, -1)
        a_factor, g_factor = a.T @ a / batch, g_rows.T @ g_rows / (batch * locations)
        m = a.T @ g_rows / batch  # gradient of the mean loss in the factors' layout
        bias_grad = weight_grads[1] if layer.use_bias else None
        _assert_close(m, _np_gradient_matrix(layer, weight_grads[0], bias_grad), 1e-5, f"M {layer.name}")
        expected = _kron_step(a_factor, g_factor, m, damping)
        if isinstance(layer, TRANSPOSES):
            _assert_close(new[0] - old[0], expected.T.reshape(old[0].shape), 1e-4, layer.name)
            if layer.use_bias:  # not preconditioned: the fallback's gradient step (lr 1, momentum 0)
                _assert_close(new[1] - old[1], -weight_grads[1], 1e-5, f"{layer.name} bias")
        else:
            moved = _np_gradient_matrix(layer, new[0] - old[0], new[1] - old[1] if layer.use_bias else None)
            _assert_close(moved, expected, 1e-4, layer.name)


# --------------------------------------------------------------------------- 4. capture_call
CAPTURED = [
    (L.Conv1D, dict(kernel_size=3, padding="causal", dilation_rate=2)),
    (L.Conv1D, dict(kernel_size=3, strides=2, padding="same")),
    (L.Conv3D, dict(kernel_size=2, padding="same")),
    (L.Conv1DTranspose, dict(kernel_size=3, strides=2, padding="same", output_padding=1)),
    (L.Conv2DTranspose, dict(kernel_size=2, strides=2)),
    (L.Conv3DTranspose, dict(kernel_size=2, strides=(2, 1, 1), padding="same")),
]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_capture_call_output_equals_the_layer_call(policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(3)
    for k, (cls, kwargs) in enumerate(CAPTURED):
        layer = _make(cls, kwargs, f"c{k}", activation="tanh")
        x = tf.constant(rng.normal(size=(2, *_input_shape(cls, kwargs))).astype("float32"))
        layer.build(x.shape)
        layer.bias.assign(rng.normal(size=layer.bias.shape))  # a bias that matters
        expected = layer(x)
        block_type = block_type_for(layer)
        record = ForwardRecord()
        call = record.new_call(layer)
        original = type(layer).call.__get__(layer)
        # As keras_hoopt.capture installs it: the instance's call runs the block's capture_call.
        object.__setattr__(layer, "call", lambda inputs: block_type.capture_call(layer, original, call, inputs))
        try:
            captured = layer(x)
        finally:
            layer.__dict__.pop("call")
        assert captured.dtype == expected.dtype == layer.compute_dtype, (cls.__name__, captured.dtype)
        np.testing.assert_array_equal(captured.numpy(), expected.numpy(), err_msg=f"{cls.__name__} {kwargs}")
        assert call.inputs.dtype == layer.compute_dtype and call.inputs.shape == x.shape
        assert call.output.shape == expected.shape  # the tapped pre-activation


# --------------------------------------------------------------------------- 5. training
def test_spngd_trains_conv3d_and_transpose_in_mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    x = rng.normal(size=(96, 4, 4, 4, 1)).astype("float32")
    y = ((x[:, :2].mean(axis=(1, 2, 3, 4)) > 0).astype("int32") + (x[:, 2:].mean(axis=(1, 2, 3, 4)) > 0))
    model = keras.Sequential([
        keras.Input((4, 4, 4, 1)),
        L.Conv3D(4, 2, strides=2, padding="same", activation="relu", name="c"),
        L.Conv3DTranspose(2, 2, strides=2, activation="relu", name="t"),
        L.Flatten(),
        L.Dense(CLASSES, name="head", dtype="float32"),
    ])
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer, LOSS, jit_compile=False)
    conv_before = model.get_layer("c").kernel.numpy().copy()
    losses = model.fit(x, y.astype("int32"), batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses
    assert not np.allclose(model.get_layer("c").kernel.numpy(), conv_before)
    for name in ("c", "t"):
        a = optimizer.statistic(name, "A")
        assert np.isfinite(a).all() and not np.allclose(a, np.eye(a.shape[0]))  # refreshed, finite


# --------------------------------------------------------------------------- 6. matches
class _PlainConv1D(L.Conv1D):
    pass


class _PlainConv2DTranspose(L.Conv2DTranspose):
    pass


class _OwnCallConv3D(L.Conv3D):
    def call(self, inputs):
        return super().call(inputs) * 2.0


class _OwnConvolutionOp(L.Conv2D):  # BaseConv.call runs it
    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, kernel / (keras.ops.std(kernel) + 1e-5))


class _OwnCallTranspose(L.Conv1DTranspose):
    def call(self, inputs):
        return super().call(inputs) + 1.0


def test_matches_accepts_subclasses_and_rejects_what_it_cannot_handle():
    expected = [
        (L.Conv1D(3, 3), Conv1DBlock),
        (_PlainConv1D(3, 3), Conv1DBlock),
        (L.Conv2D(3, 3), Conv2DBlock),
        (L.Conv3D(3, 2), Conv3DBlock),
        (L.Conv1DTranspose(3, 3), Conv1DTransposeBlock),
        (L.Conv2DTranspose(3, 3), Conv2DTransposeBlock),
        (_PlainConv2DTranspose(3, 3), Conv2DTransposeBlock),
        (L.Conv3DTranspose(3, 2), Conv3DTransposeBlock),
    ]
    for layer, block_type in expected:
        assert block_type_for(layer) is block_type, type(layer).__name__
    ours = (Conv1DBlock, Conv2DBlock, Conv3DBlock, Conv1DTransposeBlock, Conv2DTransposeBlock, Conv3DTransposeBlock)
    lora = L.Conv1D(4, 3)
    lora.build((None, 8, 2))
    lora.enable_lora(2)
    rejected = [
        L.Conv1D(4, 3, groups=2),
        L.Conv3D(4, 2, groups=2),
        L.Conv2D(4, 3, groups=4),
        lora,
        _OwnCallConv3D(3, 2),
        _OwnConvolutionOp(3, 3),
        _OwnCallTranspose(3, 3),
        L.SeparableConv1D(3, 3),
        L.SeparableConv2D(3, 3),
        L.DepthwiseConv1D(3),
        L.DepthwiseConv2D(3),
        L.Dense(3),
    ]
    for layer in rejected:
        assert not any(t.matches(layer) for t in ours), type(layer).__name__
    transpose = L.Conv2DTranspose(3, 3, use_bias=True)
    transpose.build((None, 5, 5, 2))
    block = Conv2DTransposeBlock(transpose)
    assert block.variables == [transpose.kernel]  # the bias takes the first-order update
    assert block.statistic_shapes() == {"A": (2, 2), "G": (27, 27)}

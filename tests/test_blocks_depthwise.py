"""Depthwise and separable convolution blocks, checked against independent numpy references.

References are computed from scratch: per-channel windows with explicit loops and explicit
zero padding (validated by reproducing the layer's output), per-example output gradients
with ``tf.GradientTape`` on the *summed* per-example loss, the true per-example kernel
gradients with ``tape.jacobian`` of the per-example losses, and the preconditioned step with
``np.kron`` / ``np.linalg.solve`` per input channel. Conventions (``_depthwise`` docstring):
``A_c = E_n[sum_t a a^T]`` (bias as a trailing 1), ``G_c = E_n[mean_t g g^T]``; kernel
``(k..., C, m)`` with output channel ``c * m + j``.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.depthwise_conv import DepthwiseConv1DBlock, DepthwiseConv2DBlock
from keras_hoopt.blocks.separable_conv import SeparableConv1DBlock, SeparableConv2DBlock

# ---------------------------------------------------------------------------------------
# helpers


def _kfac(**kwargs):
    defaults = dict(learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=1e-3,
                    inverse_update_interval=1, step_size="fixed", fisher="empirical")
    defaults.update(kwargs)
    return keras_hoopt.KFAC(**defaults)


def _sce_logits(y, out):
    return keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)


def _assert_close(actual, expected, rtol, what=""):
    """Relative Frobenius-norm closeness."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


def _same_padding(size, kernel, stride, dilation):
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2


def _channel_windows(x, kernel_size, strides, padding, dilation):
    """``[B, T, K, C]`` windows of each channel of a channels_last ``x`` (rank 1 or 2), explicit loops."""
    if x.ndim == 3:  # 1D as 2D of height 1
        x, kernel_size, strides, dilation = x[:, None], (1, *kernel_size), (1, *strides), (1, *dilation)
    batch, height, width, channels = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    if padding == "same":
        out_h, top = _same_padding(height, kh, sh, dh)
        out_w, left = _same_padding(width, kw, sw, dw)
    else:
        out_h = (height - ((kh - 1) * dh + 1)) // sh + 1
        out_w = (width - ((kw - 1) * dw + 1)) // sw + 1
        top = left = 0
    windows = np.zeros((batch, out_h, out_w, kh, kw, channels))
    for oh in range(out_h):
        for ow in range(out_w):
            for i in range(kh):
                for j in range(kw):
                    r, c = oh * sh - top + i * dh, ow * sw - left + j * dw
                    if 0 <= r < height and 0 <= c < width:
                        windows[:, oh, ow, i, j, :] = x[:, r, c, :]
    return windows.reshape(batch, out_h * out_w, kh * kw, channels)


def _channels_last(x, data_format):
    return np.moveaxis(x, 1, -1) if data_format == "channels_first" else x


def _depthwise_np(windows, kernel):
    """``[B, T, C * m]``: the depthwise convolution from the windows (output channel c * m + j)."""
    k, c, m = int(np.prod(kernel.shape[:-2])), kernel.shape[-2], kernel.shape[-1]
    out = np.einsum("ntkc,kcm->ntcm", windows, kernel.reshape(k, c, m))
    return out.reshape(out.shape[0], out.shape[1], c * m)


def _with_ones(rows):
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def _per_channel_factors(windows, g, use_bias):
    """Reference ``A_c``, ``G_c`` and the per-channel gradient of the mean loss ``M_c``."""
    batch, locations, _, channels = windows.shape
    a = np.moveaxis(windows, -1, 2)  # [B, T, C, K]
    if use_bias:
        a = _with_ones(a)
    g = g.reshape(batch, locations, channels, -1)  # [B, T, C, m]
    a_factor = np.einsum("ntck,ntcl->ckl", a, a) / batch
    g_factor = np.einsum("ntci,ntcj->cij", g, g) / (batch * locations)
    grad = np.einsum("ntck,ntcj->ckj", a, g) / batch
    return a_factor, g_factor, grad, a, g


def _kron_step(a_factor, g_factor, m, damping):
    """``-(kron(A + pi sqrt(l) I, G + sqrt(l)/pi I))^-1 vec(M)`` in the ``(d_in, d_out)`` layout."""
    d_in, d_out = m.shape
    pi = np.sqrt((np.trace(a_factor) / d_in) / (np.trace(g_factor) / d_out))
    root = np.sqrt(damping)
    big = np.kron(a_factor + pi * root * np.eye(d_in), g_factor + root / pi * np.eye(d_out))
    return -np.linalg.solve(big, m.reshape(-1)).reshape(d_in, d_out)


def _depthwise_change(layer, before, after):
    """``[C, K (+1), m]`` change of each channel's ``[W_c; b_c]``."""
    kernel = after[layer.kernel.path] - before[layer.kernel.path]
    k, c, m = int(np.prod(kernel.shape[:-2])), kernel.shape[-2], kernel.shape[-1]
    out = np.transpose(kernel.reshape(k, c, m), (1, 0, 2))
    if layer.use_bias:
        bias = (after[layer.bias.path] - before[layer.bias.path]).reshape(c, 1, m)
        out = np.concatenate([out, bias], axis=1)
    return out


def _weights(model):
    return {v.path: np.array(v.numpy(), dtype=np.float64) for v in model.trainable_variables}


def _branch_model(inputs_shapes, branches, classes):
    """Parallel branches ``(input index, layer)``; each: [permute to channels_first], layer, tanh, flatten.

    The layers have no activation, so each one's output is its pre-activation.
    """
    inputs = [keras.Input(shape) for shape in inputs_shapes]
    flat = []
    for index, layer in branches:
        h = inputs[index]
        if layer.data_format == "channels_first":
            rank = len(h.shape)
            h = keras.layers.Permute((rank - 1,) + tuple(range(1, rank - 1)))(h)
        flat.append(keras.layers.Flatten()(keras.layers.Activation("tanh")(layer(h))))
    head = keras.layers.Dense(classes, name="head")
    return keras.Model(inputs, head(keras.layers.Concatenate()(flat))), head


def _branch_inputs(xs, layer, index):
    x = xs[index]
    return np.moveaxis(x, -1, 1) if layer.data_format == "channels_first" else x


def _branch_reference(xs, y, branches, head, pre_activations):
    """Per-example gradients (summed loss) w.r.t. tensors ``pre_activations(k)`` of each branch.

    ``pre_activations(k, tape)`` returns ``(watched tensors, the branch output)``.
    """
    with tf.GradientTape() as tape:
        watched, flat = [], []
        for k in range(len(branches)):
            ts, out = pre_activations(k, tape)
            watched.append(ts)
            flat.append(tf.reshape(tf.tanh(out), (out.shape[0], -1)))
        total = tf.reduce_sum(_sce_logits(tf.constant(y), head(tf.concat(flat, axis=1))))
    grads = tape.gradient(total, watched)
    return [[g.numpy().astype(np.float64) for g in gs] for gs in grads]


def _per_example_gradients(model, xs, y, variables):
    """True per-example gradients ``[B, ...]`` of each variable: one backward pass per example."""
    out = []
    for n in range(len(y)):
        with tf.GradientTape() as tape:
            loss = _sce_logits(tf.constant(y[n:n + 1]), model([tf.constant(x[n:n + 1]) for x in xs], training=True))
        out.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)])
    return [np.stack(per_variable) for per_variable in zip(*out)]


# ---------------------------------------------------------------------------------------
# 1. DepthwiseConv factors, per-example gradients and one step

# (rank, kernel, strides, padding, dilation, multiplier, use_bias, data_format)
DEPTHWISE_CONFIGS = [
    (2, (3, 3), (1, 1), "valid", (1, 1), 1, True, "channels_last"),
    (2, (3, 2), (2, 2), "same", (1, 1), 2, True, "channels_last"),
    (2, (2, 3), (1, 1), "same", (2, 2), 3, False, "channels_last"),
    (2, (3, 3), (2, 2), "same", (2, 2), 2, True, "channels_last"),  # strides and dilation together
    (2, (3, 2), (2, 2), "valid", (1, 1), 2, True, "channels_first"),
    (1, (3,), (1,), "valid", (1,), 2, True, "channels_last"),
    (1, (2,), (2,), "same", (1,), 1, True, "channels_last"),
    (1, (3,), (1,), "same", (2,), 2, False, "channels_first"),
]


def _depthwise_layer(config, name):
    rank, kernel, strides, padding, dilation, multiplier, use_bias, data_format = config
    cls = keras.layers.DepthwiseConv2D if rank == 2 else keras.layers.DepthwiseConv1D
    return cls(kernel, strides=strides, padding=padding, dilation_rate=dilation, depth_multiplier=multiplier,
               use_bias=use_bias, data_format=data_format, bias_initializer="random_normal", name=name)


def _depthwise_setup(configs, batch, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(batch, 7, 6, 3)).astype("float32"), rng.normal(size=(batch, 9, 2)).astype("float32")]
    branches = [(0 if c[0] == 2 else 1, _depthwise_layer(c, f"dw{k}")) for k, c in enumerate(configs)]
    model, head = _branch_model([(7, 6, 3), (9, 2)], branches, 4)
    y = rng.integers(0, 4, size=batch).astype("int32")
    return model, head, branches, xs, y


def _depthwise_reference(xs, y, configs, branches, head):
    """Windows ``[B, T, K, C]`` and pre-activation gradients (channels_last ``[B, T, C m]``) per branch."""
    windows = []
    for (index, layer), config in zip(branches, configs):
        _, kernel, strides, padding, dilation, _, use_bias, data_format = config
        w = _channel_windows(xs[index].astype(np.float64), kernel, strides, padding, dilation)
        s = layer(tf.constant(_branch_inputs(xs, layer, index)))
        expected = _depthwise_np(w, layer.kernel.numpy().astype(np.float64))
        if use_bias:
            expected = expected + layer.bias.numpy()
        # The reference windows reproduce Keras's convolution (ordering, padding, channel order).
        got = _channels_last(s.numpy(), data_format)
        np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5, err_msg=str(config))
        windows.append(w)

    def pre_activations(k, tape):
        index, layer = branches[k]
        s = layer(tf.constant(_branch_inputs(xs, layer, index)))
        tape.watch(s)
        return [s], s

    grads = _branch_reference(xs, y, branches, head, pre_activations)
    out = []
    for (g,), (_, layer) in zip(grads, branches):
        g = _channels_last(g, layer.data_format)
        out.append(g.reshape(g.shape[0], -1, g.shape[-1]))
    return windows, out


def test_depthwise_factors_and_per_example_gradients_match_numpy():
    batch = 5
    model, head, branches, xs, y = _depthwise_setup(DEPTHWISE_CONFIGS, batch, 0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Eager steps here and below: tracing eight blocks costs many seconds on CPU; the traced
    # (and XLA) step is covered by the training tests, the numerics are the same code.
    optimizer = _kfac(learning_rate=1e-3)
    model.compile(optimizer=optimizer, loss=loss, run_eagerly=True)
    windows, grads = _depthwise_reference(xs, y, DEPTHWISE_CONFIGS, branches, head)
    layers = [layer for _, layer in branches]
    truth = _per_example_gradients(model, xs, y, [v for layer in layers for v in layer.trainable_variables])
    model.train_on_batch(xs, y)

    summary = {row["layer"]: row for row in optimizer.curvature_summary()}
    for config, layer, w, g in zip(DEPTHWISE_CONFIGS, layers, windows, grads):
        use_bias, channels, multiplier = config[6], 3 if config[0] == 2 else 2, config[5]
        assert summary[layer.name]["kind"] == f"depthwise_conv{config[0]}d"
        a_factor, g_factor, _, a, g_rows = _per_channel_factors(w, g, use_bias)
        # The per-location outer products sum to the true per-example gradient of [W_c; b_c].
        per_example = np.einsum("ntck,ntcj->nckj", a, g_rows)
        kernel_truth = truth.pop(0)  # [B, k..., C, m]
        k = int(np.prod(kernel_truth.shape[1:-2]))
        expected = np.transpose(kernel_truth.reshape(batch, k, channels, multiplier), (0, 2, 1, 3))
        if use_bias:
            bias_truth = truth.pop(0).reshape(batch, channels, 1, multiplier)
            expected = np.concatenate([expected, bias_truth], axis=2)
        _assert_close(per_example, expected, 1e-4, f"per-example gradient {config}")
        # Factors.
        assert optimizer.statistic(layer.name, "A").shape == (channels, k + int(use_bias), k + int(use_bias))
        assert optimizer.statistic(layer.name, "G").shape == (channels, multiplier, multiplier)
        _assert_close(optimizer.statistic(layer.name, "A"), a_factor, 1e-5, f"A {config}")
        _assert_close(optimizer.statistic(layer.name, "G"), g_factor, 1e-4, f"G {config}")


def test_depthwise_step_equals_per_channel_kronecker_solve():
    damping = 1e-2
    configs = [DEPTHWISE_CONFIGS[1], DEPTHWISE_CONFIGS[4], DEPTHWISE_CONFIGS[6]]  # m = 2, 2 (NCHW), 1 (1x1 G)
    model, head, branches, xs, y = _depthwise_setup(configs, 8, 1)
    model.compile(optimizer=_kfac(damping=damping), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)  # the traced step is covered by the training tests
    windows, grads = _depthwise_reference(xs, y, configs, branches, head)
    before = _weights(model)
    model.train_on_batch(xs, y)
    after = _weights(model)
    for config, (_, layer), w, g in zip(configs, branches, windows, grads):
        a_factor, g_factor, grad, _, _ = _per_channel_factors(w, g, config[6])
        expected = np.stack([_kron_step(a_factor[c], g_factor[c], grad[c], damping) for c in range(len(grad))])
        _assert_close(_depthwise_change(layer, before, after), expected, 1e-4, str(config))


# ---------------------------------------------------------------------------------------
# 2. SeparableConv: both parts

# (rank, kernel, strides, padding, dilation, multiplier, use_bias, data_format, filters)
SEPARABLE_CONFIGS = [
    (2, (3, 3), (1, 1), "same", (1, 1), 2, True, "channels_last", 4),
    (2, (2, 3), (2, 2), "valid", (1, 1), 1, False, "channels_first", 3),
    (1, (3,), (2,), "same", (1,), 2, True, "channels_last", 3),
]


def test_separable_factors_and_step_match_numpy():
    rng = np.random.default_rng(2)
    batch, damping = 6, 1e-2
    xs = [rng.normal(size=(batch, 7, 6, 3)).astype("float32"), rng.normal(size=(batch, 9, 2)).astype("float32")]
    y = rng.integers(0, 4, size=batch).astype("int32")
    branches = []
    for k, config in enumerate(SEPARABLE_CONFIGS):
        rank, kernel, strides, padding, dilation, m, use_bias, data_format, filters = config
        cls = keras.layers.SeparableConv2D if rank == 2 else keras.layers.SeparableConv1D
        layer = cls(filters, kernel, strides=strides, padding=padding, dilation_rate=dilation, depth_multiplier=m,
                    use_bias=use_bias, data_format=data_format, bias_initializer="random_normal", name=f"sep{k}")
        branches.append((0 if rank == 2 else 1, layer))
    model, head = _branch_model([(7, 6, 3), (9, 2)], branches, 4)
    optimizer = _kfac(damping=damping)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)

    # Independent forward pass: u = depthwise(windows), s = u W_p + b, checked against the layer.
    ref = []
    for (index, layer), config in zip(branches, SEPARABLE_CONFIGS):
        _, kernel, strides, padding, dilation, _, use_bias, data_format, filters = config
        w = _channel_windows(xs[index].astype(np.float64), kernel, strides, padding, dilation)
        u = _depthwise_np(w, layer.depthwise_kernel.numpy().astype(np.float64))  # [B, T, C m]
        s = u @ layer.pointwise_kernel.numpy().reshape(-1, filters).astype(np.float64)
        if use_bias:
            s = s + layer.bias.numpy()
        got = _channels_last(layer(tf.constant(_branch_inputs(xs, layer, index))).numpy(), data_format)
        np.testing.assert_allclose(got.reshape(s.shape), s, rtol=1e-4, atol=1e-5, err_msg=str(config))
        ref.append((w, u, got.shape))

    def pre_activations(k, tape):
        _, layer = branches[k]
        _, u, shape = ref[k]
        u_t = tf.constant(u, tf.float32)
        tape.watch(u_t)
        s = tf.matmul(u_t, tf.reshape(layer.pointwise_kernel, (u.shape[-1], -1)))
        if layer.use_bias:
            s = s + layer.bias
        tape.watch(s)
        out = tf.reshape(s, shape)
        if layer.data_format == "channels_first":
            out = tf.transpose(out, (0, out.shape.rank - 1) + tuple(range(1, out.shape.rank - 1)))
        return [u_t, s], out

    grads = _branch_reference(xs, y, branches, head, pre_activations)
    layers = [layer for _, layer in branches]
    truth = _per_example_gradients(model, xs, y, [v for layer in layers for v in layer.trainable_variables])
    before = _weights(model)
    model.train_on_batch(xs, y)
    after = _weights(model)

    for config, layer, (w, u, _), (g_u, g_s) in zip(SEPARABLE_CONFIGS, layers, ref, grads):
        use_bias, multiplier, filters = config[6], config[5], config[8]
        channels, locations = w.shape[-1], w.shape[1]
        assert [v.path for v in block_type_for(layer)(layer).variables] == [v.path for v in layer.trainable_variables]
        # Depthwise part: factors of the windows and of the depthwise output's gradients.
        dw_a, dw_g, dw_grad, a, g_rows = _per_channel_factors(w, g_u, use_bias=False)
        per_example = np.einsum("ntck,ntcj->nckj", a, g_rows)
        kernel_truth = truth.pop(0)
        k = kernel_truth.shape[1:-2]
        expected = np.transpose(kernel_truth.reshape(batch, int(np.prod(k)), channels, multiplier), (0, 2, 1, 3))
        _assert_close(per_example, expected, 1e-4, f"per-example depthwise gradient {config}")
        _assert_close(optimizer.statistic(layer.name, "depthwise_A"), dw_a, 1e-5, f"depthwise_A {config}")
        _assert_close(optimizer.statistic(layer.name, "depthwise_G"), dw_g, 1e-4, f"depthwise_G {config}")
        # Pointwise part: a 1x1 convolution of u (with the bias).
        rows = u.reshape(batch * locations, -1)
        rows = _with_ones(rows) if use_bias else rows
        g_s = g_s.reshape(batch * locations, filters)
        pw_a, pw_g, pw_grad = rows.T @ rows / batch, g_s.T @ g_s / (batch * locations), rows.T @ g_s / batch
        pointwise_truth = truth.pop(0).reshape(batch, -1, filters)
        if use_bias:
            pointwise_truth = np.concatenate([pointwise_truth, truth.pop(0)[:, None]], axis=1)
        _assert_close(pw_grad, pointwise_truth.mean(axis=0), 1e-4, f"pointwise gradient {config}")
        _assert_close(optimizer.statistic(layer.name, "pointwise_A"), pw_a, 1e-5, f"pointwise_A {config}")
        _assert_close(optimizer.statistic(layer.name, "pointwise_G"), pw_g, 1e-4, f"pointwise_G {config}")
        # One step: each part its own Kronecker solve (per channel in the depthwise part).
        moved = after[layer.depthwise_kernel.path] - before[layer.depthwise_kernel.path]
        moved = np.transpose(moved.reshape(int(np.prod(k)), channels, multiplier), (1, 0, 2))
        expected = np.stack([_kron_step(dw_a[c], dw_g[c], dw_grad[c], damping) for c in range(channels)])
        _assert_close(moved, expected, 1e-4, f"depthwise step {config}")
        moved = (after[layer.pointwise_kernel.path] - before[layer.pointwise_kernel.path]).reshape(-1, filters)
        if use_bias:
            moved = np.concatenate([moved, (after[layer.bias.path] - before[layer.bias.path])[None]], axis=0)
        _assert_close(moved, _kron_step(pw_a, pw_g, pw_grad, damping), 1e-4, f"pointwise step {config}")


# ---------------------------------------------------------------------------------------
# 3. Inverses with THOR's split and the damped Fisher trace


def test_split_inverse_and_damped_fisher_trace():
    layer = keras.layers.SeparableConv2D(5, 3, depth_multiplier=3)
    layer.build((None, 6, 6, 2))
    block = SeparableConv2DBlock(layer)
    rng = np.random.default_rng(3)

    def spd(*shape):
        m = rng.normal(size=shape[:-1] + (2 * shape[-1],))
        return (m @ np.swapaxes(m, -1, -2) / shape[-1]).astype("float32")

    stats = {"depthwise_A": spd(2, 9, 9), "depthwise_G": spd(2, 3, 3), "pointwise_A": spd(7, 7),
             "pointwise_G": spd(5, 5)}
    damping = 0.05
    tensors = {k: tf.constant(v) for k, v in stats.items()}
    a64, g64 = stats["depthwise_A"].astype(np.float64), stats["depthwise_G"].astype(np.float64)
    a_inverse, a_ok = block.compute_inverse("depthwise_A", tensors, damping, split_dim=4)
    g_inverse, g_ok = block.compute_inverse("depthwise_G", tensors, damping, split_dim=4)
    assert bool(a_ok) and bool(g_ok) and a_inverse.shape == (2, 9, 9) and g_inverse.shape == (2, 3, 3)
    for c in range(2):  # each channel damped with its own pi
        pi = np.sqrt((np.trace(a64[c]) / 9) / (np.trace(g64[c]) / 3))
        expected = np.zeros((9, 9))  # blocks 4, 4, 1 on the diagonal, zero elsewhere
        for lo, hi in [(0, 4), (4, 8), (8, 9)]:
            expected[lo:hi, lo:hi] = np.linalg.inv(a64[c, lo:hi, lo:hi] + pi * np.sqrt(damping) * np.eye(hi - lo))
        np.testing.assert_allclose(a_inverse.numpy()[c], expected, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(g_inverse.numpy()[c], np.linalg.inv(g64[c] + np.sqrt(damping) / pi * np.eye(3)),
                                   rtol=1e-3, atol=1e-5)
    pa, pg = stats["pointwise_A"].astype(np.float64), stats["pointwise_G"].astype(np.float64)
    pi = np.sqrt((np.trace(pa) / 7) / (np.trace(pg) / 5))
    inverse, ok = block.compute_inverse("pointwise_G", tensors, damping)
    assert bool(ok)
    np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(pg + np.sqrt(damping) / pi * np.eye(5)), rtol=1e-3,
                               atol=1e-5)
    expected_trace = sum(np.trace(a64[c]) * np.trace(g64[c]) for c in range(2)) + damping * 2 * 9 * 3
    expected_trace += np.trace(stats["pointwise_A"]) * np.trace(stats["pointwise_G"]) + damping * 7 * 5
    assert float(block.damped_fisher_trace(tensors, damping)) == pytest.approx(expected_trace, rel=1e-5)


# ---------------------------------------------------------------------------------------
# 4. matches


def test_matches_subclasses_and_rejects_unsupported():
    class KeepsCall(keras.layers.DepthwiseConv2D):
        pass

    class OwnCall(keras.layers.SeparableConv1D):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    assert block_type_for(KeepsCall(3)) is DepthwiseConv2DBlock
    assert block_type_for(keras.layers.DepthwiseConv1D(3)) is DepthwiseConv1DBlock
    assert block_type_for(keras.layers.SeparableConv2D(4, 3)) is SeparableConv2DBlock
    assert block_type_for(keras.layers.SeparableConv1D(4, 3)) is SeparableConv1DBlock
    assert not SeparableConv1DBlock.matches(OwnCall(4, 3))
    assert not DepthwiseConv2DBlock.matches(keras.layers.DepthwiseConv1D(3))  # the 2D block is 2D only
    # channels_first with the last output axis as long as the channels: Keras's TF backend adds
    # the bias along that axis (ops.add turns it into an NHWC bias_add), which no block describes.
    misbroadcast = keras.layers.SeparableConv2D(4, 3, data_format="channels_first")
    misbroadcast.build((None, 2, 6, 6))  # output (None, 4, 4, 4)
    x = np.random.default_rng(4).normal(size=(1, 2, 6, 6)).astype("float32")
    bias = np.array([1.0, 2.0, 3.0, 4.0], "float32")
    misbroadcast.bias.assign(bias)
    pre_bias = keras.ops.separable_conv(x, misbroadcast.depthwise_kernel, misbroadcast.pointwise_kernel,
                                        data_format="channels_first").numpy()
    added = misbroadcast(x).numpy() - pre_bias
    # Along the last (width) axis, not the channels (if Keras fixes this, the rejection can go).
    np.testing.assert_allclose(added, np.broadcast_to(bias, added.shape), atol=1e-5)
    assert not SeparableConv2DBlock.matches(misbroadcast)
    fine = keras.layers.SeparableConv2D(4, 3, data_format="channels_first")
    fine.build((None, 2, 6, 7))  # output (None, 4, 4, 5)
    assert SeparableConv2DBlock.matches(fine)
    no_bias = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, data_format="channels_first")
    no_bias.build((None, 2, 6, 6))  # output (None, 4, 4, 4), but no bias to misplace
    assert DepthwiseConv2DBlock.matches(no_bias)


# ---------------------------------------------------------------------------------------
# 5. capture_call reproduces the layer; training; jit_compile; mixed_float16


def _mixed_model(classes=3):
    """Every block type and both data formats in one small model (depthwise-separable style)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="stem"),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", name="dw2d"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.SeparableConv2D(6, 3, strides=2, dilation_rate=1, activation="relu", name="sep2d"),
            keras.layers.Permute((3, 1, 2)),  # channels_first from here: (6, 3, 3)
            keras.layers.DepthwiseConv2D(2, padding="same", data_format="channels_first", name="dw2d_cf"),
            keras.layers.SeparableConv2D(5, 2, padding="same", data_format="channels_first", name="sep2d_cf"),
            keras.layers.Reshape((5, 9)),  # (channels, steps), channels_first 1D
            keras.layers.DepthwiseConv1D(3, depth_multiplier=2, data_format="channels_first", name="dw1d_cf"),
            keras.layers.Permute((2, 1)),
            keras.layers.SeparableConv1D(4, 2, activation="tanh", name="sep1d"),
            keras.layers.DepthwiseConv1D(2, dilation_rate=2, padding="same", name="dw1d"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(classes, name="out"),
        ]
    )


BLOCK_LAYERS = ["dw2d", "sep2d", "dw2d_cf", "sep2d_cf", "dw1d_cf", "sep1d", "dw1d"]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_capture_output_equals_layer_output(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = _mixed_model()
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype("float32")
    plain = model(x, training=True)  # no capture installed yet
    optimizer = _kfac()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    session = optimizer._attachment.session
    captured = model(x, training=True)
    record = session.pop_record()
    assert captured.dtype == plain.dtype
    np.testing.assert_allclose(np.asarray(captured, np.float32), np.asarray(plain, np.float32), rtol=1e-6, atol=1e-6)
    for name in BLOCK_LAYERS:
        layer = model.get_layer(name)
        [call] = record.calls[id(layer)]
        assert set(call.outputs) == ({"output", "depthwise"} if "sep" in name else {"output"}), name
        assert call.outputs["output"].dtype == layer.compute_dtype, name
        # The captured layer output against the layer's own call on the same input (no record
        # is open now, so the instance's wrapper runs the original call).
        captured_layer = call.outputs["output"]
        if layer.activation is not None:
            captured_layer = layer.activation(captured_layer)
        original = layer(call.inputs)
        assert captured_layer.dtype == original.dtype, name
        np.testing.assert_allclose(np.asarray(captured_layer, np.float32), np.asarray(original, np.float32),
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def _learnable_data(shape, batch, seed):
    """Labels 0..2 from the signs of the first two channel means: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + shape).astype("float32")
    means = x.reshape(batch, -1, shape[-1]).mean(axis=1)
    return x, ((means[:, 0] > 0).astype("int32") + (means[:, 1] > 0)).astype("int32")


def test_spngd_training_loss_falls():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", name="dw"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.SeparableConv2D(4, 3, strides=2, activation="relu", name="sep"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="out"),
        ]
    )
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _learnable_data((6, 6, 2), 64, 6)
    losses = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    summary = {row["layer"]: row for row in optimizer.curvature_summary()}
    assert summary["dw"]["kind"] == "depthwise_conv2d" and summary["sep"]["kind"] == "separable_conv2d"
    for name in ["dw", "sep"]:
        assert summary[name]["inversions"] > 0 and summary[name]["failed_inversions"] == 0, summary[name]
        assert summary[name]["nonfinite_skips"] == 0


def test_mobilenet_v2_is_covered():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    optimizer = _kfac()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")  # builds the optimizer
    kinds = {row["layer"]: row["kind"] for row in optimizer.curvature_summary()}
    depthwise = [layer for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == 17
    assert all(kinds.get(layer.name) == "depthwise_conv2d" for layer in depthwise)
    wanted = {"depthwise_conv2d", "conv2d", "batchnorm", "dense"}
    covered = sum(
        int(np.prod(v.shape))
        for block, _, _ in optimizer._attachment.blocks
        if block.kind in wanted
        for v in block.variables
    )
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert covered / total >= 0.95, covered / total
    # The depthwise blocks' per-channel factors: 3x3 windows (no bias), multiplier 1.
    block = next(b for b, _, _ in optimizer._attachment.blocks if b.layer is depthwise[0])
    assert block.statistic_shapes() == {"A": (32, 9, 9), "G": (32, 1, 1)}

"""Numerical checks of the curvature statistics and updates against independent numpy references.

Every reference here is computed from scratch: layer inputs by running the model's layers
one by one, per-example output gradients ``g`` with ``tf.GradientTape`` on the *summed*
per-example loss (= Keras's mean loss times the batch size) w.r.t. the layer's
pre-activation, im2col patches with explicit loops and explicit zero padding, and the
preconditioned step with ``np.kron`` / ``np.linalg.solve``. Conventions are those of
``docs/math.md``: ``A = E_n[sum_t a a^T]`` (bias as a trailing 1), ``G = E_n[mean_t g g^T]``,
Keras kernel layout ``(d_in, d_out)``, gradient matrix ``M = [dKernel; dBias]``.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import linalg

# ---------------------------------------------------------------------------------------
# helpers


def _kfac(**kwargs):
    """K-FAC that makes one step deterministic and easy to reason about."""
    defaults = dict(
        learning_rate=1.0,
        momentum=0.0,
        factor_decay=0.0,
        kl_clip=None,
        damping=1e-3,
        inverse_update_interval=1,
        step_size="fixed", fisher="empirical",
    )
    defaults.update(kwargs)
    return keras_hoopt.KFAC(**defaults)


def _compile(model, loss, run_eagerly=False, **kwargs):
    optimizer = _kfac(**kwargs)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=False, run_eagerly=run_eagerly)
    return optimizer


def _weights(model):
    return {v.path: np.array(v.numpy(), dtype=np.float64) for v in model.trainable_variables}


def _pre_activation(layer, h):
    """The layer's output before its (fused) activation."""
    if isinstance(layer, keras.layers.Conv2D):
        s = layer.convolution_op(h, layer.kernel)
        if layer.use_bias:
            s = s + tf.reshape(layer.bias, (1, 1, 1, -1))
        return s
    s = tf.matmul(h, layer.kernel) if h.shape.rank == 2 else tf.einsum("...i,io->...o", h, layer.kernel)
    if layer.bias is not None:
        s = s + layer.bias
    return s


def _reference_pass(model, x, y, per_example_loss, targets):
    """Inputs and per-example output gradients of the target layers of a Sequential model.

    Returns ``{name: (input, g)}`` as float64 numpy arrays, where ``g`` is the gradient of
    the batch's *summed* per-example loss w.r.t. the layer's pre-activation output
    (BatchNormalization: w.r.t. the layer output). Runs the layers in training mode.
    """
    x = tf.constant(x)
    ins, outs = {}, {}
    with tf.GradientTape() as tape:
        h = x
        for layer in model.layers:
            if layer.name in targets:
                ins[layer.name] = h
                if isinstance(layer, keras.layers.BatchNormalization):
                    s = layer(h, training=True)
                    tape.watch(s)
                    h = s
                else:
                    s = _pre_activation(layer, h)
                    tape.watch(s)
                    h = layer.activation(s)
                outs[layer.name] = s
            else:
                h = layer(h, training=True)
        total = tf.reduce_sum(per_example_loss(tf.constant(y), h))
    names = list(targets)
    grads = tape.gradient(total, [outs[n] for n in names])
    return {n: (ins[n].numpy().astype(np.float64), g.numpy().astype(np.float64)) for n, g in zip(names, grads)}


def _with_bias(rows, use_bias):
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1) if use_bias else rows


def _sce_logits(y, out):  # per-example sparse cross-entropy from logits
    return keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)


def _mse(y, out):
    return keras.losses.mean_squared_error(y, out)


def _assert_close(actual, expected, rtol, what=""):
    """Relative Frobenius-norm closeness (robust for matrices with small entries)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


# ---------------------------------------------------------------------------------------
# 1. Dense factors


def test_dense_factors_match_numpy():
    rng = np.random.default_rng(0)
    batch = 32
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", name="d1"),  # fused activation: G at the pre-activation
            keras.layers.Dense(6, use_bias=False, name="d2"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="d3"),
        ]
    )
    optimizer = _compile(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), learning_rate=1e-3)
    x = rng.normal(size=(batch, 5)).astype("float32")
    y = rng.integers(0, 3, size=batch).astype("int32")
    ref = _reference_pass(model, x, y, _sce_logits, ["d1", "d2", "d3"])
    model.train_on_batch(x, y)
    for name, (a, g) in ref.items():
        a = _with_bias(a, model.get_layer(name).use_bias)
        expected_a = a.T @ a / batch
        expected_g = g.T @ g / batch
        assert optimizer.statistic(name, "A").shape == expected_a.shape
        np.testing.assert_allclose(optimizer.statistic(name, "A"), expected_a, rtol=1e-4, atol=1e-6, err_msg=name)
        # G's entries span orders of magnitude: compare relative to its norm.
        _assert_close(optimizer.statistic(name, "G"), expected_g, 1e-4, f"{name} G")
    assert optimizer.statistic("d2", "A").shape == (4, 4)  # no bias row
    assert optimizer.statistic("d3", "A").shape == (7, 7)  # 6 inputs + bias


def test_dense_on_sequences_sums_locations_in_a_and_averages_in_g():
    rng = np.random.default_rng(1)
    batch, steps = 16, 3
    model = keras.Sequential(
        [
            keras.Input((steps, 4)),
            keras.layers.Dense(5, activation="tanh", name="d"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="out"),
        ]
    )
    optimizer = _compile(model, "mse", learning_rate=1e-3)
    x = rng.normal(size=(batch, steps, 4)).astype("float32")
    y = rng.normal(size=(batch, 3)).astype("float32")
    ref = _reference_pass(model, x, y, _mse, ["d"])
    model.train_on_batch(x, y)
    a, g = ref["d"]
    a = _with_bias(a.reshape(-1, 4), True)
    g = g.reshape(-1, 5)
    np.testing.assert_allclose(optimizer.statistic("d", "A"), a.T @ a / batch, rtol=1e-4, atol=1e-6)
    _assert_close(optimizer.statistic("d", "G"), g.T @ g / (batch * steps), 1e-4, "G")


# ---------------------------------------------------------------------------------------
# 2. Conv2D factors


def _same_padding(size, kernel, stride, dilation):
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2


def _im2col(x, kernel_size, strides, padding, dilation):
    """``[B, T, kh*kw*C]`` patches, row-major over (kh, kw, C) like ``kernel.reshape(-1, C_out)``."""
    batch, height, width, channels = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    if padding == "same":
        out_h, top = _same_padding(height, kh, sh, dh)
        out_w, left = _same_padding(width, kw, sw, dw)
    else:
        out_h = (height - ((kh - 1) * dh + 1)) // sh + 1
        out_w = (width - ((kw - 1) * dw + 1)) // sw + 1
        top = left = 0
    patches = np.zeros((batch, out_h, out_w, kh, kw, channels))
    for oh in range(out_h):
        for ow in range(out_w):
            for i in range(kh):
                for j in range(kw):
                    r, c = oh * sh - top + i * dh, ow * sw - left + j * dw
                    if 0 <= r < height and 0 <= c < width:  # zero padding outside
                        patches[:, oh, ow, i, j, :] = x[:, r, c, :]
    return patches.reshape(batch, out_h * out_w, kh * kw * channels), (out_h, out_w)


CONV_CONFIGS = [
    # kernel, strides, padding, dilation, use_bias
    ((3, 3), (1, 1), "valid", (1, 1), True),
    ((3, 3), (2, 2), "same", (1, 1), True),
    ((2, 3), (1, 1), "same", (1, 1), False),
    ((2, 3), (2, 2), "valid", (1, 1), True),
    ((2, 3), (2, 1), "same", (1, 1), True),
    ((3, 3), (1, 1), "same", (2, 2), True),
    ((3, 2), (1, 1), "valid", (2, 1), False),
]


def _conv_branches_model(input_shape, configs, filters, classes):
    """Parallel Conv2D branches (tanh) on one input, flattened, concatenated, Dense logits.

    One model and one traced step cover every configuration.
    """
    inputs = keras.Input(input_shape)
    convs, flat = [], []
    for k, (kernel, strides, padding, dilation, use_bias) in enumerate(configs):
        conv = keras.layers.Conv2D(
            filters, kernel, strides=strides, padding=padding, dilation_rate=dilation,
            use_bias=use_bias, activation="tanh", name=f"c{k}",
        )
        convs.append(conv)
        flat.append(keras.layers.Flatten()(conv(inputs)))
    head = keras.layers.Dense(classes, name="out")
    return keras.Model(inputs, head(keras.layers.Concatenate()(flat))), convs, head


def _conv_branches_reference(x, y, convs, head):
    """Per-branch pre-activations and per-example output gradients (summed loss)."""
    with tf.GradientTape() as tape:
        pre = [_pre_activation(conv, tf.constant(x)) for conv in convs]
        for s in pre:
            tape.watch(s)
        flat = [tf.reshape(tf.tanh(s), (x.shape[0], -1)) for s in pre]
        total = tf.reduce_sum(_sce_logits(tf.constant(y), head(tf.concat(flat, axis=1))))
    grads = tape.gradient(total, pre)
    return [s.numpy().astype(np.float64) for s in pre], [g.numpy().astype(np.float64) for g in grads]


def test_conv2d_factors_match_numpy_im2col():
    rng = np.random.default_rng(2)
    batch, c_in, c_out = 6, 2, 3
    model, convs, head = _conv_branches_model((7, 6, c_in), CONV_CONFIGS, c_out, 3)
    # Eager train step: tracing seven Conv2D blocks costs ~10 s, and the patch extraction under
    # test is the same code in both modes (the traced path is covered by the Conv2D step and
    # BatchNorm tests).
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = _compile(model, loss, run_eagerly=True, learning_rate=1e-3)
    x = rng.normal(size=(batch, 7, 6, c_in)).astype("float32")
    y = rng.integers(0, 3, size=batch).astype("int32")
    pre, grads = _conv_branches_reference(x, y, convs, head)  # weights before the step
    kernels = [conv.kernel.numpy().reshape(-1, c_out).astype(np.float64) for conv in convs]
    biases = [conv.bias.numpy().astype(np.float64) if conv.use_bias else 0.0 for conv in convs]
    model.train_on_batch(x, y)

    for conv, config, s, g, kernel_matrix, bias in zip(convs, CONV_CONFIGS, pre, grads, kernels, biases):
        kernel, strides, padding, dilation, use_bias = config
        patches, (out_h, out_w) = _im2col(x.astype(np.float64), kernel, strides, padding, dilation)
        locations = out_h * out_w
        assert g.shape == (batch, out_h, out_w, c_out), config
        # The reference patches reproduce Keras's convolution (validates ordering and padding).
        np.testing.assert_allclose((patches @ kernel_matrix + bias).reshape(s.shape), s, rtol=1e-4, atol=1e-5)
        rows = _with_bias(patches.reshape(batch * locations, -1), use_bias)
        expected_a = rows.T @ rows / batch  # sum over locations, mean over examples
        g_rows = g.reshape(batch * locations, c_out)
        expected_g = g_rows.T @ g_rows / (batch * locations)  # mean over locations and examples
        assert optimizer.statistic(conv.name, "A").shape == expected_a.shape, config
        _assert_close(optimizer.statistic(conv.name, "A"), expected_a, 1e-5, f"A {config}")
        _assert_close(optimizer.statistic(conv.name, "G"), expected_g, 1e-4, f"G {config}")


# ---------------------------------------------------------------------------------------
# 3. BatchNormalization unit-wise Fisher (and its preconditioned step)


def _bn_unit_gradients(bn_input, delta, epsilon, scale=True, center=True):
    """``[B, C, k]`` per-example (g_gamma, g_beta) with batch-statistics xhat."""
    axes = tuple(range(bn_input.ndim - 1))
    mean = bn_input.mean(axis=axes)
    var = bn_input.var(axis=axes)  # biased, as Keras
    xhat = (bn_input - mean) / np.sqrt(var + epsilon)
    spatial = tuple(range(1, bn_input.ndim - 1))
    parts = []
    if scale:
        parts.append((xhat * delta).sum(axis=spatial) if spatial else xhat * delta)
    if center:
        parts.append(delta.sum(axis=spatial) if spatial else delta)
    return np.stack(parts, axis=-1)


@pytest.mark.parametrize(
    "after,scale,center",
    [("conv", True, True), ("dense", True, False)],  # (gamma, beta) 2x2 blocks; gamma-only 1x1 blocks
)
def test_batchnorm_unitwise_fisher_and_step(after, scale, center):
    rng = np.random.default_rng(3)
    batch, damping = 24, 1e-2
    if after == "conv":
        front = [keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, name="c")]
        x = rng.normal(size=(batch, 5, 5, 2)).astype("float32")
    else:
        front = [keras.Input((4,)), keras.layers.Dense(3, name="c")]
        x = rng.normal(size=(batch, 4)).astype("float32")
    model = keras.Sequential(
        front
        + [
            keras.layers.BatchNormalization(
                scale=scale, center=center, name="bn",
                gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5),
                beta_initializer=keras.initializers.RandomNormal(stddev=0.3),
            ),
            keras.layers.Activation("tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="out"),
        ]
    )
    optimizer = _compile(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), damping=damping)
    y = rng.integers(0, 3, size=batch).astype("int32")
    bn = model.get_layer("bn")
    before = [v.numpy().astype(np.float64) for v in bn.trainable_variables]
    ref = _reference_pass(model, x, y, _sce_logits, ["bn"])
    model.train_on_batch(x, y)

    bn_input, delta = ref["bn"]
    u = _bn_unit_gradients(bn_input, delta, bn.epsilon, scale, center)  # [B, C, k]
    k = int(scale) + int(center)
    expected_f = np.einsum("nci,ncj->cij", u, u) / batch
    f = optimizer.statistic("bn", "F")
    assert f.shape == (3, k, k)
    _assert_close(f, expected_f, 1e-4, "F")
    np.testing.assert_allclose(f, expected_f, rtol=1e-3, atol=1e-5 * np.abs(expected_f).max())
    # One step (lr 1, momentum 0): delta(gamma, beta)_c = -(F_c + lambda I)^-1 grad_c.
    grad = u.mean(axis=0)  # d(mean loss)/d(gamma, beta) = E_n[per-example gradient]
    step = -np.linalg.solve(expected_f + damping * np.eye(k), grad[..., None])[..., 0]
    after_values = [v.numpy().astype(np.float64) for v in bn.trainable_variables]
    moved = np.stack([a - b for a, b in zip(after_values, before)], axis=-1)
    _assert_close(moved, step, 2e-3, "BN step")


# ---------------------------------------------------------------------------------------
# 4./5. Preconditioned step vs a dense Kronecker solve


def _kron_step(a_factor, g_factor, m, damping):
    """``-(kron(A + pi sqrt(l) I, G + sqrt(l)/pi I))^-1 vec(M)`` in the ``(d_in, d_out)`` layout.

    ``M[i, o]`` is row-major flattened: index ``i * d_out + o`` -- the column-stacked vec of
    the ``(out x in)`` weight ``W = M^T``, for which the Fisher block is ``A (x) G``.
    """
    d_in, d_out = m.shape
    pi = np.sqrt((np.trace(a_factor) / d_in) / (np.trace(g_factor) / d_out))
    root = np.sqrt(damping)
    big = np.kron(a_factor + pi * root * np.eye(d_in), g_factor + root / pi * np.eye(d_out))
    return -np.linalg.solve(big, m.reshape(-1)).reshape(d_in, d_out)


def _kernel_and_bias_change(layer, before, after):
    parts = [after[v.path] - before[v.path] for v in layer.trainable_variables]
    kernel = parts[0].reshape(-1, parts[0].shape[-1])
    return np.concatenate([kernel, parts[1][None]], axis=0) if len(parts) == 2 else kernel


def _dense_step_setup(seed):
    rng = np.random.default_rng(seed)
    batch = 64
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )
    x = rng.normal(size=(batch, 4)).astype("float32")
    y = rng.normal(size=(batch, 3)).astype("float32")
    return model, x, y


def test_dense_step_equals_dense_kronecker_solve():
    damping = 0.05  # large enough that the damping terms matter
    model, x, y = _dense_step_setup(4)
    _compile(model, "mse", damping=damping)
    batch = x.shape[0]
    ref = _reference_pass(model, x, y, _mse, ["d1", "d2"])
    before = _weights(model)
    model.train_on_batch(x, y)
    after = _weights(model)
    for name in ["d1", "d2"]:
        a, g = ref[name]
        a = _with_bias(a, True)
        a_factor, g_factor = a.T @ a / batch, g.T @ g / batch
        m = a.T @ g / batch  # [dKernel; dBias] of the mean loss
        expected = _kron_step(a_factor, g_factor, m, damping)
        _assert_close(_kernel_and_bias_change(model.get_layer(name), before, after), expected, 1e-4, name)


def test_dense_step_with_tiny_damping_is_exact_kfac():
    model, x, y = _dense_step_setup(5)
    _compile(model, "mse", damping=1e-12)
    batch = x.shape[0]
    ref = _reference_pass(model, x, y, _mse, ["d1", "d2"])
    before = _weights(model)
    model.train_on_batch(x, y)
    after = _weights(model)
    for name in ["d1", "d2"]:
        a, g = ref[name]
        a = _with_bias(a, True)
        a_factor, g_factor = a.T @ a / batch, g.T @ g / batch
        assert np.linalg.cond(a_factor) < 1e3 and np.linalg.cond(g_factor) < 1e3  # well conditioned data
        m = a.T @ g / batch
        expected = -np.linalg.solve(a_factor, m) @ np.linalg.inv(g_factor)  # -(A^-1 M G^-1)
        moved = _kernel_and_bias_change(model.get_layer(name), before, after)
        _assert_close(moved, expected, 1e-4, name)
        # The same thing in the (out x in) layout of the docs: -(G^-1 dW A^-1).
        _assert_close(moved.T, -np.linalg.inv(g_factor) @ m.T @ np.linalg.inv(a_factor), 1e-4, name)


def test_conv2d_step_equals_dense_kronecker_solve():
    rng = np.random.default_rng(6)
    batch, damping, classes = 16, 1e-3, 4
    configs = [((3, 3), (1, 1), "same", (1, 1), True), ((3, 3), (1, 1), "valid", (1, 1), False)]
    model, convs, head = _conv_branches_model((5, 5, 2), configs, 3, classes)
    _compile(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), damping=damping)
    x = rng.normal(size=(batch, 5, 5, 2)).astype("float32")
    y = rng.integers(0, classes, size=batch).astype("int32")
    _, grads = _conv_branches_reference(x, y, convs, head)
    before = _weights(model)
    model.train_on_batch(x, y)
    after = _weights(model)
    for conv, (kernel, strides, padding, dilation, use_bias), g in zip(convs, configs, grads):
        patches, (out_h, out_w) = _im2col(x.astype(np.float64), kernel, strides, padding, dilation)
        locations = out_h * out_w
        rows = _with_bias(patches.reshape(batch * locations, -1), use_bias)
        g_rows = g.reshape(batch * locations, 3)
        a_factor = rows.T @ rows / batch
        g_factor = g_rows.T @ g_rows / (batch * locations)
        m = rows.T @ g_rows / batch  # gradient of the mean loss: (1/B) sum_n sum_t a g^T
        expected = _kron_step(a_factor, g_factor, m, damping)
        _assert_close(_kernel_and_bias_change(conv, before, after), expected, 1e-4, conv.name)


# ---------------------------------------------------------------------------------------
# 6. Linear least squares: Monte-Carlo K-FAC is Newton's method


def _least_squares_problem():
    rng = np.random.default_rng(7)
    batch, d_in, d_out = 4096, 6, 3
    x = rng.normal(size=(batch, d_in)) @ rng.normal(scale=0.5, size=(d_in, d_in)) + rng.normal(size=d_in)
    w_true = rng.normal(scale=2.0, size=(d_in, d_out))
    y = x @ w_true + 1.5 + 0.1 * rng.normal(size=(batch, d_out))
    x, y = x.astype("float32"), y.astype("float32")
    design = np.concatenate([x, np.ones((batch, 1))], axis=1).astype(np.float64)
    optimum = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]  # [W; b], (d_in + 1, d_out)
    return x, y, optimum


def _one_least_squares_step(fisher):
    x, y, optimum = _least_squares_problem()
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(y.shape[1], name="d")])
    optimizer = _compile(model, "mse", fisher=fisher, damping=1e-12, seed=11)
    layer = model.get_layer("d")
    start = np.concatenate([layer.kernel.numpy(), layer.bias.numpy()[None]], axis=0).astype(np.float64)
    model.train_on_batch(x, y)
    end = np.concatenate([layer.kernel.numpy(), layer.bias.numpy()[None]], axis=0).astype(np.float64)
    relative = np.linalg.norm(end - optimum) / np.linalg.norm(start - optimum)
    return relative, optimizer.statistic("d", "G"), x.shape[0], y.shape[1]


def test_mc_fisher_one_step_solves_linear_least_squares():
    # Keras MSE per example: (1/D) ||s - y||^2, Hessian w.r.t. s: (2/D) I. fisher.py samples
    # y ~ N(s, sigma^2 I) with sigma^2 = D/2 and back-propagates (1/D) ||y - s||^2, so
    # g = -(2/D) eps and E[g g^T] = (4/D^2)(D/2) I = (2/D) I: exactly the Hessian. The
    # gradient is M = E[a g_true^T] = (2/D) A (W0 - W*), so A^-1 M G^-1 = (W0 - W*) up to
    # the sampling error of G (relative ~ sqrt(2/B) ~ 2% at B = 4096). D = 3 on purpose:
    # for D = 2, using sigma = D/2 instead of sigma^2 = D/2 would go unnoticed.
    relative, g_factor, batch, d_out = _one_least_squares_step("mc")
    expected_g = 2.0 / d_out * np.eye(d_out)
    # G within ~5 standard errors of its expectation (std of an entry ~ (2/D) sqrt(2/B)).
    tolerance = 5 * (2.0 / d_out) * np.sqrt(2.0 / batch)
    assert np.abs(g_factor - expected_g).max() < tolerance, g_factor
    assert relative < 0.1, relative


def test_empirical_fisher_one_step_does_not_solve_least_squares():
    relative, g_factor, _, d_out = _one_least_squares_step("empirical")
    # The empirical G is (4/D^2) E[r r^T] of the (large) residuals at the start: not 2/D I.
    assert np.trace(g_factor) > 5 * 2.0
    assert relative > 0.5, relative


# ---------------------------------------------------------------------------------------
# 7. linalg


def test_damped_inverse_matches_numpy():
    for size in [1, 3, 5, 8]:  # random SPD matrices (closed form for size 1, Cholesky otherwise)
        rng = np.random.default_rng(size)
        m = rng.normal(size=(3 * size + 2, size))
        m = (m.T @ m / m.shape[0]).astype("float32")
        inverse, ok = linalg.damped_inverse(tf.constant(m), 0.05)
        assert bool(ok)
        expected = np.linalg.inv(m.astype(np.float64) + 0.05 * np.eye(size))
        np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=str(size))

    # A batch of 2x2 blocks (closed form), one of them singular without damping.
    rng = np.random.default_rng(8)
    v = rng.normal(size=(7, 5, 2))
    m = np.einsum("cni,cnj->cij", v, v) / 5
    m[3] = [[1.0, 1.0], [1.0, 1.0]]
    inverse, ok = linalg.damped_inverse(tf.constant(m, tf.float32), 1e-2)
    assert bool(ok) and inverse.shape == (7, 2, 2)
    np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(m + 1e-2 * np.eye(2)), rtol=1e-3, atol=1e-4)
    a, b, d = m[0, 0, 0] + 1e-2, m[0, 0, 1], m[0, 1, 1] + 1e-2  # [[d, -b], [-b, a]] / det
    np.testing.assert_allclose(inverse.numpy()[0], np.array([[d, -b], [-b, a]]) / (a * d - b * b), rtol=1e-4)

    # Fully NaN input: every attempt fails.
    for size in [1, 2, 4]:
        _, ok = linalg.damped_inverse(tf.fill((size, size), float("nan")), 0.1)
        assert not bool(ok), size


def _with_eigenvalues(eigenvalues, seed=9):
    size = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    return (q * np.asarray(eigenvalues)) @ q.T


def _check_retries(eigenvalues, damped_inverse=linalg.damped_inverse):
    size = len(eigenvalues)
    m = _with_eigenvalues(eigenvalues)
    # damping 0.1 leaves eigenvalue -0.4: not PD -> retried at 1.0 (eigenvalue 0.5): fine.
    inverse, ok = damped_inverse(tf.constant(m, tf.float32), tf.constant(0.1))
    assert bool(ok)
    np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(m + 1.0 * np.eye(size)), rtol=1e-4, atol=1e-5)
    # eigenvalue -5: 0.1 and 1 fail, the third attempt (damping 10) succeeds.
    m5 = _with_eigenvalues([-5.0] + list(eigenvalues[1:]))
    inverse, ok = damped_inverse(tf.constant(m5, tf.float32), tf.constant(0.1))
    assert bool(ok)
    np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(m5 + 10.0 * np.eye(size)), rtol=1e-4, atol=1e-5)
    # eigenvalue -500: 0.1, 1, 10, 100 all fail -> ok False.
    m500 = _with_eigenvalues([-500.0] + list(eigenvalues[1:]))
    _, ok = damped_inverse(tf.constant(m500, tf.float32), tf.constant(0.1))
    assert not bool(ok)


def test_damped_inverse_retries_with_more_damping():
    _check_retries([-0.5, 1.0, 2.0])  # Cholesky path
    _check_retries([-0.5, 1.5])  # 2x2 closed form
    _check_retries([-0.5, 1.0, 2.0], tf.function(linalg.damped_inverse))  # in a graph (tf.while_loop)


@pytest.mark.parametrize("size", [512, 777, 1100])
def test_large_damped_inverses_by_halves_match_numpy_and_the_whole_matrix_inverse(size):
    """From BLOCKED_INVERSE_MIN_SIZE rows on the inverse is formed by halves: against numpy's float64
    inverse, on a factor with a decaying spectrum (condition 1e4 after damping) and odd halves
    (777 -> 388 + 389), and against the whole-matrix L^-T L^-1 (depth 0): the same to float32 rounding.
    A batch of such factors inverts each."""
    rng = np.random.default_rng(size)
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    m = (q * np.geomspace(1.0, 1e-6, size)) @ q.T
    expected = np.linalg.inv(m + 1e-4 * np.eye(size))
    inverse, ok = linalg.damped_inverse(tf.constant(m, tf.float32), 1e-4)
    assert bool(ok)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(inverse.numpy(), expected, atol=3e-4 * scale)
    np.testing.assert_array_equal(inverse.numpy(), inverse.numpy().T)
    damped = tf.constant(m + 1e-4 * np.eye(size), tf.float32)
    chol = tf.linalg.cholesky(damped)
    whole = tf.linalg.triangular_solve(chol, tf.eye(size), lower=True)
    np.testing.assert_allclose(inverse.numpy(), tf.matmul(whole, whole, transpose_a=True).numpy(), atol=3e-4 * scale)
    batch = np.stack([m, 2.0 * m + np.eye(size)])
    inverse, ok = linalg.damped_inverse(tf.constant(batch, tf.float32), 1e-4)
    assert bool(ok) and inverse.shape == (2, size, size)
    np.testing.assert_allclose(inverse.numpy()[1], np.linalg.inv(batch[1] + 1e-4 * np.eye(size)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_the_halves_are_numpys_triangular_inverse_and_gram(depth):
    """L^-1 and L^T L by halves (odd sizes, one and two levels) against numpy on a random lower-triangular L."""
    rng = np.random.default_rng(depth)
    size = 2 * linalg.BLOCKED_INVERSE_MIN_SIZE + 3
    lower = np.tril(rng.normal(size=(size, size))) * 0.1 + np.diag(rng.uniform(1.0, 2.0, size))
    got = linalg._lower_triangular_inverse(tf.constant(lower, tf.float32), depth).numpy()
    expected = np.linalg.inv(lower)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(got, np.tril(got))
    gram = linalg._lower_gram(tf.constant(lower, tf.float32), depth).numpy()
    np.testing.assert_allclose(gram, lower.T @ lower, rtol=1e-4, atol=1e-4)


def test_large_damped_inverses_retry_and_report_failure():
    _check_retries([-0.5, 1.0, 2.0] + [1.5] * 600)


def test_damped_inverse_retries_for_1x1():
    _check_retries([-0.5])


def test_pi_damping_formula_and_fallback():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(20, 5))
    a = a.T @ a / 20
    g = 0.01 * np.diag([1.0, 2.0, 3.0])
    pi = float(linalg.pi_damping(tf.constant(a, tf.float32), tf.constant(g, tf.float32)))
    assert pi == pytest.approx(np.sqrt((np.trace(a) / 5) / (np.trace(g) / 3)), rel=1e-5)
    zero = tf.zeros((3, 3))
    assert float(linalg.pi_damping(tf.constant(a, tf.float32), zero)) == 1.0
    assert float(linalg.pi_damping(zero, tf.constant(g, tf.float32))) == 1.0
    assert float(linalg.pi_damping(tf.fill((2, 2), float("nan")), tf.eye(2))) == 1.0


# ---------------------------------------------------------------------------------------
# 8. Monte-Carlo Fisher: E over sampled labels of G = exact expected Fisher (GGN)


@pytest.mark.parametrize("kind", ["softmax_logits", "softmax_probs", "sigmoid_logits"])
def test_mc_fisher_matches_exact_expected_fisher(kind):
    rng = np.random.default_rng(12)
    batch, repeats, outputs = 2048, 6, 4
    activation = "softmax" if kind == "softmax_probs" else None
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", name="h"),
            keras.layers.Dense(outputs, activation=activation, name="out",
                               kernel_initializer=keras.initializers.RandomNormal(stddev=0.7)),
        ]
    )
    if kind == "sigmoid_logits":
        loss = keras.losses.BinaryCrossentropy(from_logits=True)  # mean over the D outputs
        y = np.zeros((batch, outputs), "float32")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=kind == "softmax_logits")
        y = np.zeros(batch, "int32")  # the training labels must not matter for fisher="mc"
    # learning rate 0: the weights (hence the predictive distribution) stay fixed, and each
    # step draws fresh labels (the sampler seed includes the step), so the mean of the
    # per-step batch statistics is a (repeats * batch)-sample Monte-Carlo estimate.
    optimizer = _compile(model, loss, fisher="mc", learning_rate=0.0, seed=5)
    x = rng.normal(size=(batch, 5)).astype("float32")
    samples = {"h": [], "out": []}
    for _ in range(repeats):
        model.train_on_batch(x, y)
        for name in samples:
            samples[name].append(optimizer.statistic(name, "G").astype(np.float64))

    h_layer, out_layer = model.get_layer("h"), model.get_layer("out")
    w_h, b_h = h_layer.kernel.numpy().astype(np.float64), h_layer.bias.numpy().astype(np.float64)
    w_o, b_o = out_layer.kernel.numpy().astype(np.float64), out_layer.bias.numpy().astype(np.float64)
    hidden = np.tanh(x @ w_h + b_h)
    logits = hidden @ w_o + b_o  # the tapped pre-activation of "out"
    if kind == "sigmoid_logits":
        # Keras BCE averages over D outputs: Hessian w.r.t. the logits is diag(p (1 - p)) / D.
        p = 1.0 / (1.0 + np.exp(-logits))
        hessian = np.einsum("ni,ij->nij", p * (1.0 - p), np.eye(outputs)) / outputs
    else:
        # E over y ~ softmax(logits) of (p - e_y)(p - e_y)^T = diag(p) - p p^T (exact enumeration).
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        onehots = np.eye(outputs)
        hessian = np.einsum("nk,nki,nkj->nij", p, p[:, None, :] - onehots, p[:, None, :] - onehots)
        np.testing.assert_allclose(hessian, np.einsum("ni,ij->nij", p, onehots) - np.einsum("ni,nj->nij", p, p), atol=1e-12)
        assert p.max(axis=1).mean() < 0.8  # not peaked: sampling differs clearly from the argmax
    exact_out = hessian.mean(axis=0)
    jac = w_o.T[None] * (1.0 - hidden**2)[:, None, :]  # d logits / d s_h: [B, outputs, 6]
    exact_h = np.einsum("nci,ncd,ndj->ij", jac, hessian, jac) / batch

    for name, exact in [("out", exact_out), ("h", exact_h)]:
        estimate = np.mean(samples[name], axis=0)
        error = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
        # 12288 samples: observed ~1-1.5% here; 4% is several standard errors.
        assert error < 0.04, (name, error)
    assert not np.allclose(samples["out"][0], samples["out"][1])  # fresh labels at each step
    if kind != "sigmoid_logits":
        # Discrimination: labels at the argmax, or the training labels, give a clearly different G.
        for labels in [p.argmax(axis=1), y]:
            residual = p - np.eye(outputs)[labels]
            wrong = residual.T @ residual / batch
            assert np.linalg.norm(wrong - exact_out) / np.linalg.norm(exact_out) > 0.2


@pytest.mark.parametrize(
    "loss",
    [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.SparseCategoricalCrossentropy(),
        keras.losses.BinaryCrossentropy(from_logits=True),
        keras.losses.BinaryCrossentropy(),
        keras.losses.MeanSquaredError(),
    ],
    ids=["softmax_logits", "softmax_probs", "sigmoid_logits", "sigmoid_probs", "mse"],
)
def test_mc_sampler_draws_what_the_tfp_distributions_draw(loss):
    # The sampler is written in plain TF ops (importing TFP cost ~0.9 s of every first compile).
    # Reference: the same draw from tensorflow_probability's distributions with the same stateless
    # seed, and the sampled loss from their log_prob: equal bit for bit, gradient included.
    import tensorflow_probability as tfp

    from keras_hoopt.fisher import make_output_sampler

    tfd = tfp.distributions
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(64, 5)).astype("float32")
    name = type(loss).__name__
    from_logits = getattr(loss, "_fn_kwargs", {}).get("from_logits", False)
    if name.startswith("Sparse") and not from_logits:
        y_pred = tf.nn.softmax(raw)
    elif name.startswith("Binary") and not from_logits:
        y_pred = tf.sigmoid(raw)
    else:
        y_pred = tf.constant(raw)
    seed = tf.constant([7, 11], tf.int64)
    sampler = make_output_sampler(loss)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(y_pred)
        ours = sampler(y_pred, seed)
        width = tf.sqrt(5.0)
        if name.startswith("Sparse"):
            logits = y_pred if from_logits else tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0))
            dist = tfd.Categorical(logits=logits)
            labels = tf.stop_gradient(dist.sample(seed=tf.cast(seed, tf.int32)))
            reference = -tf.reduce_sum(dist.log_prob(labels))
        elif name.startswith("Binary"):
            dist = (tfd.Bernoulli(logits=y_pred, dtype=tf.float32) if from_logits
                    else tfd.Bernoulli(probs=tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7), dtype=tf.float32))
            labels = tf.stop_gradient(dist.sample(seed=tf.cast(seed, tf.int32)))
            reference = -tf.reduce_sum(dist.log_prob(labels)) / width
        else:
            noise = tfd.Normal(0.0, 1.0).sample(tf.shape(y_pred), seed=tf.cast(seed, tf.int32)) * tf.sqrt(2.5)
            labels = tf.stop_gradient(y_pred + noise)
            reference = tf.reduce_sum(tf.square(labels - y_pred)) / 5.0
    assert float(ours) == float(reference)
    np.testing.assert_array_equal(tape.gradient(ours, y_pred).numpy(), tape.gradient(reference, y_pred).numpy())
    other = sampler(y_pred, seed + 1)
    assert float(other) != float(ours)  # the draw follows the seed


def test_building_a_curvature_optimizer_does_not_import_tensorflow_probability():
    code = (
        "import sys, keras, keras_hoopt\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        "m.compile(optimizer=keras_hoopt.SPNGD(), loss='sparse_categorical_crossentropy')\n"
        "m.train_on_batch(__import__('numpy').ones((4, 3), 'float32'), __import__('numpy').zeros(4, 'int32'))\n"
        "assert m.optimizer.fisher == 'mc', m.optimizer.fisher\n"
        "assert 'tensorflow_probability' not in sys.modules\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_damped_inverse_of_a_batch_with_a_damping_per_matrix_matches_numpy():
    # The depthwise blocks' case: [C, n, n] with damping [C, 1, 1], through the one shared graph function.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 4))
    m = np.einsum("cij,ckj->cik", x, x) / 4
    damping = np.array([1e-2, 1e-1, 1.0])
    inverse, ok = linalg.damped_inverse(tf.constant(m, tf.float32), tf.constant(damping[:, None, None], tf.float32))
    assert bool(ok) and inverse.shape == (3, 6, 6)
    for c in range(3):
        np.testing.assert_allclose(inverse[c], np.linalg.inv(m[c] + damping[c] * np.eye(6)), rtol=2e-4, atol=1e-4)

"""The eigenbasis (EKFAC) preconditioner form against independent numpy computations.

References are built from scratch: per-example rows ``a_n = [x_n, 1]`` and output gradients
``g_n = d loss_n / d s_n`` (softmax cross-entropy: ``p_n - onehot(y_n)``), the factors
``A = a^T a / N``, ``G = g^T g / N``, their ``np.linalg.eigh`` bases, the exact empirical Fisher
``mean_n vec(a_n g_n^T) vec(a_n g_n^T)^T`` and dense ``np.kron`` solves.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_hoopt
from keras_hoopt.blocks import eigenbasis
from keras_hoopt.blocks.dense import DenseBlock

IN, OUT, N = 5, 3, 64


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, IN)).astype("float32")
    y = rng.integers(0, OUT, size=N)
    return x, y


def _softmax_regression():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((IN,)), keras.layers.Dense(OUT, name="out")])


def _rows(model, x, y):
    """Per-example ``a_n`` (bias column appended) and ``g_n`` of the softmax regression, float64."""
    kernel, bias = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    a = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    logits = x.astype(np.float64) @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(OUT)[y]
    return a, g


def _random_spd(rng, size, spread):
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    return (q * np.geomspace(1.0, spread, size)) @ q.T


def test_the_eigenbasis_form_is_kfac_when_its_diagonal_is_the_kronecker_product_of_the_factor_eigenvalues():
    rng = np.random.default_rng(0)
    a, g = _random_spd(rng, IN + 1, 50.0), _random_spd(rng, OUT, 20.0)
    gradient = rng.normal(size=(IN + 1, OUT))
    damping = 1e-2
    layer = keras.layers.Dense(OUT)
    layer.build((None, IN))
    block = DenseBlock(layer)
    statistics = {"A": tf.constant(a, tf.float32), "G": tf.constant(g, tf.float32)}
    # K-FAC with factored Tikhonov damping, through the block's own inverses...
    inverses = {name: block.compute_inverse(name, statistics, damping)[0] for name in ("A", "G")}
    kfac = (inverses["A"] @ tf.constant(gradient, tf.float32) @ inverses["G"]).numpy()
    # ...equals a dense Kronecker solve (row-major vec: (A (x) G) vec(M) = vec(A M G))...
    pi = np.sqrt((np.trace(a) / (IN + 1)) / (np.trace(g) / OUT))
    damped = np.kron(a + pi * np.sqrt(damping) * np.eye(IN + 1), g + np.sqrt(damping) / pi * np.eye(OUT))
    np.testing.assert_allclose(kfac.reshape(-1), np.linalg.solve(damped, gradient.reshape(-1)), rtol=2e-4, atol=1e-6)
    # ...and the eigenbasis form with S = (a + pi sqrt(l)) (x) (g + sqrt(l)/pi) - l gives the same step.
    form = eigenbasis.with_eigenbasis(block)
    state = {name: form.compute_preconditioner(name, statistics, damping)[0] for name in ("A", "G")}
    ea, eg = np.linalg.eigvalsh(a), np.linalg.eigvalsh(g)
    np.testing.assert_allclose(state["A"]["eigenvalues"].numpy(), ea, rtol=1e-4)
    diagonal = np.outer(ea + pi * np.sqrt(damping), eg + np.sqrt(damping) / pi) - damping
    state["running"] = {"diagonal": tf.constant(diagonal, tf.float32), "damping": tf.constant(damping)}
    kernel_grad = tf.constant(gradient[:-1], tf.float32)
    bias_grad = tf.constant(gradient[-1], tf.float32)
    out = form.apply_preconditioner([kernel_grad, bias_grad], state)
    np.testing.assert_allclose(np.concatenate([out[0].numpy(), out[1].numpy()[None]]), kfac, rtol=2e-4, atol=1e-6)
    # With K-FAC's own diagonal a (x) g and Tikhonov damping it is the exact damped Kronecker inverse.
    state["running"]["diagonal"] = eigenbasis.kronecker_diagonal(state["A"]["eigenvalues"], state["G"]["eigenvalues"])
    out = form.apply_preconditioner([kernel_grad, bias_grad], state)
    exact = np.linalg.solve(np.kron(a, g) + damping * np.eye((IN + 1) * OUT), gradient.reshape(-1))
    np.testing.assert_allclose(np.concatenate([out[0].numpy(), out[1].numpy()[None]]).reshape(-1), exact,
                               rtol=2e-3, atol=1e-5)


def test_ekfacs_fisher_is_closer_to_the_exact_empirical_fisher_than_kfacs():
    """George et al.'s claim, checked: in the same basis, S is the Frobenius-optimal diagonal."""
    model = _softmax_regression()
    x, y = _data()
    a_rows, g_rows = _rows(model, x, y)
    per_example = np.einsum("ni,no->nio", a_rows, g_rows).reshape(N, -1)
    fisher = per_example.T @ per_example / N
    a, g = a_rows.T @ a_rows / N, g_rows.T @ g_rows / N
    (ea, qa), (eg, qg) = np.linalg.eigh(a), np.linalg.eigh(g)
    s = eigenbasis.rotated_second_moment(
        tf.constant(a_rows, tf.float32), tf.constant(g_rows, tf.float32), tf.constant(qa, tf.float32),
        tf.constant(qg, tf.float32), float(N),
    ).numpy()
    q = np.kron(qa, qg)
    np.testing.assert_allclose(s.reshape(-1), np.diag(q.T @ fisher @ q), rtol=1e-3, atol=1e-7)
    ekfac = q @ np.diag(s.reshape(-1)) @ q.T
    kfac = np.kron(a, g)
    # Q^T (A (x) G) Q = diag(a (x) g), so the errors differ by exactly the diagonals' distance (Pythagoras).
    gap = np.sum((s - np.outer(ea, eg)) ** 2)
    assert gap > 1e-3 * np.sum(s ** 2)
    np.testing.assert_allclose(np.sum((fisher - ekfac) ** 2), np.sum((fisher - kfac) ** 2) - gap, rtol=1e-3)


def _ekfac(**kwargs):
    config = dict(learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=1e-3,
                  inverse_update_interval=1, step_size="fixed", fisher="empirical", preconditioner="eigenbasis")
    config.update(kwargs)
    return keras_hoopt.KFAC(**config)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_eigenbasis_step_matches_numpy_ekfac(jit_compile):
    model = _softmax_regression()
    x, y = _data()
    optimizer = _ekfac()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    a_rows, g_rows = _rows(model, x, y)
    before = np.concatenate([v.numpy().reshape(-1, OUT) for v in model.trainable_variables]).astype(np.float64)
    model.train_on_batch(x, y)
    after = np.concatenate([v.numpy().reshape(-1, OUT) for v in model.trainable_variables]).astype(np.float64)
    (_, qa), (_, qg) = np.linalg.eigh(a_rows.T @ a_rows / N), np.linalg.eigh(g_rows.T @ g_rows / N)
    s = ((a_rows @ qa) ** 2).T @ ((g_rows @ qg) ** 2) / N
    gradient = a_rows.T @ g_rows / N
    expected = -qa @ ((qa.T @ gradient @ qg) / (s + 1e-3)) @ qg.T
    np.testing.assert_allclose(after - before, expected, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(optimizer._running[0]["diagonal"].numpy(), s, rtol=1e-3, atol=1e-7)
    assert [row["form"] for row in optimizer.curvature_summary()] == ["eigenbasis"]


def test_a_new_basis_restarts_the_diagonal_from_kfacs_and_the_fold_follows_the_batch():
    """factor_decay=0.5: after the first step S = 0.5 (a (x) g) + 0.5 S_batch in the new basis; without
    a refresh the next step folds S <- 0.5 S + 0.5 S_batch in the same basis."""
    model = _softmax_regression()
    x, y = _data()
    optimizer = _ekfac(factor_decay=0.5, learning_rate=0.1, inverse_update_interval=3)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    a_rows, g_rows = _rows(model, x[:32], y[:32])
    model.train_on_batch(x[:32], y[:32])
    a, g = a_rows.T @ a_rows / 32, g_rows.T @ g_rows / 32
    (ea, qa), (eg, qg) = np.linalg.eigh(a), np.linalg.eigh(g)
    first = 0.5 * np.outer(np.maximum(ea, 0), np.maximum(eg, 0)) + 0.5 * ((a_rows @ qa) ** 2).T @ ((g_rows @ qg) ** 2) / 32
    np.testing.assert_allclose(optimizer._running[0]["diagonal"].numpy(), first, rtol=2e-3, atol=1e-7)
    a_rows, g_rows = _rows(model, x[32:], y[32:])
    model.train_on_batch(x[32:], y[32:])  # statistics due, basis not (interval 3)
    second = 0.5 * first + 0.5 * ((a_rows @ qa) ** 2).T @ ((g_rows @ qg) ** 2) / 32
    np.testing.assert_allclose(optimizer._running[0]["diagonal"].numpy(), second, rtol=2e-3, atol=1e-7)


def test_the_eigenbasis_trains_a_cnn_with_batchnorm_and_survives_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(2, name="out"),
    ])
    optimizer = keras_hoopt.SPNGD(preconditioner="eigenbasis")
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    assert {row["layer"]: row["form"] for row in optimizer.curvature_summary()} == {
        "conv": "eigenbasis", "bn": "kronecker", "out": "eigenbasis"
    }
    assert optimizer.health_summary()["skipped_steps"] == 0
    assert optimizer.get_config()["preconditioner"] == "eigenbasis"
    path = tmp_path / "run.keras"
    keras_hoopt.save_model(model, path)
    loaded = keras_hoopt.load_model(path)
    assert loaded.optimizer.preconditioner == "eigenbasis"
    for name, running in optimizer._running.items():
        np.testing.assert_array_equal(loaded.optimizer._running[name]["diagonal"].numpy(), running["diagonal"].numpy())
    model.train_on_batch(x[:32], y[:32])  # one more step from the checkpoint lands on the same weights
    loaded.train_on_batch(x[:32], y[:32])
    for continued, resumed in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(resumed, continued, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, error", [
    (lambda: keras_hoopt.SPNGD(preconditioner="eigen"), "preconditioner"),
    (lambda: keras_hoopt.KFAC(preconditioner=None), "preconditioner"),
])
def test_bad_preconditioner_values_are_refused_by_name(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_thor_needs_split_dim_none_for_the_eigenbasis():
    model = _softmax_regression()
    x, y = _data()
    with pytest.raises(ValueError, match="split_dim=None"):
        keras_hoopt.THOR(preconditioner="eigenbasis")
    optimizer = keras_hoopt.THOR(preconditioner="eigenbasis", split_dim=None)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.train_on_batch(x, y)
    for _ in range(5):
        last = model.train_on_batch(x, y)
    assert last < first

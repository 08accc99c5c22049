"""The low-rank preconditioner form against independent numpy computations.

References: matrices built from a known spectrum (``Q diag(sigma) Q^T``), the approximation
``U diag(s) U^T + rho (I - U U^T)`` built from ``np.linalg.eigh`` and solved densely with
``np.linalg.solve``, and the exact damped inverse ``(F + c I)^-1``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_hoopt
from keras_hoopt.blocks import low_rank
from keras_hoopt.blocks.dense import DenseBlock


def _known_spectrum(rng, size, head, tail):
    """``(matrix, eigenvalues descending, eigenvectors)`` with the given head and tail eigenvalues."""
    sigma = np.concatenate([head, tail])
    assert len(sigma) == size
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    return (q * sigma) @ q.T, sigma, q


def _approximation(matrix, rank):
    """numpy's own ``U diag(s) U^T + rho (I - U U^T)`` of the top ``rank`` eigenpairs."""
    values, vectors = np.linalg.eigh(matrix)
    values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    rho = (np.trace(matrix) - values.sum()) / (len(matrix) - rank)
    return (vectors * values) @ vectors.T + rho * (np.eye(len(matrix)) - vectors @ vectors.T), rho


def test_the_range_finder_recovers_the_top_eigenpairs_of_a_known_spectrum():
    rng = np.random.default_rng(0)
    head = np.linspace(10.0, 1.0, 12)
    matrix, sigma, q = _known_spectrum(rng, 160, head, 0.05 * 0.97 ** np.arange(148))
    values, vectors = low_rank.top_eigenpairs(tf.constant(matrix, tf.float32), 12)
    np.testing.assert_allclose(values.numpy(), head, rtol=1e-4)
    # The same subspace: the principal angles' cosines are all 1.
    cosines = np.linalg.svd(q[:, :12].T @ vectors.numpy().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)


def test_the_low_rank_inverse_is_a_dense_solve_of_the_same_approximation_from_either_side():
    rng = np.random.default_rng(1)
    matrix, _, _ = _known_spectrum(rng, 120, np.geomspace(20.0, 2.0, 8), 0.1 * 0.95 ** np.arange(112))
    approximation, _ = _approximation(matrix, 8)
    damping = 0.03
    parts = low_rank.low_rank_inverse(tf.constant(matrix, tf.float32), 8, damping)
    x = rng.normal(size=(120, 7))
    left = low_rank.multiply_left(parts, tf.constant(x, tf.float32)).numpy()
    np.testing.assert_allclose(left, np.linalg.solve(approximation + damping * np.eye(120), x), rtol=1e-3, atol=1e-4)
    right = low_rank.multiply_right(tf.constant(x.T, tf.float32), parts).numpy()
    np.testing.assert_allclose(right, np.linalg.solve(approximation + damping * np.eye(120), x).T, rtol=1e-3, atol=1e-4)


def test_the_error_against_the_full_inverse_is_the_tail_bound_of_a_known_spectrum():
    """In operator norm, (F~ + c)^-1 - (F + c)^-1 = max over the tail of |1/(s_i + c) - 1/(rho + c)|."""
    rng = np.random.default_rng(2)
    tail = np.geomspace(0.5, 1e-3, 180)
    matrix, sigma, _ = _known_spectrum(rng, 196, np.geomspace(50.0, 5.0, 16), tail)
    damping = 1e-2
    parts = low_rank.low_rank_inverse(tf.constant(matrix, tf.float32), 16, damping)
    approximate = low_rank.dense_inverse(parts).numpy().astype(np.float64)
    exact = np.linalg.inv(matrix + damping * np.eye(196))
    rho = tail.mean()
    bound = np.max(np.abs(1.0 / (tail + damping) - 1.0 / (rho + damping)))
    error = np.linalg.norm(approximate - exact, 2)
    np.testing.assert_allclose(error, bound, rtol=2e-2)
    # It is the tail's error: the head's directions are preconditioned as the exact inverse does, up
    # to the range finder's leak of the tail into the basis (amplified by 1/(rho + c), here about 20).
    head = np.linalg.eigh(matrix)[1][:, ::-1][:, :16]
    leak = np.linalg.norm(approximate @ head - exact @ head) / np.linalg.norm(exact @ head)
    assert leak < 2e-2


def test_a_dense_block_keeps_wide_factors_low_rank_and_small_ones_exact():
    """A 300 -> 20 Dense layer at rank 8: A (301) low rank, G (20) its exact damped inverse; the step
    equals numpy's A~^-1 dW G^-1 with K-FAC's factored damping."""
    rng = np.random.default_rng(3)
    layer = keras.layers.Dense(20)
    layer.build((None, 300))
    block = low_rank.with_low_rank(DenseBlock(layer), 8)
    assert (block.factor_form("A"), block.factor_form("G")) == ("low_rank", "kronecker")
    assert set(block.preconditioner_layout("A")) == {"basis", "weights", "tail_inverse"}
    a, _, _ = _known_spectrum(rng, 301, np.geomspace(30.0, 3.0, 8), 0.2 * 0.98 ** np.arange(293))
    g, _, _ = _known_spectrum(rng, 20, np.geomspace(5.0, 0.1, 20)[:8], np.geomspace(5.0, 0.1, 20)[8:])
    statistics = {"A": tf.constant(a, tf.float32), "G": tf.constant(g, tf.float32)}
    damping = 1e-3
    state = {name: block.compute_preconditioner(name, statistics, damping)[0] for name in ("A", "G")}
    gradient = rng.normal(size=(301, 20))
    out = block.apply_preconditioner([tf.constant(gradient[:-1], tf.float32), tf.constant(gradient[-1], tf.float32)], state)
    pi = np.sqrt((np.trace(a) / 301) / (np.trace(g) / 20))
    approximation, _ = _approximation(a, 8)
    expected = np.linalg.solve(approximation + pi * np.sqrt(damping) * np.eye(301), gradient)
    expected = np.linalg.solve(g + np.sqrt(damping) / pi * np.eye(20), expected.T).T
    got = np.concatenate([out[0].numpy(), out[1].numpy()[None]])
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_the_unrefreshed_state_is_the_identity():
    layer = keras.layers.Dense(4)
    layer.build((None, 40))
    block = low_rank.with_low_rank(DenseBlock(layer), 2)
    state = {}
    for name in ("A", "G"):
        state[name] = {}
        for part, (shape, init) in block.preconditioner_layout(name).items():
            value = {"zeros": np.zeros, "ones": np.ones}.get(init)
            state[name][part] = tf.constant(np.eye(shape[0]) if init == "identity" else value(shape), tf.float32)
    grads = [tf.random.normal((40, 4)), tf.random.normal((4,))]
    out = block.apply_preconditioner(grads, state)
    for g, o in zip(grads, out):
        np.testing.assert_allclose(o.numpy(), g.numpy(), rtol=1e-6)


def test_narrow_blocks_keep_the_kronecker_form():
    layer = keras.layers.Dense(8)
    layer.build((None, 16))
    block = DenseBlock(layer)
    assert low_rank.with_low_rank(block, 64) is block


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(48, activation="tanh", name="hidden"), keras.layers.Dense(10, name="out"),
    ])


def _digits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype("float32")
    w = rng.normal(size=(64, 10))
    y = np.argmax(x @ w, axis=1)
    return x, y


def test_spngd_with_the_low_rank_form_trains_reports_its_factors_and_survives_a_checkpoint(tmp_path):
    x, y = _digits()
    model = _mlp()
    optimizer = keras_hoopt.SPNGD(preconditioner="low_rank", preconditioner_rank=16)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=False).history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    rows = {row["layer"]: row for row in optimizer.curvature_summary()}
    assert rows["hidden"]["form"] == "low_rank" and rows["out"]["form"] == "kronecker"
    assert {n: s["form"] for n, s in rows["hidden"]["statistics"].items()} == {"A": "low_rank", "G": "kronecker"}
    assert rows["hidden"]["inversions"] > 0 and rows["hidden"]["failed_inversions"] == 0
    assert optimizer.health_summary()["skipped_steps"] == 0
    config = optimizer.get_config()
    assert (config["preconditioner"], config["preconditioner_rank"]) == ("low_rank", 16)
    path = tmp_path / "run.keras"
    keras_hoopt.save_model(model, path)
    loaded = keras_hoopt.load_model(path)
    assert (loaded.optimizer.preconditioner, loaded.optimizer.preconditioner_rank) == ("low_rank", 16)
    model.train_on_batch(x[:32], y[:32])  # one more step from the checkpoint lands on the same weights
    loaded.train_on_batch(x[:32], y[:32])
    for continued, resumed in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(resumed, continued, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [0, -3, 2.5, "64", None])
def test_bad_ranks_are_refused_by_name(rank):
    with pytest.raises(ValueError, match="preconditioner_rank"):
        keras_hoopt.SPNGD(preconditioner="low_rank", preconditioner_rank=rank)


def test_thor_needs_split_dim_none_for_the_low_rank_form():
    with pytest.raises(ValueError, match="split_dim=None"):
        keras_hoopt.THOR(preconditioner="low_rank")
    x, y = _digits()
    model = _mlp()
    model.compile(optimizer=keras_hoopt.THOR(preconditioner="low_rank", split_dim=None, preconditioner_rank=8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.train_on_batch(x[:64], y[:64])
    for _ in range(5):
        last = model.train_on_batch(x[:64], y[:64])
    assert last < first


def test_auto_takes_the_low_rank_form_only_where_both_factors_are_wide():
    """preconditioner="auto" at rank 8 (a factor >= 32 takes the form, the narrower one must be >= 16):
    a 40 -> 36 layer goes low rank on both factors, a 40 -> 16 layer on its A only; a 300 -> 15 layer
    (one narrow side) and a narrow one keep the Kronecker form; THOR's split takes the split form."""
    from keras_hoopt.blocks.forms import FormOptions, in_form
    from keras_hoopt.blocks.split import SplitForm

    def block(d_in, d_out):
        layer = keras.layers.Dense(d_out)
        layer.build((None, d_in))
        return DenseBlock(layer)

    options = FormOptions(split_dim=None, rank=8, optimizer_name="SPNGD")
    wide = in_form(block(40, 36), "auto", options)
    assert isinstance(wide, low_rank.LowRankForm)
    assert (wide.factor_form("A"), wide.factor_form("G")) == ("low_rank", "low_rank")
    one_side = in_form(block(40, 16), "auto", options)
    assert (one_side.factor_form("A"), one_side.factor_form("G")) == ("low_rank", "kronecker")
    for narrow in (block(300, 15), block(16, 8)):
        assert in_form(narrow, "auto", options) is narrow
        assert isinstance(in_form(narrow, "low_rank", options), low_rank.LowRankForm) == (narrow.layer.units == 15)
    thor = FormOptions(split_dim=16, rank=8, optimizer_name="THOR")
    assert isinstance(in_form(block(40, 36), "auto", thor), SplitForm)  # THOR's split form, not the low rank
    small = block(8, 6)  # no factor wider than split_dim: the whole inverses
    assert in_form(small, "auto", thor) is small


def test_auto_trains_with_thor_and_spngd_defaults_and_reports_the_forms():
    """64 -> 48 -> 10 at rank 8: the hidden layer (A 65, G 48) low rank, the output layer (G 10) not;
    THOR's default split inverses keep every block Kronecker."""
    x, y = _digits()
    cases = ((keras_hoopt.SPNGD(preconditioner="auto", preconditioner_rank=8), ["low_rank", "kronecker"]),
             (keras_hoopt.THOR(preconditioner="auto", preconditioner_rank=8), ["kronecker", "kronecker"]))
    for optimizer, forms in cases:
        model = _mlp()
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        first = model.train_on_batch(x[:64], y[:64])
        for _ in range(5):
            last = model.train_on_batch(x[:64], y[:64])
        assert last < first
        assert [b["form"] for b in optimizer.curvature_summary()] == forms
        assert optimizer.get_config()["preconditioner"] == "auto"


def test_inverse_reads_the_low_rank_state_and_the_spectra_callback_reads_every_form():
    """optimizer.inverse of a low-rank factor is tail I + U diag(w) U^T assembled from its variables
    (numpy); the eigenbasis keeps no factor inverse (None), and CurvatureTensorBoard's spectra skip it."""
    from keras_hoopt.callbacks import CurvatureTensorBoard

    x, y = _digits()
    for form in ("low_rank", "eigenbasis"):
        model = _mlp()
        optimizer = keras_hoopt.SPNGD(preconditioner=form, preconditioner_rank=8)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
        callback = CurvatureTensorBoard("unused", spectra=True)
        callback.set_model(model)
        scalars = callback.scalars()
        assert np.isfinite(scalars["hidden/A/trace"])
        if form == "eigenbasis":
            assert optimizer.inverse("hidden", "A") is None and "hidden/A/damped_condition" not in scalars
            continue
        named = {v.path.split("/")[-1]: v.numpy() for v in optimizer.variables}
        basis, weights, tail = named["hidden_A_basis"], named["hidden_A_weights"], named["hidden_A_tail_inverse"]
        expected = tail[0] * np.eye(65) + (basis * weights) @ basis.T
        np.testing.assert_allclose(optimizer.inverse("hidden", "A"), expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(expected, np.eye(65)) and scalars["hidden/A/damped_condition"] >= 1.0

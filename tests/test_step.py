"""The update step's stages on their own (keras_hoopt.optimizers.step), and a preconditioner form
declared by a block: each checked against numpy or against the default form's trajectory."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import linalg
from keras_hoopt.blocks import DenseBlock, register_block
from keras_hoopt.optimizers import step as stages
from keras_hoopt.refresh.base import FAILED_INVERSIONS, INVERSIONS, LAST_REFRESH, NONFINITE_SKIPS, REFRESHES


def test_the_step_runs_the_named_stages_in_order():
    assert stages.STAGES == (
        "capture", "batch_statistics", "reduce", "fold", "decide",
        "refresh_preconditioners", "share", "running_state", "precondition", "step_size", "clip", "apply",
    )
    for name in stages.STAGES:
        assert callable(getattr(stages.CurvatureStep, name))


def _counters(refreshes=0, last=0):
    c = np.zeros(5, np.int64)
    c[REFRESHES], c[LAST_REFRESH] = refreshes, last
    return tf.constant(c)


def test_fold_takes_the_batch_value_first_then_the_moving_average():
    rng = np.random.default_rng(0)
    old, batch = rng.normal(size=(3, 3)).astype("float32"), rng.normal(size=(3, 3)).astype("float32")
    value, counters, took, _ = stages.fold_statistic(
        tf.constant(old), _counters(), lambda: tf.constant(batch), True, tf.constant(7, tf.int64), 0.9
    )
    np.testing.assert_allclose(value.numpy(), batch, rtol=1e-5, atol=1e-7)  # first refresh: the batch alone
    assert bool(took) and np.array(counters)[REFRESHES] == 1 and np.array(counters)[LAST_REFRESH] == 7
    value, counters, took, _ = stages.fold_statistic(
        tf.constant(old), _counters(refreshes=3), lambda: tf.constant(batch), True, tf.constant(9, tf.int64), 0.9
    )
    np.testing.assert_allclose(value.numpy(), 0.9 * old + 0.1 * batch, rtol=1e-5, atol=1e-7)
    assert np.array(counters)[REFRESHES] == 4 and np.array(counters)[LAST_REFRESH] == 9


def test_fold_skips_a_non_finite_batch_and_a_statistic_that_is_not_due():
    old = np.eye(2, dtype="float32")
    bad = np.array([[1.0, np.nan], [0.0, 1.0]], "float32")
    value, counters, took, _ = stages.fold_statistic(
        tf.constant(old), _counters(refreshes=2, last=3), lambda: tf.constant(bad), tf.constant(True),
        tf.constant(5, tf.int64), 0.5,
    )
    np.testing.assert_array_equal(value.numpy(), old)
    assert not bool(took)
    assert np.array(counters)[NONFINITE_SKIPS] == 1 and np.array(counters)[REFRESHES] == 2
    assert np.array(counters)[LAST_REFRESH] == 3
    calls = []
    value, counters, took, _ = stages.fold_statistic(
        tf.constant(old), _counters(refreshes=2), lambda: calls.append(1) or tf.constant(bad), tf.constant(False),
        tf.constant(5, tf.int64), 0.5,
    )
    np.testing.assert_array_equal(value.numpy(), old)
    assert not bool(took) and np.array(counters)[NONFINITE_SKIPS] == 0


def test_count_inversions_separates_successes_from_failures():
    c = stages.count_inversions(_counters(), tf.constant(True), tf.constant(True)).numpy()
    assert (c[INVERSIONS], c[FAILED_INVERSIONS]) == (1, 0)
    c = stages.count_inversions(_counters(), tf.constant(True), tf.constant(False)).numpy()
    assert (c[INVERSIONS], c[FAILED_INVERSIONS]) == (0, 1)
    c = stages.count_inversions(_counters(), tf.constant(False), tf.constant(False)).numpy()
    assert (c[INVERSIONS], c[FAILED_INVERSIONS]) == (0, 0)


@pytest.mark.parametrize("vg,lr,c", [(4.0, 0.5, 1e-3), (1e-6, 0.1, 1e-3), (0.0, 1.0, 1e-3), (-2.0, 1.0, 1e-2)])
def test_kl_clip_coefficient_matches_its_formula(vg, lr, c):
    expected = min(1.0, np.sqrt(c / (lr * lr * vg))) if vg > 0 else 1.0
    assert float(stages.kl_clip_coefficient(tf.constant(vg), tf.constant(lr), c)) == pytest.approx(expected, rel=1e-6)


def test_one_fused_finiteness_check():
    finite = [tf.constant([1.0, 3e38]), tf.constant([[3e38, 3e38]])]  # their sum would overflow
    assert bool(linalg.all_finite_together(finite))
    for bad in (np.nan, np.inf, -np.inf):
        assert not bool(linalg.all_finite_together(finite + [tf.constant([0.0, bad])]))
    sparse = tf.IndexedSlices(tf.constant([[1.0, np.nan]]), tf.constant([0]), tf.constant([3, 2]))
    assert not bool(linalg.all_finite_together([sparse]))
    assert bool(linalg.all_finite_together([]))


# --------------------------------------------------------------------------- a preconditioner form
class CholeskyDense(keras.layers.Dense):
    """A Dense layer (the parent's call) handled by the block below."""


@register_block
class CholeskyDenseBlock(DenseBlock):
    """Keeps the damped factors' Cholesky factors instead of their inverses: a preconditioner form
    written as one class, with its own state layout."""

    @classmethod
    def matches(cls, layer):
        return isinstance(layer, CholeskyDense) and super().matches(layer)

    def preconditioner_layout(self, name):
        return {"cholesky": (self.statistic_shapes()[name], "identity")}

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        pi = linalg.pi_damping(statistics["A"], statistics["G"])
        root = tf.sqrt(tf.cast(damping, tf.float32))
        factor_damping = pi * root if name == "A" else root / pi
        matrix = statistics[name] + factor_damping * tf.eye(tf.shape(statistics[name])[0])
        chol = tf.linalg.cholesky(matrix)
        return {"cholesky": chol}, linalg.all_finite(chol)

    def apply_preconditioner(self, grads, state):
        matrix = self.gradient_matrix(grads)
        left = tf.linalg.cholesky_solve(state["A"]["cholesky"], matrix)  # A^-1 dW
        both = tf.transpose(tf.linalg.cholesky_solve(state["G"]["cholesky"], tf.transpose(left)))  # ... G^-1
        kernel = tf.reshape(both[: self.input_dim - int(self.has_bias)], self.variables[0].shape)
        return [kernel, both[-1]] if self.has_bias else [kernel]


def _model(layer_type):
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((5,)), layer_type(7, activation="tanh", name="d1"), layer_type(3, name="d2"),
    ])


def test_a_block_with_its_own_preconditioner_state_trains_like_the_inverse_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype("float32")
    y = rng.integers(0, 3, 96)
    runs = {}
    for layer_type in (keras.layers.Dense, CholeskyDense):
        model = _model(layer_type)
        optimizer = keras_hoopt.KFAC(learning_rate=0.1, damping=1e-2, inverse_update_interval=2, factor_decay=0.5)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        runs[layer_type] = (model, optimizer)
    (dense, dense_opt), (chol, chol_opt) = runs[keras.layers.Dense], runs[CholeskyDense]
    paths = [v.path for v in chol_opt.variables]
    assert any(p.endswith("d1_A_cholesky") for p in paths) and not any(p.endswith("d1_A_inverse") for p in paths)
    for a, b in zip(dense.get_weights(), chol.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # The kept state is the Cholesky factor of the damped factor, as numpy computes it.
    stats = {n: chol_opt.statistic("d1", n) for n in ("A", "G")}
    pi = np.sqrt((np.trace(stats["A"]) / 6) / (np.trace(stats["G"]) / 7))
    kept = next(v for v in chol_opt.variables if v.path.endswith("d1_A_cholesky")).numpy()
    # Inverses were last recomputed at step 4 (every 2 steps, 6 steps): the statistics then were
    # the same as now only if refreshed since; compare against the inverse form's own inverse.
    np.testing.assert_allclose(np.linalg.inv(kept @ kept.T), dense_opt.inverse("d1", "A"), rtol=1e-3, atol=1e-4)
    assert pi > 0
    assert chol_opt.curvature_summary()[0]["inversions"] == dense_opt.curvature_summary()[0]["inversions"] == 3

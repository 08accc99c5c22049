"""What the traced update step is made of: one Monte-Carlo backward pass, one conditional write per condition,
the refresh policy's norms inside the fold's branch. Each is counted on the graph the first ``fit`` traces,
and the step's numbers are checked against the same step written without the saving."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import keras
from tensorflow.python.framework import ops as tf_ops

import keras_hoopt
from keras_hoopt import linalg
from keras_hoopt.optimizers import step as stages

_CONDS = ("If", "StatelessIf")


@pytest.fixture
def traced_ops(monkeypatch):
    """Records ``(op type, name scope)`` of every op created (in any graph, cond branches included)."""
    created = []
    original = tf_ops.Graph._create_op_internal

    def recording(graph, op_type, *args, **kwargs):
        created.append((op_type, graph.get_name_scope()))
        return original(graph, op_type, *args, **kwargs)

    monkeypatch.setattr(tf_ops.Graph, "_create_op_internal", recording)
    return created


def _tanh_mlp(depth, width=6):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((5,))] + [keras.layers.Dense(width, activation="tanh") for _ in range(depth)]
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 3, size=32)


def _fit_one_step(model, optimizer):
    x, y = _data()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("depth", [2, 5])
def test_the_monte_carlo_fisher_runs_one_sampled_backward_pass(traced_ops, depth):
    # Each G used to run its own pass down from the sampled loss: depth (depth + 1) / 2 TanhGrads on top of the
    # training pass's depth. One shared pass adds exactly depth.
    _fit_one_step(_tanh_mlp(depth), keras_hoopt.SPNGD(1e-2, fisher="mc", step_size="fixed"))
    counts = collections.Counter(op for op, _ in traced_ops)
    assert counts["TanhGrad"] == 2 * depth


def _statistics_after_one_step(per_statistic_pass):
    model = _tanh_mlp(3)
    optimizer = keras_hoopt.KFAC(1e-2, fisher="mc", step_size="fixed", factor_decay=0.0)
    if per_statistic_pass:  # the pass each statistic ran before: down from the sampled loss to its own layer
        optimizer_step = stages.CurvatureStep._output_grads

        def own_pass(step, calls, tap="output"):
            return [tf.cast(g, tf.float32) for g in step.record.sampled_output_grads(calls, tap)]

        stages.CurvatureStep._output_grads = own_pass
    try:
        _fit_one_step(model, optimizer)
    finally:
        if per_statistic_pass:
            stages.CurvatureStep._output_grads = optimizer_step
    return [np.array(v) for v in optimizer._statistics]


def test_the_shared_sampled_pass_gives_each_layer_its_own_monte_carlo_factor():
    # The same step (same seeds, so the same sampled labels) with each G taking its gradients from its own
    # backward pass: every factor must agree, which catches a gradient handed to the wrong layer or tap.
    shared, own = _statistics_after_one_step(False), _statistics_after_one_step(True)
    assert len(shared) == 8
    for a, b in zip(shared, own):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(shared[1], shared[3])  # distinct layers' G differ: not one layer's copied


def test_conditional_writes_share_one_cond_per_condition(traced_ops):
    # Per statistic: its value and its second-last copy (SP-NGD's history) are written where it was refreshed,
    # its preconditioner's parts where that was recomputed: two conds, not one per variable.
    model = _tanh_mlp(2)
    optimizer = keras_hoopt.SPNGD(1e-2, step_size="fixed", preconditioner="low_rank", preconditioner_rank=1)
    _fit_one_step(model, optimizer)
    statistics = len(optimizer._statistics)
    parts = sum(len(p) for p in optimizer._preconditioners)
    assert parts > statistics  # the low-rank form keeps several parts per statistic
    in_apply = [op for op, scope in traced_ops if op in _CONDS and "/apply" in f"/{scope}"]
    assert len(in_apply) == 2 * statistics + 1  # and one for the weights' fused updates


def test_each_statistics_counters_are_unstacked_once_and_stacked_once(traced_ops):
    # Reading a counter is a Python index into the statistic's unstacked fields, and the step's updates of them
    # are one stack for the write: the old code sliced the vector at every read and scattered at every update.
    model = _tanh_mlp(3)
    optimizer = keras_hoopt.SPNGD(1e-2, step_size="fixed")
    _fit_one_step(model, optimizer)
    counts = collections.Counter(op for op, _ in traced_ops)
    assert counts["TensorScatterAdd"] + counts["TensorScatterUpdate"] == 0
    # one Unpack per statistic's counters; the adaptive policy's vectorised decision unstacks three vectors of
    # all statistics (the due flags, the [N, 2] schedules' columns, the new schedules' rows), and the placement
    # one of all blocks (whether each block's preconditioner state is valid here)
    assert counts["Unpack"] == len(optimizer._statistics) + 3 + 1
    summary = optimizer.curvature_summary()
    assert all(s["refreshes"] == 1 and s["inversions"] == 1 for layer in summary for s in layer["statistics"].values())


def test_the_adaptive_policy_adds_no_cond_of_its_own(traced_ops):
    model = _tanh_mlp(2)
    optimizer = keras_hoopt.SPNGD(1e-2, step_size="fixed")
    _fit_one_step(model, optimizer)
    # The norms of sim(X, X_-1) and sim(X, X_-2) run in the fold's branch (measure_refresh).
    assert [op for op, scope in traced_ops if op in _CONDS and "/decide" in f"/{scope}"] == []


def test_every_factor_of_every_size_calls_one_traced_inverse_and_one_range_finder(traced_ops, monkeypatch):
    monkeypatch.setattr(linalg, "_SHARED_FUNCTIONS", {})  # traced afresh here, not by an earlier test
    # Factors of sizes 6, 7, 9, 10, 33 (Kronecker) and a low-rank one: the Cholesky inverse with its retry
    # loop, and the range finder, are each one graph function called once per factor, not a copy per factor.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(9, activation="tanh"),
                              keras.layers.Dense(3)])
    optimizer = keras_hoopt.KFAC(1e-2, step_size="fixed", preconditioner="low_rank", preconditioner_rank=4)
    _fit_one_step(model, optimizer)
    forms = [s["form"] for s in _factor_forms(optimizer)]
    assert "low_rank" in forms and "kronecker" in forms
    counts = collections.Counter(op for op, _ in traced_ops)
    assert counts["Cholesky"] == 1  # traced once, in the shared function's graph
    assert counts["Qr"] == 1 + 2  # the sketch's QR and two power iterations, once
    calls = collections.Counter(op for op, _ in traced_ops if op in ("PartitionedCall", "StatefulPartitionedCall"))
    assert sum(calls.values()) >= len(forms)  # one call per factor
    # The factors are still each their own (the shared function is not handed the wrong matrix).
    for summary in _factor_forms(optimizer):
        assert summary["inversions"] == 1 and summary["failed_inversions"] == 0


def _factor_forms(optimizer):
    return [s for layer in optimizer.curvature_summary() for s in layer["statistics"].values()]


def test_the_weights_move_by_one_fused_momentum_kernel_each_in_one_cond(traced_ops):
    # Every weight's momentum step is TensorFlow's fused kernel (one pass over the weights, where the old update
    # made six element-wise passes: two products, a difference, a sum and two selects on step_ok), and all of them
    # sit in one cond on the step being finite.
    model = _tanh_mlp(2)
    optimizer = keras_hoopt.SPNGD(1e-2, step_size="fixed", momentum=0.9)
    _fit_one_step(model, optimizer)
    counts = collections.Counter(op for op, _ in traced_ops)
    assert counts["ResourceApplyKerasMomentum"] == len(model.trainable_variables)
    in_apply = [op for op, scope in traced_ops if op in _CONDS and "/apply" in f"/{scope}"]
    assert len(in_apply) == 2 * len(optimizer._statistics) + 1  # the grouped writes, then the weights' one


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_the_fused_momentum_step_equals_decoupled_decay_then_momentum_sgd_in_numpy(nesterov, weight_decay):
    model = _tanh_mlp(1)
    optimizer = keras_hoopt.KFAC(
        1e-2, step_size="fixed", momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )
    _fit_one_step(model, optimizer)
    variable = model.trainable_variables[0]
    index = optimizer._get_variable_index(variable)
    velocity = optimizer._momentums[index]
    rng = np.random.default_rng(1)
    w, v = np.array(variable), rng.normal(size=variable.shape).astype("float32")
    velocity.assign(v)
    u = rng.normal(size=variable.shape).astype("float32")
    lr, mu, given = 0.3, 0.7, 0.05
    step = stages.CurvatureStep(optimizer, [], [], given)
    tf.function(lambda: step._variable_update(variable.value, tf.constant(u), lr, mu, weight_decay is not None, given))()
    decayed = w - w * (weight_decay or 0.0) * given
    new_v = mu * v - lr * u
    expected = decayed + (mu * new_v - lr * u if nesterov else new_v)
    np.testing.assert_allclose(np.array(velocity), new_v, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(variable), expected, rtol=1e-6, atol=1e-7)


def _decide_ops(traced_ops, depth):
    del traced_ops[:]
    optimizer = keras_hoopt.SPNGD(1e-2, step_size="fixed")
    _fit_one_step(_tanh_mlp(depth), optimizer)
    scoped = [op for op, scope in traced_ops if "/decide" in f"/{scope}" or "/batch_statistics" in f"/{scope}"]
    return len(scoped), len(optimizer._statistics)


def test_the_adaptive_policy_decides_all_statistics_in_one_vectorised_pass(traced_ops):
    # Decisions (due flags, the interval law) are a few ops for all statistics: each more statistic adds only
    # its reads and its share of the stacks (the per-statistic decision traced about 50).
    small_ops, small = _decide_ops(traced_ops, 1)
    large_ops, large = _decide_ops(traced_ops, 4)
    assert large - small == 6
    assert (large_ops - small_ops) / (large - small) <= 12


def test_every_statistic_folds_measures_and_inverts_through_one_function_per_kind(traced_ops, monkeypatch):
    monkeypatch.setattr(linalg, "_SHARED_FUNCTIONS", {})  # traced afresh here, not by an earlier test
    # Five Dense layers: ten statistics of sizes 3 to 33. The moving average with its finiteness check, the
    # adaptive policy's similarities and each factor side's pi-damped inverse are each traced once (one graph
    # function per kind, called per statistic), not a copy per statistic; each statistic is still its own.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(9, activation="tanh"),
                              keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    weights = [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers]
    damping = 1e-2
    optimizer = keras_hoopt.SPNGD(1e-2, damping=damping, step_size="fixed")
    _fit_one_step(model, optimizer)

    def traced(function, op_type):
        return sum(1 for op, scope in traced_ops if op == op_type and f"shared_function/{function}" in scope)

    assert traced("_fold", "IsFinite") == 1
    assert traced("_similarities", "Sqrt") == 4  # the four Frobenius norms of sim(X, X_-1) and sim(X, X_-2)
    assert traced("_damped_a_inverse", "Sqrt") == 2 and traced("_damped_g_inverse", "Sqrt") == 2  # sqrt(l), pi
    statistics = _factor_forms(optimizer)
    assert len(statistics) == 10
    assert all(s["refreshes"] == 1 and s["inversions"] == 1 and s["failed_inversions"] == 0 for s in statistics)
    # Each layer's own factor, against numpy: A = E[a a^T] of its input (a bias column appended), from the
    # weights before the step; and its inverse, that of A + pi sqrt(l) I, pi = sqrt((tr A / dim A) / (tr G / dim G)).
    hidden, _ = _data()
    hidden = hidden.astype(np.float64)
    for layer, (kernel, bias) in zip(model.layers, weights):
        rows = np.concatenate([hidden, np.ones((len(hidden), 1))], axis=1)
        a = rows.T @ rows / len(rows)
        np.testing.assert_allclose(optimizer.statistic(layer.name, "A"), a, rtol=1e-5, atol=1e-6)
        g = optimizer.statistic(layer.name, "G").astype(np.float64)
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        np.testing.assert_allclose(optimizer.inverse(layer.name, "A"),
                                   np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(len(a))), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(optimizer.inverse(layer.name, "G"),
                                   np.linalg.inv(g + np.sqrt(damping) / pi * np.eye(len(g))), rtol=2e-3, atol=2e-3)
        hidden = hidden @ kernel + bias
        hidden = np.tanh(hidden) if layer is not model.layers[-1] else hidden

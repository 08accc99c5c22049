"""The per-stage profile of the step (python -m keras_hoopt.benchmarks --profile)."""

import pytest

from keras_hoopt.benchmarks import profile
from keras_hoopt.benchmarks.__main__ import main
from keras_hoopt.optimizers.step import STAGES


@pytest.mark.parametrize("name, group", [
    ("StatefulPartitionedCall/spngd/fold/SelectV2_1", "fold"),
    ("StatefulPartitionedCall/spngd/refresh_preconditioners/cond_1/then/_166/spngd/refresh_preconditioners/"
     "cond_1/while/body/_806/Cholesky", "refresh_preconditioners"),
    # The quadratic model's forward-mode pass runs the model again: it belongs to its stage.
    ("StatefulPartitionedCall/spngd/step_size/digits_mlp_3/dense_1/MatMul/PartitionedCall/gradient_tape/"
     "gradient_tape/MatMul", "step_size"),
    # A shared graph function's body (keras_hoopt.linalg.shared_function) has no caller scope.
    ("while/body/_1/while/shared_function/_retried_cholesky_inverse/Cholesky", "refresh_preconditioners"),
    ("StatefulPartitionedCall/spngd_2/apply/AssignVariableOp_15", "apply"),
    ("StatefulPartitionedCall/gradient_tape/digits_mlp_1/dense_1/MatMul/MatMul", "backward"),
    ("StatefulPartitionedCall/digits_mlp_1/dense_1/BiasAdd", "forward and loss"),
    ("StatefulPartitionedCall/SGD/Mul_3", "optimizer, other"),
    ("Iterator::Root::Prefetch::ParallelMapV2", "input pipeline"),
])
def test_ops_are_grouped_by_their_first_stage_scope(name, group):
    assert profile.stage_of(name, "spngd" if "spngd" in name else "SGD", STAGES) == group


def test_op_times_become_milliseconds_per_step_and_idle_time_is_left_out():
    rows = [
        {"type": "IDLE", "operation": "IDLE", "occurrences": 0, "total_self_time": 9e9},
        {"type": "MatMul", "operation": "StatefulPartitionedCall/spngd/precondition/matmul", "occurrences": 10,
         "total_self_time": 3000.0},
        {"type": "MatMul", "operation": "StatefulPartitionedCall/model/dense/MatMul", "occurrences": 10,
         "total_self_time": 1000.0},
    ]
    groups, ops = profile.group_op_stats(rows, "spngd", STAGES, steps=10)
    assert groups["precondition"] == pytest.approx(0.3) and groups["forward and loss"] == pytest.approx(0.1)
    assert ops == 2.0 and sum(groups.values()) == pytest.approx(0.4)


def test_profile_command_prints_the_stages_of_the_curvature_step(capsys):
    results = main(["--profile", "--workloads", "digits_mlp", "--optimizers", "sgd", "spngd", "--steps", "6",
                    "--warmup", "4"])
    out = capsys.readouterr().out
    sgd, spngd = results["digits_mlp"]["sgd"], results["digits_mlp"]["spngd"]
    # SGD's update has no curvature stage; SPNGD's time is in its stages, and it runs more ops.
    assert all(sgd["groups"][stage] == 0.0 for stage in STAGES)
    assert sgd["groups"]["optimizer, other"] > 0
    for stage in ("fold", "precondition", "step_size", "apply"):
        assert spngd["groups"][stage] > 0, stage
    assert spngd["ops_per_step"] > 2 * sgd["ops_per_step"]
    assert spngd["trace_s"] > 0 and spngd["ms_per_step"] > 0
    assert "### digits_mlp" in out and "| precondition |" in out and "| ops/step |" in out


def test_the_default_workloads_and_optimizers_exist():
    from keras_hoopt.benchmarks import WORKLOADS
    from keras_hoopt.benchmarks.optimizers import OPTIMIZERS

    assert set(profile.DEFAULT_WORKLOADS) <= set(WORKLOADS)
    assert set(profile.DEFAULT_OPTIMIZERS) <= set(OPTIMIZERS)


def test_the_shared_inverse_function_is_profiled_under_its_scope():
    # The real op names of the shared function's body, as the profiler records them.
    import tempfile

    import numpy as np
    import tensorflow as tf

    from keras_hoopt import linalg

    matrix = tf.Variable(np.eye(20, dtype="float32"))
    invert = tf.function(lambda: linalg.damped_inverse(matrix, 1e-3)[0])
    invert()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            invert()
        finally:
            tf.profiler.experimental.stop()
        rows = profile._op_stats(logdir)
    cholesky = [row["operation"] for row in rows if row["type"] == "Cholesky"]
    assert cholesky and all(profile.stage_of(name, "spngd", STAGES) == "refresh_preconditioners" for name in cholesky)

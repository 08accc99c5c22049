"""The benchmark command a user runs: workloads, outputs, and what the table reports."""

import csv
import os

import keras
import numpy as np
import pytest

from keras_hoopt.benchmarks import WORKLOADS
from keras_hoopt.benchmarks.__main__ import DEFAULT_WORKLOADS, main
from keras_hoopt.benchmarks.runner import run_one


def test_workloads_are_the_named_ones_on_real_data():
    assert set(WORKLOADS) == {
        "mnist_mlp", "mnist_cnn", "mnist_autoencoder", "digits_mlp", "text_transformer", "text_lstm"
    }
    assert set(DEFAULT_WORKLOADS) == {"mnist_mlp", "mnist_cnn", "mnist_autoencoder", "digits_mlp"}
    model = WORKLOADS["mnist_autoencoder"].build()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [1000, 500, 250, 30, 250, 500, 1000, 784]
    assert [layer.activation.__name__ for layer in dense] == ["tanh"] * 3 + ["linear"] + ["tanh"] * 3 + ["linear"]
    (x, y), (x_test, y_test) = WORKLOADS["mnist_autoencoder"].load_xy()
    assert x is y and x.shape == (4000, 784) and x_test.shape == (1000, 784)
    (x, y), _ = WORKLOADS["digits_mlp"].load_xy()
    assert x.shape == (1438, 64) and sorted(set(y.tolist())) == list(range(10))


def test_autoencoder_test_metric_is_the_reconstruction_loss():
    """Lower is better, and it is the workload's own sigmoid cross-entropy on held-out digits."""
    workload = WORKLOADS["mnist_autoencoder"]
    (x, _), (x_test, _) = workload.load_xy()
    data = ((x[:256], x[:256]), (x_test[:200], x_test[:200]))
    result = run_one(workload, "sgd", lambda lr: keras.optimizers.SGD(lr, momentum=0.9), 0.1, 2, data=data)
    assert not result.higher_test_is_better and len(result.epoch_test) == 2
    # chance level: every pixel predicted as 0.5 gives ln 2; a trained net is below it.
    assert result.best_test < np.log(2)
    assert result.best_test == min(result.epoch_test)


def test_command_writes_table_csv_plots_and_reports_progress(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--workloads", "digits_mlp", "--optimizers", "spngd", "sgd", "adam", "--quick",
                 "--epochs", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spngd: learning-rate grid [" in printed
    assert printed.count("epoch 3: train loss") == 6  # 3 optimizers x 2 learning rates
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| digits_mlp")]
    assert [row.split("|")[2].strip() for row in rows] == ["spngd", "sgd", "adam"]
    assert "* digits_mlp: loss target:" in table
    with open(out / "runs.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 3 * 2 * 3
    assert {r["test_metric"] for r in records} == {"accuracy"}
    assert all(0 <= float(r["test_value"]) <= 1 for r in records)
    state = {r["optimizer"]: float(r["optimizer_state_mb"]) for r in records}
    # SGD: one momentum per weight (4.8k float32); Adam two; SPNGD a momentum plus factors and inverses.
    weights = 64 * 64 + 64 + 64 * 10 + 10
    assert state["sgd"] * 2**20 >= 4 * weights and state["adam"] > state["sgd"]
    assert state["spngd"] * 2**20 > 4 * (weights + 2 * (65**2 + 64**2 + 65**2 + 10**2))
    assert all(float(r["peak_memory_mb"]) >= 0 for r in records)
    assert os.path.getsize(out / "digits_mlp.png") > 1000


def test_help_lists_the_workloads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in WORKLOADS:
        assert name in printed


@pytest.mark.slow
def test_distributed_benchmark_reports_planned_and_measured_bytes():
    """``python -m keras_hoopt.benchmarks.distributed`` under a real 2-process horovodrun.

    KFAC refreshes and inverts every step there, so every collective runs in every step: the
    measured bytes per step equal the sum of the planned ones, and the gradients collective
    carries exactly the model's float32 parameters plus the statistics.
    """
    import subprocess
    import sys

    command = [sys.executable, "-m", "keras_hoopt.benchmarks.distributed", "--workers", "2",
               "--modes", "inverses", "--steps", "3"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "inverses"
    planned = dict(part.split(": ") for part in cells[2].split(", "))
    assert set(planned) == {"gradients+statistics", "inverses (only when due)"}
    kb = lambda text: float(text.split()[0])  # noqa: E731
    # 784-128-64-10 MLP: 109,386 parameters, 4 bytes each
    assert kb(cells[4]) == pytest.approx(109386 * 4 / 1e3, abs=0.5)
    # every step refreshes: measured mean = sum of the planned payloads (kB rounding)
    assert kb(cells[3]) == pytest.approx(sum(kb(v) for v in planned.values()), abs=1.0)
    assert len(cells[5].split(" / ")) == 2  # inversion time of each worker


def test_step_time_compares_trees_interleaved(capsys):
    from keras_hoopt.benchmarks import step_time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = step_time.main(["--trees", root, "--workload", "digits_mlp", "--optimizers", "sgd", "spngd",
                           "--steps", "3", "--repeats", "1"])
    assert [(r["optimizer"], r["repeat"]) for r in rows] == [("sgd", 0), ("spngd", 0)]
    assert all(r["ms_per_step"] > 0 and r["setup_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| sgd | " in out and "| spngd | " in out and "median ms/step" in out


def test_step_time_in_process_fits_every_model_in_turn_in_rounds(capsys):
    from keras_hoopt.benchmarks import step_time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = step_time.main(["--trees", root, "--workload", "digits_mlp", "--optimizers", "sgd", "spngd_default",
                           "--steps", "3", "--repeats", "2", "--in-process"])
    assert [(r["optimizer"], r["repeat"]) for r in rows] == [
        ("sgd", 0), ("spngd_default", 0), ("sgd", 1), ("spngd_default", 1)
    ]
    assert all(r["ms_per_step"] > 0 and r["setup_s"] > 0 for r in rows)
    assert "| spngd_default | " in capsys.readouterr().out


def test_against_adam_takes_adams_best_as_the_targets(tmp_path, capsys):
    from keras_hoopt.benchmarks import against_adam

    path = tmp_path / "runs.csv"
    header = ("workload,optimizer,learning_rate,epoch,train_loss,test_metric,test_value,epoch_seconds,"
              "statistic_fraction,inversion_fraction,peak_memory_mb,optimizer_state_mb\n")
    rows = [
        # Adam: two learning rates; the best train loss (0.5) is at lr 0.01 epoch 3, the best test loss (0.9) at lr 0.001
        ("adam", 0.001, [(1.0, 1.2), (0.8, 0.9), (0.7, 1.0)]),
        ("adam", 0.01, [(0.9, 1.1), (0.6, 1.0), (0.5, 1.3)]),
        ("spngd", 0.3, [(0.7, 1.0), (0.45, 0.85), (0.4, 0.95)]),  # loss target at epoch 2, test at epoch 2
        ("spngd", 1.0, [(0.6, 1.0), (0.55, 1.0), (0.52, 1.0)]),  # never reaches 0.5
        ("sgd", 0.1, [(2.0, 2.0), (1.5, 1.8), (1.0, 1.5)]),
    ]
    text = header
    for optimizer, lr, epochs in rows:
        for e, (loss, test) in enumerate(epochs, 1):
            text += f"w,{optimizer},{lr},{e},{loss},loss,{test},10.0,0,0,0,0\n"
    path.write_text(text)
    out = {r["optimizer"]: r for r in against_adam.compare(against_adam.read_runs(str(path)))}
    assert out["adam"]["loss_target"] == 0.5 and out["adam"]["test_target"] == 0.9
    # Each target gets the learning rate that reached it first: Adam's loss target at lr 0.01, and its
    # test target at lr 0.001 (where that best value came from), epoch 2.
    assert out["adam"]["learning_rate"] == 0.01 and out["adam"]["to_loss"] == (3, 30.0)
    assert out["adam"]["test_learning_rate"] == 0.001 and out["adam"]["to_test"] == (2, 20.0)
    assert out["spngd"]["learning_rate"] == 0.3 and out["spngd"]["test_learning_rate"] == 0.3
    assert out["spngd"]["to_loss"] == (2, 20.0) and out["spngd"]["to_test"] == (2, 20.0)
    # Never reached: the lowest loss / best test value over the grid, and the lr that gave it.
    assert out["sgd"]["to_loss"] is None and out["sgd"]["best_loss"] == 1.0 and out["sgd"]["best_test"] == 1.5
    assert against_adam.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| w (targets 0.5000 / 0.9000) | spngd | 0.3 | 2 / 20 s | 0.3 | 2 / 20 s |" in printed
    assert "| w (targets 0.5000 / 0.9000) | adam | 0.01 | 3 / 30 s | 0.001 | 2 / 20 s |" in printed
    assert ("* w: Adam's best train loss: spngd 20.0 s = 0.67x adam's 30.0 s; "
            "Adam's best test value: spngd 20.0 s = 1.00x adam's 20.0 s") in printed


def test_against_adam_picks_the_test_targets_learning_rate_apart_from_the_loss_targets(tmp_path):
    # An accuracy workload: the candidate's lr 1.0 is first to the loss target but never reaches the
    # test target, which its lr 0.5 reaches at epoch 3; with no lr reaching it, the best accuracy's lr.
    from keras_hoopt.benchmarks import against_adam

    path = tmp_path / "runs.csv"
    text = ("workload,optimizer,learning_rate,epoch,train_loss,test_metric,test_value,epoch_seconds,"
            "statistic_fraction,inversion_fraction,peak_memory_mb,optimizer_state_mb\n")
    runs = [
        ("adam", 0.01, [(0.5, 0.90), (0.2, 0.95), (0.1, 0.96)]),
        ("spngd", 1.0, [(0.1, 0.93), (0.01, 0.94), (0.0, 0.94)]),
        ("spngd", 0.5, [(0.3, 0.92), (0.15, 0.95), (0.05, 0.97)]),
        ("sgd", 0.1, [(0.9, 0.80), (0.8, 0.85), (0.7, 0.86)]),
        ("sgd", 0.3, [(0.9, 0.70), (0.8, 0.88), (0.7, 0.87)]),
    ]
    for optimizer, lr, epochs in runs:
        for e, (loss, test) in enumerate(epochs, 1):
            text += f"w,{optimizer},{lr},{e},{loss},accuracy,{test},{e}.0,0,0,0,0\n"
    path.write_text(text)
    out = {r["optimizer"]: r for r in against_adam.compare(against_adam.read_runs(str(path)))}
    assert out["spngd"]["learning_rate"] == 1.0 and out["spngd"]["to_loss"] == (1, 1.0)
    assert out["spngd"]["test_learning_rate"] == 0.5 and out["spngd"]["to_test"] == (3, 6.0)
    assert out["spngd"]["best_test"] == 0.97
    assert out["sgd"]["to_test"] is None and out["sgd"]["test_learning_rate"] == 0.3 and out["sgd"]["best_test"] == 0.88


def test_batch_multiplier_trains_every_workload_at_that_many_times_its_batch(tmp_path, capsys):
    """SP-NGD's large-batch claim: the same workload at 4x its batch (digits: 32 -> 128)."""
    assert main(["--workloads", "digits_mlp", "--optimizers", "sgd", "--quick", "--epochs", "1",
                 "--batch-multiplier", "4", "--no-epoch-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"batch {4 * WORKLOADS['digits_mlp'].batch_size}" in printed
    assert "--batch-multiplier 4" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["--batch-multiplier", "0"])
    assert "--batch-multiplier must be an int >= 1" in capsys.readouterr().err


def test_difference_accuracy_measures_the_schemes_against_forward_mode(capsys):
    """On the smooth (tanh) digits MLP central differences are second order: the error at a 10x
    smaller step is far smaller; every observed error is finite and the table names every scheme."""
    from keras_hoopt.benchmarks import difference_accuracy

    results = difference_accuracy.main(
        ["--workloads", "digits_mlp", "--epochs", "1", "--every", "8", "--one-sided-steps", "3e-5",
         "--central-steps", "3e-3", "3e-4"]
    )
    errors = results["digits_mlp"]
    assert set(errors) == {"one-sided 3e-05", "central 0.003", "central 0.0003"}
    assert all(len(v) == 3 and np.all(np.isfinite(v)) for v in errors.values()), errors
    assert np.median(errors["central 0.0003"]) < 0.1 * np.median(errors["central 0.003"])
    assert np.median(errors["one-sided 3e-05"]) < 1e-2
    assert "| digits_mlp | central 0.0003 |" in capsys.readouterr().out


def test_every_curvature_entry_of_the_benchmark_gets_the_workloads_options_and_builds_what_it_names():
    import keras_hoopt
    from keras_hoopt.benchmarks.optimizers import CURVATURE_OPTIMIZERS, OPTIMIZERS

    for name, (factory, grid, quick) in OPTIMIZERS.items():
        optimizer = factory(grid[0], **({} if name not in CURVATURE_OPTIMIZERS else {"fallback": "adam"}))
        assert set(quick) <= set(grid)
        curvature = isinstance(optimizer, keras_hoopt.optimizers.CurvatureOptimizer)
        assert curvature == (name in CURVATURE_OPTIMIZERS), name
    assert OPTIMIZERS["spngd_similarity_003"][0](1.0).refresh_policy.similarity_threshold == 0.03
    assert OPTIMIZERS["spngd_qm1"][0](1.0).quadratic_model_interval == 1 != OPTIMIZERS["spngd"][0](1.0).quadratic_model_interval


def test_inverse_time_reports_every_method_at_every_size_with_float32_accuracy(capsys):
    """The three ways agree with numpy's float64 inverse to float32 rounding at condition 1e4, on both
    sides of the size where the library's inverse goes by halves; the table names every size."""
    from keras_hoopt import linalg
    from keras_hoopt.benchmarks import inverse_time

    sizes = [linalg.BLOCKED_INVERSE_MIN_SIZE + 1, 40]
    results = inverse_time.main(["--sizes", *map(str, sizes), "--repeats", "2"])
    assert set(results) == set(sizes)
    for row in results.values():
        assert set(row) == {"cholesky_solve", "whole", "by_halves", "damped_inverse"}
        assert all(ms > 0 and error < 1e-3 for ms, error in row.values()), row
    out = capsys.readouterr().out
    assert all(f"| {size} |" in out for size in sizes)
    with pytest.raises(SystemExit):
        inverse_time.main(["--sizes", "2"])

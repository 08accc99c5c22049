"""Distributed training with real processes on localhost (tests/_distributed_worker.py does the training).

Launches, once per module: MirroredStrategy on 2 logical CPU devices (1 process),
MultiWorkerMirroredStrategy (2 processes, TF_CONFIG on 127.0.0.1), ``horovodrun -np 2 --gloo``,
and the single-process reference, which also resumes every 2-worker checkpoint on 1 worker.
Configurations: KFAC with model_parallel="inverses", SPNGD with model_parallel="gradients", the
eigenbasis form with "inverses" and the low-rank form with "gradients".
"""

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_hoopt.optimizers import quadratic_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_distributed_worker.py")
CONFIGS = ("kfac_inverses", "spngd_gradients", "ekfac_inverses", "lowrank_gradients")
LAUNCHES = ("mirrored", "multiworker", "horovod")
TIMEOUT = 500


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("TF_CONFIG", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _launch(kind, out):
    if kind == "mirrored":
        proc = subprocess.run([sys.executable, WORKER, kind, out], env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=ROOT)
        _check(proc, kind)
        return
    if kind == "multiworker":
        ports = [_free_port(), _free_port()]
        procs = []
        for index in range(2):
            env = _env()
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            })
            procs.append(subprocess.Popen([sys.executable, WORKER, kind, out], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for index, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            _check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), f"multiworker {index}")
        return
    horovodrun = shutil.which("horovodrun")
    assert horovodrun, "horovodrun not found: run `bash scripts/install_horovod.sh` (the README's install does)"
    proc = subprocess.run([horovodrun, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, WORKER, kind, out],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    _check(proc, kind)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distributed"))
    for kind in LAUNCHES:
        _launch(kind, out)
    single_out = os.path.join(out, "single")
    os.makedirs(single_out)
    proc = subprocess.run([sys.executable, WORKER, "single", single_out, out], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT)
    _check(proc, "single")
    result = {"single": [np.load(os.path.join(single_out, "single_rank0.npz"))]}
    for kind in LAUNCHES:
        ranks = 1 if kind == "mirrored" else 2
        result[kind] = [np.load(os.path.join(out, f"{kind}_rank{r}.npz")) for r in range(ranks)]
    result["info"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _weights(npz, prefix):
    keys = sorted((k for k in npz.files if k.startswith(prefix + "/weight/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    assert keys, prefix
    return [npz[k] for k in keys]


def _tolerance(config):
    """EKFAC's step is not continuous in its factors: within a near-degenerate eigenspace the
    basis, and so the diagonal measured in it, turns with float32 reduction order, so two workers
    and one process agree to ~1% of the weights' scale (measured: 4e-3 at most). The workers
    agree with each other to rounding, and every other configuration agrees to float32 rounding
    (the largest difference seen: 2.5e-6 on one of 768 weights of size 0.03, SPNGD's "gradients"
    mode resumed on one process, after the pi-damped inverses became one shared graph function)."""
    return dict(atol=5e-3, rtol=5e-2) if config.startswith("ekfac") else dict(atol=5e-6, rtol=1e-5)


def _assert_close(a, b, what, atol=2e-6, rtol=1e-5):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=f"{what}: weight {i}")


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_match_one_process_on_the_same_global_batch(runs, launch, config):
    single = runs["single"][0]
    initial_moved = False
    for rank, npz in enumerate(runs[launch]):
        for stage in ("trained", "continued"):
            _assert_close(_weights(npz, f"{config}/{stage}"), _weights(single, f"{config}/{stage}"),
                          f"{launch} rank {rank} {config} {stage}", **_tolerance(config))
            # The workers themselves hold the same bases (shared): they agree to rounding.
            _assert_close(_weights(npz, f"{config}/{stage}"), _weights(runs[launch][0], f"{config}/{stage}"),
                          f"{launch} rank {rank} vs rank 0 {config} {stage}")
        initial_moved = initial_moved or not np.allclose(
            _weights(npz, f"{config}/trained")[0], _weights(npz, f"{config}/continued")[0])
    assert initial_moved


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_every_worker_holds_the_same_optimizer_state(runs, launch, config):
    """Across workers and against the single process: statistics, counters, momenta, policy state.

    Preconditioner state too, except in "gradients" mode where it lives on a layer's owner only.
    ``state_origin`` (who wrote the state) and ``inverse_holders`` (the layout) are per launch.
    """
    single, info = runs["single"][0], runs["info"]["configs"][config]
    prefix = f"{config}/trained/state/"
    keys = [k for k in single.files if k.startswith(prefix)]
    # "gradients" mode (on two workers; this single process runs "off"): a layer's preconditioner
    # state, whatever its form's layout, lives on its owner only.
    owner_only = set(info["preconditioner_state"]) if info["model_parallel"] == "gradients" else set()
    assert any(k.endswith("_A") for k in keys)
    for rank, npz in enumerate(runs[launch]):
        for key in keys:
            name = key[len(prefix):]
            if name.endswith(("state_origin", "inverse_holders")):
                continue
            if name in owner_only:
                continue
            if config.startswith("ekfac"):
                if name.endswith("_basis"):  # defined up to rotations within near-degenerate eigenspaces
                    continue
                np.testing.assert_allclose(npz[key], single[key], atol=5e-3, rtol=5e-2, err_msg=f"{launch} {rank} {name}")
                continue
            np.testing.assert_allclose(npz[key], single[key], atol=1e-5, rtol=1e-4, err_msg=f"{launch} {rank} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_each_worker_inverts_only_the_layers_it_owns(runs, launch, config):
    single, info = runs["single"][0], runs["info"]["configs"][config]
    slots = info["slots"]
    layers = list(dict.fromkeys(layer for layer, _ in slots))
    per_worker = [npz[f"{config}/local_inversions/{r}"] for npz in runs[launch]
                  for r in range(sum(1 for k in npz.files if k.startswith(f"{config}/local_inversions/")))]
    assert len(per_worker) == 2
    total_single = single[f"{config}/local_inversions/0"]
    assert (total_single > 0).all()
    # the owners the optimizer uses: greedy by cost; recompute from the worker's counts
    owner_of_layer = {}
    for worker, counts in enumerate(per_worker):
        for (layer, _), count in zip(slots, counts):
            if count > 0:
                assert owner_of_layer.setdefault(layer, worker) == worker, f"{layer} inverted on two workers"
    assert set(owner_of_layer) == set(layers)
    assert set(owner_of_layer.values()) == {0, 1}  # both workers did a share
    # together the workers did exactly the single process's inversions, each once
    np.testing.assert_array_equal(per_worker[0] + per_worker[1], total_single)
    # the biggest layer ("hidden": A is 65x65) is alone on its worker (greedy balance)
    big = owner_of_layer["hidden"]
    assert [layer for layer, w in owner_of_layer.items() if w == big] == ["hidden"]


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_rank0_checkpoint_resumes_on_two_workers_and_on_one(runs, launch, config):
    single = runs["single"][0]
    reference = _weights(single, f"{config}/continued")
    for rank, npz in enumerate(runs[launch]):
        _assert_close(_weights(npz, f"{config}/resumed"), reference, f"{launch} rank {rank} resumed on 2",
                      **_tolerance(config))
    _assert_close(_weights(single, f"from/{launch}_{config}"), reference, f"{launch} checkpoint resumed on 1",
                  **_tolerance(config))


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_bytes_sent_counts_exactly_the_collectives_that_ran(runs, launch, config):
    """``communication_summary()['bytes_sent']`` against the traced plan and the refresh counters.

    tf.distribute runs every collective every step: a worker sent STEPS times its plan (its
    all-gather payload padded to the largest share).
    Horovod skips a conditional collective in steps where nothing it carries is due (the
    Levenberg-Marquardt losses of the default step control, due every 5 steps, never run): KFAC's
    inverses (interval 2) travel in the steps where an inverse was recomputed (the single
    process's inversion counter says how many), SPNGD's statistics in steps where one was
    refreshed (at least the most-refreshed statistic's count, at most STEPS, in whole payloads).
    """
    steps = 4  # STEPS of tests/_distributed_worker.py
    single_summary = runs["info"]["configs"][config]["summary"]
    for rank, npz in enumerate(runs[launch]):
        summary = json.loads(str(npz[f"{config}/communication"]))
        assert summary["workers"] == 2 and summary["backend"] == ("horovod" if launch == "horovod" else "tf.distribute")
        sent = int(npz[f"{config}/bytes_sent/0"])
        plan = summary["collectives"]
        if launch != "horovod":
            assert plan and not any(c["conditional"] for c in plan)
            assert sent == steps * sum(c["bytes"] for c in plan)
            continue
        always = sum(c["bytes"] for c in plan if not c["conditional"])
        # The defaults' quadratic model: its curvature products are conditional (measured every
        # quadratic_model_interval steps) but travel in each of the first MEASURED_FIRST_STEPS, so in
        # all 4; the Levenberg-Marquardt losses only every 5th step (damping_control_interval), never in 4.
        curvature = [c for c in plan if c["what"] == "curvature products"]
        assert len(curvature) == 1 and curvature[0]["conditional"], plan
        assert steps <= quadratic_model.MEASURED_FIRST_STEPS
        assert [c["what"] for c in plan if c["conditional"]][-1:] == ["lm losses"], plan
        conditional = [c for c in plan if c["conditional"] and c["what"] not in ("lm losses", "curvature products")]
        assert len(conditional) == 1, plan
        extra, payload = sent - steps * (always + curvature[0]["bytes"]), conditional[0]["bytes"]
        if config.endswith("_inverses"):  # KFAC's statistics (and EKFAC's diagonal) travel every step
            assert conditional[0]["what"] == "inverses"
            inverted_in = max(row["inversions"] for row in single_summary)
            assert 0 < inverted_in < steps
            assert extra == inverted_in * payload
        else:
            assert conditional[0]["what"] == "statistics"
            assert payload > 0 and extra % payload == 0
            assert max(row["refreshes"] for row in single_summary) <= extra // payload <= steps
        assert sent == summary["bytes_sent"] and summary["bytes_per_step"] == pytest.approx(sent / steps)


@pytest.mark.slow
@pytest.mark.parametrize("processes,mode", [(2, "auto"), (4, "inverses"), (4, "gradients")])
def test_horovod_example_runs(tmp_path, processes, mode):
    """The example as a user launches it. With 4 processes and 3 layers rank 3 owns no layer: it
    sends an empty payload to the all-gather, which once deadlocked the job (communication/horovod.py)."""
    horovodrun = shutil.which("horovodrun")
    assert horovodrun, "horovodrun not found: run `bash scripts/install_horovod.sh`"
    proc = subprocess.run(
        [horovodrun, "-np", str(processes), "--gloo", "-H", f"localhost:{processes}", sys.executable,
         os.path.join(ROOT, "examples", "horovod_mnist.py"), "--epochs", "1", "--steps", "3",
         "--model-parallel", mode, "--checkpoint", str(tmp_path / "m.keras")],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    _check(proc, "examples/horovod_mnist.py")
    reports = re.findall(
        r"rank (\d+): train loss ([0-9.]+) \(mean over processes\), test accuracy ([0-9.]+), "
        r"inverted layers (\[.*\]), sent (\d+) kB per step", proc.stdout)
    assert sorted(int(r[0]) for r in reports) == list(range(processes)), proc.stdout
    # identical weights give one test accuracy; AverageMetrics gives one train loss (each process
    # trained on its own share, so without it the logged losses differ).
    assert len({r[2] for r in reports}) == 1, f"ranks disagree: {reports}"
    assert len({r[1] for r in reports}) == 1, f"train losses not averaged: {reports}"
    owned = {int(r[0]): ast.literal_eval(r[3]) for r in reports}
    assert sorted(sum(owned.values(), [])) == sorted(["dense", "dense_1", "dense_2"]), owned
    if processes == 4:
        assert owned[3] == [], owned
    # at least the gradients (784-128-64-10: 109,386 float32 parameters) travel every step
    assert all(int(r[4]) >= 437 for r in reports), reports
    assert (tmp_path / "m.keras").exists()

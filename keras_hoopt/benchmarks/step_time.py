"""Step time of one or several source trees, measured interleaved on this machine.

    python -m keras_hoopt.benchmarks.step_time --trees /path/to/old /path/to/new \
        --workload mnist_mlp --optimizers sgd spngd --steps 600 --repeats 3

For each repetition, optimizer and tree (in that nesting, so the trees
alternate and share the machine's drift) a fresh process imports
``keras_hoopt`` from that tree (``PYTHONPATH``), builds the workload's model,
fits 10 warm-up steps (trace included: ``setup_s``) and then ``--steps``
steps without shuffling, and reports milliseconds per step. The table gives
each tree's median per optimizer and every repetition. Use it to show what a
change costs: check out the base commit into a second folder (``git worktree
add``) and pass both. ``--trees`` defaults to this checkout alone. With
``--in-process`` one process per tree builds every optimizer's model, fits
each 10 warm-up steps, then fits them in turn in ``--repeats`` rounds of
``--steps`` steps: on a machine whose speed moves between processes (this
one has run the same autoencoder step at 85 and at 140 ms in two processes)
the rounds share it. Read the rounds after the first, which holds a
curvature optimizer's early refreshes.

``kfac``, ``spngd`` and ``thor`` are the fixed step (``step_size="fixed"``,
learning rate 0.1, damping 1e-2; KFAC refreshing every 10 steps);
``spngd_default`` is SPNGD with its defaults (the quadratic model's step and
Levenberg-Marquardt damping), ``spngd_default_quarter`` the same with the
curvature products on a quarter of the batch, ``spngd_default_forward_mode``
with them in forward mode and ``spngd_default_central`` with central
differences instead of one-sided ones, and
``spngd_default_low_rank`` with ``preconditioner="low_rank"`` and
``spngd_default_kronecker`` with ``preconditioner="kronecker"`` (the exact
form everywhere, instead of the default ``"auto"``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

_COMMON = r"""
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, keras, keras_hoopt
from keras_hoopt.benchmarks.workloads import WORKLOADS
name = sys.argv[1]
workload = WORKLOADS[name]
(x, y), _ = workload.load_xy()
options = dict(learning_rate=0.1, damping=1e-2, step_size="fixed", **workload.curvature_options)
def make(optimizer):
    return {
        "sgd": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "kfac": lambda: keras_hoopt.KFAC(factor_update_interval=10, inverse_update_interval=10, **options),
        "spngd": lambda: keras_hoopt.SPNGD(**options),
        "thor": lambda: keras_hoopt.THOR(**options),
        "thor_full": lambda: keras_hoopt.THOR(split_dim=None, **options),
        # The defaults (the quadratic model's step with Levenberg-Marquardt damping), on the whole batch
        # and with the curvature products on a quarter of it.
        "spngd_default": lambda: keras_hoopt.SPNGD(**workload.curvature_options),
        "spngd_default_quarter": lambda: keras_hoopt.SPNGD(quadratic_model_batch_fraction=0.25, **workload.curvature_options),
        # The defaults with the quadratic model's curvature products measured every step / every 4th step.
        "spngd_default_qm1": lambda: keras_hoopt.SPNGD(quadratic_model_interval=1, **workload.curvature_options),
        "spngd_default_qm4": lambda: keras_hoopt.SPNGD(quadratic_model_interval=4, **workload.curvature_options),
        # The defaults with the curvature products in forward mode (the default before central differences),
        # and with the low-rank form of the wide factors.
        "spngd_default_forward_mode": lambda: keras_hoopt.SPNGD(quadratic_model_products="forward_mode", **workload.curvature_options),
        "spngd_default_central": lambda: keras_hoopt.SPNGD(quadratic_model_products="finite_differences", **workload.curvature_options),
        "spngd_default_low_rank": lambda: keras_hoopt.SPNGD(preconditioner="low_rank", **workload.curvature_options),
        "spngd_default_kronecker": lambda: keras_hoopt.SPNGD(preconditioner="kronecker", **workload.curvature_options),
        "spngd_default_low_rank_64": lambda: keras_hoopt.SPNGD(
            preconditioner="low_rank", preconditioner_rank=64, **workload.curvature_options
        ),
    }[optimizer]()
batch = workload.batch_size


def built(optimizer):
    keras.utils.set_random_seed(0)
    model = workload.build()
    model.compile(optimizer=make(optimizer), loss=workload.loss)
    return model
"""

_CHILD = _COMMON + r"""
optimizer, steps = sys.argv[2], int(sys.argv[3])
model = built(optimizer)
n = batch * (steps + 10)
index = np.arange(n) % len(x)
xs, ys = x[index], y[index]
start = time.perf_counter()
model.fit(xs[: 10 * batch], ys[: 10 * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
setup = time.perf_counter() - start
start = time.perf_counter()
model.fit(xs[10 * batch:], ys[10 * batch:], batch_size=batch, epochs=1, shuffle=False, verbose=0)
print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - start) / steps, "setup_s": setup}))
"""

# --in-process: every optimizer's model in one process, fitted in turn for `steps` steps per round.
_ROUNDS_CHILD = _COMMON + r"""
steps, rounds, optimizers = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
index = np.arange(batch * steps) % len(x)
xs, ys = x[index], y[index]
models, rows = {}, []
for optimizer in optimizers:
    models[optimizer] = built(optimizer)
    start = time.perf_counter()
    models[optimizer].fit(xs[: 10 * batch], ys[: 10 * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    rows.append({"optimizer": optimizer, "repeat": -1, "setup_s": time.perf_counter() - start})
for repeat in range(rounds):
    for optimizer, model in models.items():
        start = time.perf_counter()
        model.fit(xs, ys, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        rows.append({"optimizer": optimizer, "repeat": repeat, "ms_per_step": 1000 * (time.perf_counter() - start) / steps})
print(json.dumps(rows))
"""

OPTIMIZERS = (
    "sgd", "adam", "kfac", "spngd", "thor", "thor_full", "spngd_default", "spngd_default_quarter", "spngd_default_qm1",
    "spngd_default_qm4", "spngd_default_forward_mode",
    "spngd_default_central", "spngd_default_low_rank", "spngd_default_kronecker", "spngd_default_low_rank_64",
)


def _child(tree, script, arguments, what):
    """Run ``script`` in a fresh process importing keras_hoopt from ``tree``: its last stdout line, parsed."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", script, *arguments], cwd=os.path.abspath(tree), env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {what}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(tree, workload, optimizer, steps):
    """One fresh process importing keras_hoopt from ``tree``: ``{"ms_per_step", "setup_s"}``."""
    return _child(tree, _CHILD, [workload, optimizer, str(steps)], optimizer)


def measure_in_process(tree, workload, optimizers, steps, rounds):
    """One process with every optimizer's model, fitted in turn ``rounds`` times for ``steps`` steps:
    ``[{tree, optimizer, repeat, ms_per_step, setup_s}]`` (``setup_s``: its 10 warm-up steps)."""
    rows = _child(tree, _ROUNDS_CHILD, [workload, str(steps), str(rounds), *optimizers], " ".join(optimizers))
    setup = {r["optimizer"]: r["setup_s"] for r in rows if r["repeat"] < 0}
    out = [{"tree": tree, **r, "setup_s": setup[r["optimizer"]]} for r in rows if r["repeat"] >= 0]
    for r in out:
        print(f"  {tree} {r['optimizer']} round {r['repeat']}: {r['ms_per_step']:.2f} ms/step", flush=True)
    return out


def run(trees, workload, optimizers, steps, repeats, in_process=False):
    """``[{tree, optimizer, repeat, ms_per_step, setup_s}]``, interleaved."""
    if in_process:
        return [row for tree in trees for row in measure_in_process(tree, workload, optimizers, steps, repeats)]
    rows = []
    for repeat in range(repeats):
        for optimizer in optimizers:
            for tree in trees:
                result = measure(tree, workload, optimizer, steps)
                rows.append({"tree": tree, "optimizer": optimizer, "repeat": repeat, **result})
                print(f"  {tree} {optimizer} #{repeat}: {result['ms_per_step']:.2f} ms/step", flush=True)
    return rows


def table(rows, trees, optimizers):
    """Markdown: per optimizer and tree, the median ms/step and setup, and every repetition."""
    lines = ["| optimizer | tree | median ms/step | runs (ms/step) | median setup s |", "|---|---|---|---|---|"]
    for optimizer in optimizers:
        for tree in trees:
            mine = [r for r in rows if r["tree"] == tree and r["optimizer"] == optimizer]
            ms = [r["ms_per_step"] for r in mine]
            setup = statistics.median(r["setup_s"] for r in mine)
            runs = ", ".join(f"{m:.1f}" for m in ms)
            lines.append(f"| {optimizer} | {tree} | {statistics.median(ms):.2f} | {runs} | {setup:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=[os.getcwd()], help="source trees to compare")
    parser.add_argument("--workload", default="mnist_mlp")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "spngd"], choices=OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--in-process", action="store_true",
        help="one process per tree holding every optimizer's model, fitted in turn in --repeats rounds of "
        "--steps steps (this machine's speed moves between processes; within one it is steadier)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    rows = run(args.trees, args.workload, args.optimizers, args.steps, args.repeats, args.in_process)
    print(table(rows, args.trees, args.optimizers))
    return rows


if __name__ == "__main__":
    main()

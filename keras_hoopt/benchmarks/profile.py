"""Per-stage profile of the train step: milliseconds per step in each named stage of the curvature step.

    python -m keras_hoopt.benchmarks --profile --workloads mnist_mlp mnist_cnn mnist_autoencoder
    python -m keras_hoopt.benchmarks.profile --workloads digits_mlp --optimizers sgd spngd --steps 20

For each workload and optimizer, a fresh process builds the workload's model,
compiles it without XLA (so that every op keeps its name scope), fits
``--warmup`` steps (the trace and the first refreshes; ``setup_s`` is their
time, from which ``warmup`` times the steady step is subtracted: ``trace_s``),
then ``--steps`` steps timed (``ms/step``, wall clock), then ``--steps`` more
under the TensorFlow profiler. The profile's op self-times (its
``framework_op_stats``) are grouped by where each op lives:

* one of :data:`keras_hoopt.optimizers.step.STAGES` (the first name scope of
  the op that is a stage of :class:`~keras_hoopt.optimizers.step.CurvatureStep`);
* ``input pipeline`` (tf.data's ``Iterator::...``);
* ``backward`` (``.../gradient_tape/...``: Keras's gradient of the loss);
* ``optimizer, other`` (inside the optimizer's name scope but in no stage:
  Keras's own bookkeeping, a first-order optimizer's whole update);
* ``forward and loss`` (everything else).

Each group is reported in milliseconds of op time per step. Op time is
summed over TensorFlow's threads, so on several cores the groups can add up
to more than the wall-clock step; on one core they add up to it less the
framework's own overhead. ``ops/step`` is the number of op executions per
step (the graph's size as it runs: many small ops cost more than their
FLOPs). The optimizers are those of ``python -m keras_hoopt.benchmarks``
(:mod:`keras_hoopt.benchmarks.optimizers`), each at the first learning rate
of its quick grid.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

OTHER_GROUPS = ("input pipeline", "forward and loss", "backward", "optimizer, other")
DEFAULT_WORKLOADS = ("mnist_mlp", "mnist_cnn", "mnist_autoencoder")
DEFAULT_OPTIMIZERS = ("sgd", "adam", "spngd", "spngd_fixed", "kfac")

_UNIQUIFIED = re.compile(r"_\d+$")
#: The shared graph functions' ops (:func:`keras_hoopt.linalg.shared_function`) lose their caller's
#: scope; they are the refreshes' linear algebra (retried Cholesky inverses, range finders).
SHARED_FUNCTION_SCOPE = "shared_function"
SHARED_FUNCTION_STAGE = "refresh_preconditioners"


def stage_of(op_name, optimizer_name, stages):
    """The group of one profiled op, from its name (``scope/scope/.../op``; the train function's
    ops are under ``StatefulPartitionedCall/``, tf.data's are ``Iterator::...``)."""
    if op_name.startswith("Iterator::"):
        return "input pipeline"
    scopes = [_UNIQUIFIED.sub("", part) for part in op_name.split("/")[:-1]]
    if SHARED_FUNCTION_SCOPE in scopes and SHARED_FUNCTION_STAGE in stages:
        return SHARED_FUNCTION_STAGE
    for scope in scopes:
        if scope in stages:
            return scope
    if "gradient_tape" in scopes:
        return "backward"
    if optimizer_name in scopes:
        return "optimizer, other"
    return "forward and loss"


def group_op_stats(rows, optimizer_name, stages, steps):
    """``({group: ms per step}, op executions per step)`` from framework_op_stats rows."""
    groups = {name: 0.0 for name in (*stages, *OTHER_GROUPS)}
    executions = 0
    for row in rows:
        if row["type"] == "IDLE":
            continue
        groups[stage_of(row["operation"], optimizer_name, stages)] += row["total_self_time"] / 1000.0 / steps
        executions += row["occurrences"]
    return groups, executions / steps


def _op_stats(logdir):
    """The rows of the profile's framework_op_stats table (``[{column id: value}]``)."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the TensorFlow profiler wrote no trace under {logdir}")
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not ok:
        raise RuntimeError("the TensorFlow profiler's trace could not be read")
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    return [dict(zip(columns, (c.get("v") for c in row["c"]))) for row in table["rows"]]


def profile_one(workload_name, optimizer_name, steps, warmup):
    """In this process: ``{setup_s, trace_s, ms_per_step, groups, ops_per_step}`` of one optimizer."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_hoopt.benchmarks.optimizers import CURVATURE_OPTIMIZERS, OPTIMIZERS
    from keras_hoopt.benchmarks.workloads import WORKLOADS
    from keras_hoopt.optimizers.step import STAGES

    workload = WORKLOADS[workload_name]
    (x, y), _ = workload.load_xy()
    keras.utils.set_random_seed(0)
    model = workload.build()
    factory, _, quick_grid = OPTIMIZERS[optimizer_name]
    options = workload.curvature_options if optimizer_name in CURVATURE_OPTIMIZERS else {}
    optimizer = factory(quick_grid[0], **options)
    model.compile(optimizer=optimizer, loss=workload.loss, jit_compile=False)
    batch = workload.batch_size
    index = np.arange(batch * (warmup + 2 * steps)) % len(x)
    xs, ys = x[index], y[index]
    parts = [slice(0, warmup * batch), slice(warmup * batch, (warmup + steps) * batch),
             slice((warmup + steps) * batch, None)]

    def fit(part):
        start = time.perf_counter()
        model.fit(xs[part], ys[part], batch_size=batch, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - start

    setup = fit(parts[0])
    timed = fit(parts[1])
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            fit(parts[2])
        finally:
            tf.profiler.experimental.stop()
        rows = _op_stats(logdir)
    groups, ops_per_step = group_op_stats(rows, optimizer.name, STAGES, steps)
    step = timed / steps
    return {
        "setup_s": setup,
        "trace_s": max(setup - warmup * step, 0.0),
        "ms_per_step": 1000.0 * step,
        "groups": groups,
        "ops_per_step": ops_per_step,
    }


def measure(workload, optimizer, steps, warmup):
    """:func:`profile_one` in a fresh process (no state shared between optimizers)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_hoopt.benchmarks.profile", "--child", workload, optimizer, str(steps),
         str(warmup)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"profile of {optimizer} on {workload} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results, optimizers):
    """Markdown, one table per workload: a column per optimizer, a row per stage and group."""
    from keras_hoopt.optimizers.step import STAGES

    lines = []
    for workload, by_optimizer in results.items():
        present = [o for o in optimizers if o in by_optimizer]
        sgd = by_optimizer.get("sgd", {}).get("ms_per_step")
        lines += [f"### {workload}", "", "| | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]

        def row(label, values):
            lines.append(f"| {label} | " + " | ".join(values) + " |")

        row("**ms/step (wall)**", [f"**{by_optimizer[o]['ms_per_step']:.1f}**" for o in present])
        if sgd:
            row("vs SGD", [f"{by_optimizer[o]['ms_per_step'] / sgd:.2f}x" for o in present])
        row("setup s (trace + warm-up)", [f"{by_optimizer[o]['setup_s']:.2f}" for o in present])
        row("trace s", [f"{by_optimizer[o]['trace_s']:.2f}" for o in present])
        row("ops/step", [f"{by_optimizer[o]['ops_per_step']:.0f}" for o in present])
        for group in (*OTHER_GROUPS, *STAGES):
            values = [by_optimizer[o]["groups"].get(group, 0.0) for o in present]
            if any(v >= 0.005 for v in values):
                row(group, [f"{v:.2f}" if v >= 0.005 else "-" for v in values])
        lines.append("")
    return "\n".join(lines)


def run(workloads, optimizers, steps, warmup, progress=print):
    results = {}
    for workload in workloads:
        results[workload] = {}
        for optimizer in optimizers:
            result = measure(workload, optimizer, steps, warmup)
            results[workload][optimizer] = result
            progress(f"  {workload} {optimizer}: {result['ms_per_step']:.1f} ms/step, "
                     f"{result['ops_per_step']:.0f} ops/step, setup {result['setup_s']:.1f} s")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        workload, optimizer, steps, warmup = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(profile_one(workload, optimizer, steps, warmup)))
        return None
    from keras_hoopt.benchmarks.optimizers import OPTIMIZERS
    from keras_hoopt.benchmarks.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=sorted(WORKLOADS))
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=sorted(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=30, help="steps timed, and as many profiled")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (trace, first refreshes)")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    results = run(args.workloads, args.optimizers, args.steps, args.warmup)
    text = table(results, args.optimizers)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()

"""Distributed benchmark: bytes per step and per-worker inversion time with 1, 2, 4 Horovod processes.

    python -m keras_hoopt.benchmarks.distributed [--workers 1 2 4] [--steps 12] [--optimizer kfac|spngd]

For each number of processes ``W`` and each model-parallel mode, launches
``horovodrun -np W --gloo`` on this machine; every process trains on the
MNIST-5k MLP (784-128-64-10) with a global batch of 256, either KFAC with
statistics and inverses refreshed every step (the worst case for
communication; the default) or SPNGD with its adaptive intervals, and reports

* the bytes it contributes per step to each collective (gradients,
  statistics, inverses or preconditioned gradients), from the optimizer's
  communication plan, and the bytes it actually sent per step on average
  (``communication_summary()``: Horovod skips the statistics and inverses in
  steps where none is due);
* the time it spends inverting its own layers (the owned factors inverted
  in a compiled loop, median of repeats), and its share of the cost model;
* wall-clock milliseconds per step (after the first, traced, step).

Rank 0 prints one JSON line per run; the driver prints a Markdown table. On a
2-core CPU 4 processes oversubscribe the cores: step times then measure
contention, the per-worker inversion time and bytes remain meaningful.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

MODES = ("off", "inverses", "gradients")


def make_optimizer(name, mode):
    import keras_hoopt

    if name == "kfac":
        return keras_hoopt.KFAC(learning_rate=0.1, damping=1e-2, inverse_update_interval=1, model_parallel=mode,
                                step_size="fixed")
    return keras_hoopt.SPNGD(learning_rate=0.1, damping=1e-2, model_parallel=mode, step_size="fixed")


def worker(mode, steps, optimizer_name="kfac"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import horovod.tensorflow as hvd
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_hoopt
    from keras_hoopt.benchmarks.workloads import WORKLOADS

    hvd.init()
    workload = WORKLOADS["mnist_mlp"]
    (x, y), _ = workload.load()
    global_batch = 256
    share = global_batch // hvd.size()
    index = np.concatenate([
        np.arange(s * global_batch + hvd.rank() * share, s * global_batch + (hvd.rank() + 1) * share)
        for s in range(steps)
    ]) % len(x)
    keras.utils.set_random_seed(0)
    model = workload.build()
    optimizer = make_optimizer(optimizer_name, mode)
    model.compile(optimizer=optimizer, loss=workload.loss)

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x[index], y[index], batch_size=share, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras_hoopt.callbacks.BroadcastGlobalVariables(0), Timer()])
    att = optimizer._attachment
    me = hvd.rank()
    owned = [(block, names) for (block, _, names), owner in zip(att.blocks, att.owners) if owner in (me, -1)]
    statistics = {}
    for block, names in owned:
        for name in names:
            statistics[(block.name, name)] = tf.constant(optimizer.statistic(block.name, name))

    @tf.function
    def invert_mine():
        out = []
        for block, names in owned:
            stats = {n: statistics[(block.name, n)] for n in names}
            for name in names:
                out.append(block.compute_inverse(name, stats, tf.constant(1e-2), None)[0])
        return out

    invert_mine()
    repeats = []
    for _ in range(5):
        start = time.perf_counter()
        invert_mine()
        repeats.append(time.perf_counter() - start)
    inversion_ms = float(np.median(repeats) * 1e3)
    step_ms = float(np.median(times[1:]) * 1e3) if len(times) > 1 else float("nan")
    gathered = hvd.allgather(tf.constant([[inversion_ms, step_ms]], tf.float64)).numpy()
    plan = {}
    for c in att.communicator.plan:
        key = c.what + (" (only when due)" if c.conditional else "")
        plan[key] = plan.get(key, 0) + c.bytes
    if me == 0:
        print("RESULT " + json.dumps({
            "workers": hvd.size(), "mode": att.mode, "owners": att.owners,
            "inversion_ms": gathered[:, 0].tolist(), "step_ms": gathered[:, 1].tolist(), "bytes": plan,
            "gradient_bytes": sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables),
            "sent_per_step": optimizer.communication_summary()["bytes_per_step"],
        }), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--optimizer", default="kfac", choices=("kfac", "spngd"),
                        help="kfac: every factor refreshed every step (default); spngd: adaptive intervals")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.mode, args.steps, args.optimizer)
        return
    horovodrun = shutil.which("horovodrun")
    if horovodrun is None:
        sys.exit("horovodrun not found: run `bash scripts/install.sh` (it builds Horovod).")
    rows = []
    for workers in args.workers:
        for mode in (args.modes if workers > 1 else ["off"]):
            command = [horovodrun, "-np", str(workers), "--gloo", "-H", f"localhost:{workers}", sys.executable,
                       "-m", "keras_hoopt.benchmarks.distributed", "--worker", "--mode", mode, "--steps",
                       str(args.steps), "--optimizer", args.optimizer]
            print(f"running {workers} process(es), model_parallel={mode} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
            lines = [line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT " in line]
            if proc.returncode != 0 or not lines:
                sys.exit(f"run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1]))
    print(f"{args.optimizer.upper()}, {args.steps} steps")
    print("| processes | model_parallel | bytes per step when it runs (by collective) | "
          "sent per step (measured mean, rank 0) | gradients alone | "
          "inversion ms per worker (own layers) | step ms (median per worker) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sent = ", ".join(f"{k}: {v / 1e3:.0f} kB" for k, v in r["bytes"].items()) or "none"
        print(f"| {r['workers']} | {r['mode']} | {sent} | {r['sent_per_step'] / 1e3:.0f} kB | "
              f"{r['gradient_bytes'] / 1e3:.0f} kB | "
              f"{' / '.join(f'{t:.1f}' for t in r['inversion_ms'])} | "
              f"{' / '.join(f'{t:.0f}' for t in r['step_ms'])} |")


if __name__ == "__main__":
    main()

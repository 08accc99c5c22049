"""Command line: ``python -m keras_hoopt.benchmarks [--quick] [--out DIR]``.

Workloads (real data, no download): ``mnist_mlp`` and ``mnist_cnn`` (MNIST-5k
classifiers, the CNN with BatchNorm), ``mnist_autoencoder`` (the classic
784-1000-500-250-30-250-500-1000-784 deep autoencoder, tanh, sigmoid
cross-entropy) and ``digits_mlp`` (scikit-learn's 8x8 digits) run by default;
``text_transformer`` (a small causal transformer) and ``text_lstm`` (an LSTM),
character language models on the English documentation CPython ships
(``pydoc_data``), run when named with ``--workloads``. Optimizers: KFAC,
SPNGD, THOR, SGD+momentum, Adam and Keras's Muon, each with a small
learning-rate grid.

Trains every (workload, optimizer, learning rate) combination with a line of
progress per epoch, keeps the best learning rate of each optimizer's grid
(fastest to the training-loss target, else lowest final loss) and prints a
Markdown table (epochs and seconds to the train-loss and test targets,
amortised ms/step, peak memory, optimizer state) and how SPNGD compares with
the best of Adam and SGD; writes the table (results.md), a CSV of every epoch
of every run (runs.csv) and one PNG per workload (train loss vs epoch and vs
seconds) to ``--out``. ``--profile`` prints instead the per-stage profile of
the step (milliseconds per stage, ops per step, trace time;
:mod:`keras_hoopt.benchmarks.profile`, whose arguments it takes). ``--quick``
(the README's main job) runs fewer epochs
with a 2-point grid and fewer optimizers (:data:`QUICK_OPTIMIZERS`). ``--batch-multiplier K`` trains every workload at K times its
batch size (the same epochs, so K times fewer steps): SP-NGD's claim is
large-batch training.

The exact second-order yardstick (loss vs steps of SGD, Adam, KFAC, SPNGD,
exact natural gradient and Newton on a small problem, and K-FAC's error
against the exact Fisher) is ``python -m keras_hoopt.benchmarks.second_order_paths``.
"""

import argparse
import csv
import dataclasses
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_hoopt.benchmarks.optimizers import OPTIMIZERS  # noqa: E402
from keras_hoopt.benchmarks.runner import run_grid  # noqa: E402
from keras_hoopt.benchmarks.workloads import WORKLOADS  # noqa: E402

#: What ``--quick`` (the README's main job) runs without --optimizers: SPNGD with its defaults and
#: with the fixed step, against SGD+momentum, Adam and Muon (KFAC and THOR with the defaults cost
#: as much as SPNGD's and run without --quick or when named).
QUICK_OPTIMIZERS = ("spngd", "spngd_fixed", "sgd", "adam", "muon")
#: What `python -m keras_hoopt.benchmarks` runs without --workloads: the digit workloads.
DEFAULT_WORKLOADS = ("digits_mlp", "mnist_autoencoder", "mnist_cnn", "mnist_mlp")


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _percent(value):
    return "-" if value is None else f"{100 * value:.0f}%"


def _test_target(r):
    return f"test {'acc>=' if r.higher_test_is_better else 'loss<='}{r.target_test:g}"


def _table(best, grids):
    """One row per (workload, optimizer) at its best learning rate.

    ``grid`` the learning rates tried; ``x SGD`` is the amortised step time
    (whole epochs, every refresh and inversion included) relative to
    SGD+momentum's on the same workload; ``stats``/``inverses`` are the
    statistics computed and inverses recomputed as a share of "every
    statistic, every step" (KFAC's default is 100%/10%); ``setup s`` is the
    first epoch's extra time over a steady epoch (tracing the train step,
    plus the curvature optimizers' early refreshes). Seconds to a target
    include it. ``peak MB`` is the run's peak resident memory above the
    process's memory when it started; ``state MB`` the optimizer's variables.
    """
    sgd = {r.workload: r.seconds_per_step for r in best if r.optimizer == "sgd"}
    lines = [
        "| workload (targets) | optimizer | grid | best lr | ms/step | x SGD | stats | inverses | setup s "
        "| epochs to loss target | s to loss target | epochs to test target | s to test target "
        "| final train loss | best test | peak MB | state MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in best:
        ratio = r.seconds_per_step / sgd[r.workload] if r.workload in sgd else None
        lines.append(
            f"| {r.workload} (loss<={r.target_loss:g}, {_test_target(r)}) | {r.optimizer} "
            f"| {'/'.join(f'{lr:g}' for lr in grids[r.optimizer])} | {r.learning_rate:g} "
            f"| {r.seconds_per_step * 1e3:.1f} | {_fmt(ratio, '.2f')} | {_percent(r.statistic_fraction)} "
            f"| {_percent(r.inversion_fraction)} | {_fmt(r.setup_seconds, '.1f')} | {_fmt(r.epochs_to_loss, 'd')} "
            f"| {_fmt(r.seconds_to(r.epochs_to_loss), '.1f')} "
            f"| {_fmt(r.epochs_to_test, 'd')} | {_fmt(r.seconds_to(r.epochs_to_test), '.1f')} "
            f"| {r.final_loss:.4f} | {r.best_test:.4f} | {r.peak_memory_mb:.0f} | {r.optimizer_state_mb:.2f} |"
        )
    return "\n".join(lines)


def _goal(best, candidate="spngd", baselines=("adam", "muon", "sgd")):
    """Seconds to each target of ``candidate`` as a fraction of the best baseline's (the issue's
    goal: at most 0.5), and its amortised step time relative to SGD's (goal: at most 1.25)."""
    lines = []
    for workload in dict.fromkeys(r.workload for r in best):
        rows = {r.optimizer: r for r in best if r.workload == workload}
        if candidate not in rows:
            continue
        mine = rows[candidate]
        parts = []
        for label, epochs_of in (("loss target", lambda r: r.epochs_to_loss), ("test target", lambda r: r.epochs_to_test)):
            own = mine.seconds_to(epochs_of(mine))
            others = [rows[b].seconds_to(epochs_of(rows[b])) for b in baselines if b in rows]
            others = [t for t in others if t is not None]
            if own is None:
                parts.append(f"{label}: {candidate} did not reach it")
            elif not others:
                parts.append(f"{label}: {candidate} {own:.1f} s, no baseline reached it")
            else:
                parts.append(f"{label}: {candidate} {own:.1f} s = {own / min(others):.2f}x the best baseline")
        if "sgd" in rows:
            parts.append(f"step time {mine.seconds_per_step / rows['sgd'].seconds_per_step:.2f}x SGD")
        lines.append(f"* {workload}: " + "; ".join(parts))
    return "\n".join(lines)


def _plot(best, out):
    """``<workload>.png``: train loss vs epoch and vs seconds, best run of each optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for workload in dict.fromkeys(r.workload for r in best):
        fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        for r in (r for r in best if r.workload == workload):
            epochs = np.arange(1, len(r.epoch_loss) + 1)
            label = f"{r.optimizer} (lr {r.learning_rate:g})"
            by_epoch.plot(epochs, r.epoch_loss, marker=".", label=label)
            by_time.plot(np.cumsum(r.epoch_seconds), r.epoch_loss, marker=".", label=label)
        for axis, xlabel in ((by_epoch, "epoch"), (by_time, "wall-clock seconds")):
            axis.set_yscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("train loss")
            target = next(r.target_loss for r in best if r.workload == workload)
            axis.axhline(target, color="gray", linestyle=":", linewidth=1)
            axis.grid(alpha=0.3)
        by_epoch.legend(fontsize=8)
        fig.suptitle(workload)
        fig.tight_layout()
        path = os.path.join(out, f"{workload}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--profile" in argv:  # the per-stage profile of the step (keras_hoopt.benchmarks.profile)
        from keras_hoopt.benchmarks import profile

        return profile.main([a for a in argv if a != "--profile"])
    parser = argparse.ArgumentParser(prog="python -m keras_hoopt.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(DEFAULT_WORKLOADS),
        help="default: the four digit workloads; the text workloads (text_transformer, text_lstm) "
        "take minutes per optimizer on 2 CPU cores and run when named",
    )
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=None,
                        help=f"default: all ({', '.join(OPTIMIZERS)}); with --quick {', '.join(QUICK_OPTIMIZERS)}")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and a 2-point grid (a few minutes on 2 CPU cores)")
    parser.add_argument("--epochs", type=int, default=None, help="override the workload's epoch count")
    parser.add_argument("--jit", choices=["auto", "on", "off"], default="auto", help="jit_compile passed to model.compile")
    parser.add_argument("--batch-multiplier", type=int, default=1,
                        help="train every workload at this many times its batch size (same epochs: fewer steps); "
                        "SP-NGD's claim is large-batch training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-epoch-progress", action="store_true", help="print one line per run, not per epoch")
    parser.add_argument("--out", default="benchmark_results", help="folder for results.md, runs.csv and the PNG plots")
    args = parser.parse_args(argv)
    if args.optimizers is None:
        args.optimizers = list(QUICK_OPTIMIZERS if args.quick else OPTIMIZERS)
    if args.batch_multiplier < 1:
        parser.error(f"--batch-multiplier must be an int >= 1, got {args.batch_multiplier}")

    jit = {"auto": "auto", "on": True, "off": False}[args.jit]
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    best, runs, grids = [], [], {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        if args.batch_multiplier > 1:
            workload = dataclasses.replace(workload, batch_size=workload.batch_size * args.batch_multiplier)
        epochs = args.epochs or (workload.quick_epochs if args.quick else workload.epochs)
        print(f"{workload.name}: {workload.description}; {epochs} epochs, batch {workload.batch_size}", flush=True)
        for opt_name in args.optimizers:
            factory, grid, quick_grid = OPTIMIZERS[opt_name]
            grids[opt_name] = quick_grid if args.quick else grid
            print(f"  {opt_name}: learning-rate grid {grids[opt_name]}", flush=True)
            chosen, all_runs = run_grid(
                workload, opt_name, factory, grids[opt_name], epochs,
                progress=lambda line: print(line, flush=True),
                epoch_progress=(lambda line: print(line, flush=True)) if not args.no_epoch_progress else None,
                seed=args.seed, jit_compile=jit,
            )
            best.append(chosen)
            runs.extend(all_runs)
    import tensorflow as tf

    header = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}; jit_compile={args.jit}; "
        f"command: python -m keras_hoopt.benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}; "
        f"total {time.time() - started:.0f} s"
    )
    table = _table(best, grids)
    goal = _goal(best)
    print("\n" + header + "\n\n" + table + "\n\n" + goal)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(header + "\n\n" + table + "\n\n" + goal + "\n")
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["workload", "optimizer", "learning_rate", "epoch", "train_loss", "test_metric", "test_value",
                         "epoch_seconds", "statistic_fraction", "inversion_fraction", "peak_memory_mb",
                         "optimizer_state_mb"])
        for r in runs:
            metric = "accuracy" if r.higher_test_is_better else "loss"
            for e, (loss, test, sec) in enumerate(zip(r.epoch_loss, r.epoch_test, r.epoch_seconds), 1):
                writer.writerow([r.workload, r.optimizer, r.learning_rate, e, loss, metric, test, sec,
                                 r.statistic_fraction, r.inversion_fraction, r.peak_memory_mb, r.optimizer_state_mb])
    for path in _plot(best, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

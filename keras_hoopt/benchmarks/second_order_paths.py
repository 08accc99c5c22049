"""Loss vs steps of first- and second-order optimizers on a small problem.

``python -m keras_hoopt.benchmarks.second_order_paths [--out DIR] [--steps N]``

Problem: the first ``--examples`` (512) of scikit-learn's real 8x8 digits
(``keras_hoopt.datasets.load_digits``), a tanh MLP 64-``--hidden``-10 (logits,
softmax cross-entropy; 610 parameters with 8 hidden units), full-batch steps
from the same initial weights. Every optimizer runs a tiny learning-rate grid;
the best run (fewest steps to ``--target`` training loss, else lowest final
loss) is reported.

Prints two Markdown tables: steps to the target loss, final loss and seconds
per step of SGD+momentum, Adam, KFAC, SPNGD, exact natural gradient
(``NaturalGradient``, expected Fisher) and saddle-free ``Newton``; then the
relative Frobenius error of the exact Fisher's block diagonal and of K-FAC's
Kronecker blocks ``A (x) G`` against the exact Fisher of the same MLP, batch
and weights. Writes ``loss_vs_steps.png`` (matplotlib, Agg), ``loss_vs_steps.csv``
(every run of every grid) and ``results.md`` to ``--out``. About a minute on 2
CPU cores.
"""

import argparse
import csv
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# name -> (label, factory(lr), learning-rate grid)
OPTIMIZERS = {
    "sgd": ("SGD+momentum 0.9", lambda lr: _keras().optimizers.SGD(learning_rate=lr, momentum=0.9), [0.3, 1.0]),
    "adam": ("Adam", lambda lr: _keras().optimizers.Adam(learning_rate=lr), [0.03, 0.1]),
    "kfac": (
        "KFAC",
        lambda lr: _hoopt().KFAC(learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-2, inverse_update_interval=1),
        [0.1, 0.3],
    ),
    "spngd": (
        "SPNGD",
        lambda lr: _hoopt().SPNGD(learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-2),
        [0.1, 0.3],
    ),
    "ngd": (
        "NaturalGradient (exact Fisher)",
        lambda lr: _hoopt().NaturalGradient(learning_rate=lr, damping=3e-2),
        [0.5, 1.0],
    ),
    "newton": (
        "Newton (saddle-free)",
        lambda lr: _hoopt().Newton(learning_rate=lr, damping=3e-2, saddle_free=True),
        [0.5, 1.0],
    ),
}


def _keras():
    import keras

    return keras


def _hoopt():
    import keras_hoopt

    return keras_hoopt


def load_problem(examples=512):
    """``(x, y)``: the first ``examples`` training digits (pixels in [0, 1])."""
    (x, y), _ = _hoopt().datasets.load_digits()
    return x[:examples], y[:examples]


def build_model(hidden=8):
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="tanh", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="digits_mlp",
    )


def _loss():
    return _keras().losses.SparseCategoricalCrossentropy(from_logits=True)


def run(optimizer, x, y, steps, hidden=8, seed=0, jit_compile="auto"):
    """Full-batch training; returns ``(losses [steps + 1], seconds per step)``.

    ``losses[t]`` is the training loss after ``t`` steps. Seconds per step is
    the median over the steps after the first (which includes tracing).
    """
    keras = _keras()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_model(hidden)
    model.compile(optimizer=optimizer, loss=_loss(), jit_compile=jit_compile)
    losses, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(float(model.train_on_batch(x, y)))  # loss before this step's update
        seconds.append(time.perf_counter() - start)
    losses.append(float(model.evaluate(x, y, batch_size=len(x), verbose=0)))
    losses = [v if np.isfinite(v) else float("inf") for v in losses]
    return losses, float(np.median(seconds[1:] or seconds))


def steps_to(losses, target):
    for step, value in enumerate(losses):
        if value <= target:
            return step
    return None


def _rank(result, target):
    reached = steps_to(result["losses"], target)
    return (0, reached, result["losses"][-1]) if reached is not None else (1, result["losses"][-1], 0)


def fisher_errors(x, y, hidden=8, seed=0):
    """Relative Frobenius errors vs the exact Fisher of the MLP at its initial weights.

    Rows: ``(fisher, part, error)``. For ``empirical`` both matrices use the
    training labels; for ``mc`` K-FAC and the exact Monte-Carlo Fisher use the
    SAME sampled labels (same sampler and seed), so only the approximation
    differs. Parts: each layer's ``A (x) G`` vs its exact diagonal block; the
    exact block diagonal vs the full Fisher; K-FAC (block-diagonal Kronecker)
    vs the full Fisher.
    """
    keras, hoopt = _keras(), _hoopt()
    rows = []
    for fisher in ("empirical", "mc"):
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = build_model(hidden)
        exact = hoopt.NaturalGradient(fisher=fisher, seed=seed)
        model.compile(optimizer=exact, loss=_loss())
        full = exact.curvature_matrix(x, y).astype(np.float64)
        layout = exact.parameter_layout()
        kfac = hoopt.KFAC(
            learning_rate=0.0, momentum=0.0, factor_decay=0.0, kl_clip=None, fisher=fisher, seed=seed
        )
        model.compile(optimizer=kfac, loss=_loss(), jit_compile=False)
        model.train_on_batch(x, y)  # statistics of this batch at the same weights
        block_diagonal, kronecker = np.zeros_like(full), np.zeros_like(full)
        for layer in ("hidden", "logits"):
            offsets = [(o, int(np.prod(s))) for p, s, o in layout if p.split("/")[-2] == layer]
            start, stop = offsets[0][0], offsets[-1][0] + offsets[-1][1]
            block = full[start:stop, start:stop]
            approx = np.kron(kfac.statistic(layer, "A"), kfac.statistic(layer, "G"))
            block_diagonal[start:stop, start:stop] = block
            kronecker[start:stop, start:stop] = approx
            rows.append((fisher, f"`{layer}`: A (x) G vs exact block ({stop - start} params)", _relative(approx, block)))
        rows.append((fisher, "exact block diagonal vs full Fisher", _relative(block_diagonal, full)))
        rows.append((fisher, "K-FAC (all blocks) vs full Fisher", _relative(kronecker, full)))
    return rows


def _relative(approx, exact):
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def results_table(best, target):
    lines = [
        f"| optimizer | best lr | steps to loss <= {target:g} | loss after 5 steps | final loss | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in best:
        losses = r["losses"]
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {_fmt(steps_to(losses, target), 'd')} | {losses[min(5, len(losses) - 1)]:.4f} "
            f"| {losses[-1]:.4f} | {r['seconds'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def fisher_table(rows):
    lines = ["| Fisher | compared | relative Frobenius error |", "|---|---|---|"]
    lines += [f"| {fisher} | {part} | {error:.3f} |" for fisher, part, error in rows]
    return "\n".join(lines)


def plot(best, target, path):
    """Write the loss-vs-steps PNG; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in best:
        ax.plot(range(len(r["losses"])), r["losses"], marker=".", label=f"{r['label']} (lr {r['lr']:g})")
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel("training loss")
    ax.set_title("Digits MLP: loss vs steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_hoopt.benchmarks.second_order_paths",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="benchmark_results/second_order_paths", help="folder for the PNG, CSV and results.md")
    parser.add_argument("--steps", type=int, default=25, help="full-batch steps per run (default 25)")
    parser.add_argument("--target", type=float, default=0.1, help="training-loss target (default 0.1)")
    parser.add_argument("--examples", type=int, default=512, help="training digits used (default 512)")
    parser.add_argument("--hidden", type=int, default=8, help="hidden units of the MLP (default 8)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--jit", choices=["auto", "on", "off"], default="auto", help="jit_compile passed to model.compile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    jit = {"auto": "auto", "on": True, "off": False}[args.jit]
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    x, y = load_problem(args.examples)
    best, runs = [], []
    for name in args.optimizers:
        label, factory, grid = OPTIMIZERS[name]
        results = []
        for lr in grid:
            losses, seconds = run(factory(lr), x, y, args.steps, args.hidden, args.seed, jit)
            result = {"name": name, "label": label, "lr": lr, "losses": losses, "seconds": seconds}
            print(
                f"  {name:<7} lr={lr:<5g} steps to target {_fmt(steps_to(losses, args.target), 'd'):>3}  "
                f"final loss {losses[-1]:.4f}  {seconds * 1e3:.1f} ms/step",
                flush=True,
            )
            results.append(result)
        runs.extend(results)
        best.append(min(results, key=lambda r: _rank(r, args.target)))
    errors = fisher_errors(x, y, args.hidden, args.seed)

    import tensorflow as tf

    parameters = 64 * args.hidden + args.hidden + args.hidden * 10 + 10
    header = (
        f"Digits MLP 64-{args.hidden}-10 ({parameters} parameters), {len(x)} examples, full batch, "
        f"{args.steps} steps. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}; jit_compile={args.jit}; command: "
        f"python -m keras_hoopt.benchmarks.second_order_paths {' '.join(sys.argv[1:] if argv is None else argv)}; "
        f"total {time.time() - started:.0f} s"
    )
    table = results_table(best, args.target)
    ftable = fisher_table(errors)
    text = header + "\n\n" + table + "\n\nExact Fisher vs its approximations (initial weights, same batch):\n\n" + ftable
    print("\n" + text)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(args.out, "loss_vs_steps.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "learning_rate", "best", "step", "train_loss", "seconds_per_step"])
        for r in runs:
            is_best = any(r is b for b in best)
            for step, loss in enumerate(r["losses"]):
                writer.writerow([r["name"], r["lr"], int(is_best), step, loss, r["seconds"]])
    if plot(best, args.target, os.path.join(args.out, "loss_vs_steps.png")):
        print(f"\nwrote {args.out}/loss_vs_steps.png, loss_vs_steps.csv, results.md")
    else:
        print(f"\nwrote {args.out}/loss_vs_steps.csv, results.md (no PNG: pip install 'keras_hoopt[bench]' for matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

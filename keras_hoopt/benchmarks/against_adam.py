"""Tight targets: epochs and seconds each optimizer needs to reach Adam's best.

``python -m keras_hoopt.benchmarks.against_adam RUNS_CSV`` reads the ``runs.csv``
a benchmark run wrote (every epoch of every workload, optimizer and learning
rate) and, per workload, takes as targets the best training loss and the best
test value that Adam reached with any learning rate of its grid in the full
epoch budget. For every optimizer and each target it then reports the
learning rate of its grid that reached that target first (in cumulative
seconds; else the one with the best value), the epochs and seconds it took
(``-`` when never), and the best values over its grid. Each target has its own
choice because Adam's targets do: its best loss and its best test value may
come from different learning rates, and a user tuning for either picks that.
Prints a Markdown table, then one line per workload: the candidate's
(``--candidate``, default ``spngd``) seconds to each target as a multiple of
the fastest of the first-order baselines (Adam, Muon and SGD, where run), the
issue's goal being at most 0.5x.
"""

import argparse
import collections
import csv
import math

REFERENCE = "adam"
#: The optimizers a Keras user already has, that a candidate's seconds are held against.
BASELINES = ("adam", "muon", "sgd")


def read_runs(path):
    """``{(workload, optimizer, learning rate): [row per epoch]}`` of a runs.csv, epochs in order."""
    runs = collections.defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            key = (row["workload"], row["optimizer"], float(row["learning_rate"]))
            runs[key].append(
                {
                    "epoch": int(row["epoch"]),
                    "train_loss": float(row["train_loss"]),
                    "test_value": float(row["test_value"]) if row["test_value"] not in ("", "nan") else math.nan,
                    "higher_is_better": row["test_metric"] == "accuracy",
                    "seconds": float(row["epoch_seconds"]),
                }
            )
    for rows in runs.values():
        rows.sort(key=lambda r: r["epoch"])
    return dict(runs)


def _reached(rows, key, target, higher):
    """``(epochs, seconds)`` to the first epoch at or beyond ``target``, else ``None``."""
    seconds = 0.0
    for row in rows:
        seconds += row["seconds"]
        value = row[key]
        if not math.isnan(value) and (value >= target if higher else value <= target):
            return row["epoch"], seconds
    return None


def _fastest(per_lr, key, better):
    """``(lr, reached)`` of the learning rate first to its target (in seconds), else the one with the best value."""
    return min(
        per_lr.items(),
        key=lambda item: (item[1][key] is None, item[1][key][1] if item[1][key] else better(item[1])),
    )


def compare(runs, reference=REFERENCE):
    """Rows ``{workload, optimizer, learning_rate, test_learning_rate, loss_target, test_target, to_loss, to_test,
    best_loss, best_test}``; ``learning_rate`` is the one chosen for the loss target, ``test_learning_rate``
    the one for the test target."""
    out = []
    for workload in sorted({w for w, _, _ in runs}):
        mine = {k: v for k, v in runs.items() if k[0] == workload}
        adam = [rows for (w, o, _), rows in mine.items() if o == reference]
        if not adam:
            raise ValueError(f"workload {workload!r} has no {reference!r} runs to take the targets from")
        higher = adam[0][0]["higher_is_better"]
        sign = -1.0 if higher else 1.0
        loss_target = min(r["train_loss"] for rows in adam for r in rows)
        tests = [r["test_value"] for rows in adam for r in rows if not math.isnan(r["test_value"])]
        test_target = (max(tests) if higher else min(tests)) if tests else math.nan
        for optimizer in sorted({o for _, o, _ in mine}):
            per_lr = {}
            for (_, o, lr), rows in mine.items():
                if o != optimizer:
                    continue
                values = [r["test_value"] for r in rows if not math.isnan(r["test_value"])]
                per_lr[lr] = {
                    "to_loss": _reached(rows, "train_loss", loss_target, False),
                    "to_test": _reached(rows, "test_value", test_target, higher) if tests else None,
                    "best_loss": min(r["train_loss"] for r in rows),
                    "best_test": (max(values) if higher else min(values)) if values else math.nan,
                }
            lr, by_loss = _fastest(per_lr, "to_loss", lambda v: v["best_loss"])
            test_lr, by_test = _fastest(
                per_lr, "to_test", lambda v: sign * v["best_test"] if not math.isnan(v["best_test"]) else math.inf
            )
            best_tests = [v["best_test"] for v in per_lr.values() if not math.isnan(v["best_test"])]
            out.append(
                {
                    "workload": workload, "optimizer": optimizer, "learning_rate": lr, "test_learning_rate": test_lr,
                    "loss_target": loss_target, "test_target": test_target,
                    "to_loss": by_loss["to_loss"], "to_test": by_test["to_test"],
                    "best_loss": min(v["best_loss"] for v in per_lr.values()),
                    "best_test": ((max if higher else min)(best_tests)) if best_tests else math.nan,
                }
            )
    return out


def _cell(reached):
    return "-" if reached is None else f"{reached[0]} / {reached[1]:.0f} s"


def table(rows):
    lines = [
        "| workload | optimizer | lr | to Adam's best train loss (epochs / s) | lr | to Adam's best test value | "
        "best train loss | best test value |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} (targets {r['loss_target']:.4f} / {r['test_target']:.4f}) | {r['optimizer']} | "
            f"{r['learning_rate']:g} | {_cell(r['to_loss'])} | {r['test_learning_rate']:g} | {_cell(r['to_test'])} | "
            f"{r['best_loss']:.4f} | "
            f"{r['best_test']:.4f} |"
        )
    return "\n".join(lines)


def summary(rows, candidate="spngd", baselines=BASELINES):
    """One line per workload: ``candidate``'s seconds to each target over the fastest baseline's."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = {r["optimizer"]: r for r in rows if r["workload"] == workload}
        if candidate not in mine:
            continue
        parts = []
        for key, label in (("to_loss", "Adam's best train loss"), ("to_test", "Adam's best test value")):
            reached = [(mine[b][key][1], b) for b in baselines if b in mine and mine[b][key] is not None]
            own = mine[candidate][key]
            if own is None:
                parts.append(f"{label}: {candidate} did not reach it")
            elif not reached:
                parts.append(f"{label}: {candidate} {own[1]:.1f} s, no baseline reached it")
            else:
                seconds, fastest = min(reached)
                parts.append(f"{label}: {candidate} {own[1]:.1f} s = {own[1] / seconds:.2f}x {fastest}'s {seconds:.1f} s")
        lines.append(f"* {workload}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_csv", help="the runs.csv of a `python -m keras_hoopt.benchmarks` run")
    parser.add_argument("--candidate", default="spngd", help="the optimizer held against the baselines (spngd)")
    args = parser.parse_args(argv)
    rows = compare(read_runs(args.runs_csv))
    print(table(rows))
    lines = summary(rows, args.candidate)
    if lines:
        print()
        print(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

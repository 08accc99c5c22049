"""Scaling model for 8 to 1024 workers, from this machine's measurements and the model's shapes.

    python -m keras_hoopt.benchmarks.scaling_model [--model resnet50|mnist_mlp] [--bandwidth-gbps 100]
        [--latency-us 5] [--inversion-speedup 1] [--workers 8 32 128 512 1024]

What is measured, what is assumed:

* measured here: the time of this package's damped inverse
  (``keras_hoopt.linalg.damped_inverse``) for n = 256, 512, 1024, fitted as
  ``t = c n^3`` (``c`` printed); ``--inversion-speedup`` divides it (a GPU's
  speed over this CPU's: an assumption, no GPU was measured);
* exact, from the model: every curvature block this package builds
  (Dense, Conv2D, BatchNormalization; via the block registry), its factor
  shapes, the bytes of gradients ``4P`` and statistics ``S``, and the greedy
  owner assignment (``communication.placement``) for each worker count, so
  the largest per-worker inversion share is the one the optimizer would run;
  the bytes formula reproduces the distributed benchmark's measured plan
  (``mnist_mlp``: 3068 kB of gradients+statistics, docs/benchmarks.md);
* assumed: a ring all-reduce, ``2 (W-1)/W * bytes / bandwidth + 2 (W-1) * latency``,
  and all-gather, ``(W-1)/W * bytes / bandwidth + (W-1) * latency``, at the
  per-worker ``--bandwidth-gbps`` and ``--latency-us``.

Per worker and step it prints: the inversion time if every factor were
re-inverted (KFAC's inversion steps; SP-NGD re-inverts only a few percent,
docs/benchmarks.md) for ``off`` (every worker inverts everything) and for
model-parallel inversion (the largest owner share), the bytes and seconds of
the fused all-reduce, and of the all-gather of inverses or of preconditioned
gradients.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _blocks(model):
    from keras_hoopt.blocks.registry import block_type_for

    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        block_type = block_type_for(layer)
        if block_type is not None and layer.trainable_weights:
            out.append(block_type(layer))
    return out


def _model(name):
    import keras

    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=1000)
    from keras_hoopt.benchmarks.workloads import WORKLOADS

    return WORKLOADS[name].build()


def measure_inversion_constant(sizes=(256, 512, 1024), repeats=3):
    """``c`` in ``seconds = c n^3`` for this package's damped inverse on this machine (least squares)."""
    import numpy as np
    import tensorflow as tf

    from keras_hoopt.linalg import damped_inverse

    invert = tf.function(lambda m: damped_inverse(m, tf.constant(1e-3)))
    rng = np.random.default_rng(0)
    cubes, seconds = [], []
    for n in sizes:
        x = rng.normal(size=(2 * n, n)).astype("float32")
        matrix = tf.constant(x.T @ x / (2 * n))
        invert(matrix)  # trace
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = invert(matrix)
            result = result[0] if isinstance(result, (tuple, list)) else result
            _ = result.numpy()
            best = min(best, time.perf_counter() - start)
        cubes.append(float(n) ** 3)
        seconds.append(best)
    cubes, seconds = np.array(cubes), np.array(seconds)
    return float(cubes @ seconds / (cubes @ cubes)), dict(zip(sizes, seconds.tolist()))


def model_figures(model, split_dim=None):
    """``(parameters, statistic_bytes, [inversion cost per block])`` of a model's curvature blocks."""
    import math

    from keras_hoopt.communication.placement import inversion_cost

    blocks = _blocks(model)
    parameters = sum(math.prod(v.shape) for v in model.trainable_weights)
    statistic_bytes = sum(4 * math.prod(shape) for b in blocks for shape in b.statistic_shapes().values())
    costs = [inversion_cost(b.statistic_shapes(), split_dim) for b in blocks]
    return parameters, statistic_bytes, costs


def scaling_table(parameters, statistic_bytes, costs, c, workers, bandwidth, latency):
    """Rows of per-worker figures for each worker count (see the module docstring)."""
    from keras_hoopt.communication.placement import assign_owners

    gradient_bytes = 4 * parameters
    rows = []
    for w in workers:
        owners = assign_owners(costs, w)
        loads = [0] * w
        for cost, owner in zip(costs, owners):
            loads[owner] += cost
        reduce_bytes = gradient_bytes + statistic_bytes
        ring = 2 * (w - 1) / w
        rows.append({
            "workers": w,
            "inversion_off_s": c * sum(costs),
            "inversion_share_s": c * max(loads),
            "busy_workers": sum(1 for load in loads if load > 0),
            "all_reduce_MB": reduce_bytes / 1e6,
            "all_reduce_s": ring * reduce_bytes / bandwidth + 2 * (w - 1) * latency,
            "gather_inverses_s": (w - 1) / w * statistic_bytes / bandwidth + (w - 1) * latency,
            "gather_gradients_s": (w - 1) / w * gradient_bytes / bandwidth + (w - 1) * latency,
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_hoopt.benchmarks.scaling_model",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "mnist_mlp", "mnist_cnn",
                                                                "mnist_autoencoder", "digits_mlp"])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--bandwidth-gbps", type=float, default=100.0, help="per-worker network bandwidth, Gbit/s")
    parser.add_argument("--latency-us", type=float, default=5.0, help="per-hop latency, microseconds")
    parser.add_argument("--inversion-speedup", type=float, default=1.0,
                        help="divide the inversion times measured on this machine by this (an assumed GPU speedup)")
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.workers):
        parser.error("--workers: every count must be >= 1")
    if args.bandwidth_gbps <= 0 or args.latency_us < 0 or args.inversion_speedup <= 0:
        parser.error("--bandwidth-gbps and --inversion-speedup must be > 0, --latency-us >= 0")

    c, measured = measure_inversion_constant()
    c /= args.inversion_speedup
    model = _model(args.model)
    parameters, statistic_bytes, costs = model_figures(model)
    rows = scaling_table(parameters, statistic_bytes, costs, c, args.workers,
                         args.bandwidth_gbps * 1e9 / 8, args.latency_us * 1e-6)
    print(f"model {args.model}: {parameters / 1e6:.1f} M parameters ({4 * parameters / 1e6:.0f} MB of gradients), "
          f"{len(costs)} curvature blocks, {statistic_bytes / 1e6:.0f} MB of statistics; largest block "
          f"{100 * max(costs) / sum(costs):.1f}% of the inversion cost")
    print("damped inverse measured here: " + ", ".join(f"n={n}: {s * 1e3:.1f} ms" for n, s in measured.items())
          + f"; c = {c * args.inversion_speedup:.3g} s/n^3" + (f", divided by {args.inversion_speedup:g}"
                                                                  if args.inversion_speedup != 1 else ""))
    print(f"network (assumed): {args.bandwidth_gbps:g} Gbit/s per worker, {args.latency_us:g} us latency\n")
    print("| workers | invert all (off) s | invert own share s | workers with a share | fused all-reduce MB "
          "| all-reduce s | all-gather inverses s | all-gather preconditioned grads s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['inversion_off_s']:.3f} | {r['inversion_share_s']:.3f} | {r['busy_workers']} "
              f"| {r['all_reduce_MB']:.0f} | {r['all_reduce_s']:.3f} | {r['gather_inverses_s']:.3f} "
              f"| {r['gather_gradients_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What one damped factor inverse costs, by size, three ways, and how accurate each is.

    python -m keras_hoopt.benchmarks.inverse_time --sizes 1569 1001 785 512 257 --repeats 10

For each size a factor with a decaying spectrum (eigenvalues from 1 to 1e-7,
damped by 1e-4: condition about 1e4, as K-FAC's factors late in training)
is inverted in float32 by

* ``cholesky_solve``: ``cholesky_solve(L, I)``, the refresh before d12804c;
* ``whole``: ``L^-T L^-1`` with ``L^-1`` from one triangular solve against
  the identity (d12804c);
* ``by_halves``: the library's inverse now (``keras_hoopt.linalg._cholesky_inverse``:
  by halves from ``BLOCKED_INVERSE_MIN_SIZE`` rows on, else ``whole``
  behind one condition);
* ``damped_inverse``: :func:`keras_hoopt.linalg.damped_inverse`, what a
  refresh runs: ``by_halves`` inside the shared function with its retry
  loop and finiteness check.

Each is a ``tf.function`` of its own, timed after two warm-up calls; the
table gives milliseconds per inverse (median of ``--repeats``) and the
largest error against numpy's float64 inverse relative to its largest entry.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _methods():
    import tensorflow as tf

    from keras_hoopt import linalg

    spec = [tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.float32)]

    def damped(matrix, damping):
        return matrix + damping * tf.eye(tf.shape(matrix)[0])

    def cholesky_solve(matrix, damping):
        damped_matrix = damped(matrix, damping)
        identity = tf.eye(tf.shape(matrix)[0])
        return linalg.symmetrize(tf.linalg.cholesky_solve(tf.linalg.cholesky(damped_matrix), identity))

    def whole(matrix, damping):
        chol = tf.linalg.cholesky(damped(matrix, damping))
        inverse = tf.linalg.triangular_solve(chol, tf.eye(tf.shape(matrix)[0]), lower=True)
        return linalg.symmetrize(tf.matmul(inverse, inverse, transpose_a=True))

    def by_halves(matrix, damping):
        return linalg._cholesky_inverse(damped(matrix, damping))

    def damped_inverse(matrix, damping):
        return linalg.damped_inverse(matrix, damping)[0]

    return {name: tf.function(f, input_signature=spec) for name, f in (
        ("cholesky_solve", cholesky_solve), ("whole", whole), ("by_halves", by_halves), ("damped_inverse", damped_inverse))}


def measure(sizes, repeats, damping=1e-4, seed=0):
    """``{size: {method: (ms per inverse, relative max error)}}``."""
    import numpy as np
    import tensorflow as tf

    methods = _methods()
    rng = np.random.default_rng(seed)
    results = {}
    for size in sizes:
        q, _ = np.linalg.qr(rng.normal(size=(size, size)))
        factor = (q * np.geomspace(1.0, 1e-7, size)) @ q.T
        expected = np.linalg.inv(factor + damping * np.eye(size))
        matrix, damping_t = tf.constant(factor, tf.float32), tf.constant(damping, tf.float32)
        results[size] = {}
        for name, method in methods.items():
            got = method(matrix, damping_t).numpy()
            method(matrix, damping_t).numpy()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                method(matrix, damping_t).numpy()
                times.append((time.perf_counter() - start) * 1e3)
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            results[size][name] = (statistics.median(times), error)
    return results


def table(results):
    names = list(next(iter(results.values())))
    lines = ["| size | " + " | ".join(f"{n} ms (error)" for n in names) + " | by_halves vs whole |",
             "|---|" + "---|" * (len(names) + 1)]
    for size, row in results.items():
        cells = " | ".join(f"{row[n][0]:.1f} ({row[n][1]:.0e})" for n in names)
        lines.append(f"| {size} | {cells} | {row['by_halves'][0] / row['whole'][0]:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1569, 1001, 785, 512, 257, 65])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size < 3:
            parser.error(f"--sizes: every size must be >= 3 (got {size}); 1 x 1 and 2 x 2 have closed forms")
    results = measure(args.sizes, args.repeats)
    print(table(results))
    return results


if __name__ == "__main__":
    main()

"""How accurate the quadratic model's finite differences are, against forward mode, along training.

    python -m keras_hoopt.benchmarks.difference_accuracy --workloads mnist_mlp mnist_cnn mnist_autoencoder \
        --epochs 3 --every 4

SPNGD with its defaults trains each workload (shuffled, seed 0). At every
``--every``-th step the step's curvature matrix ``M_ij = u_i^T C u_j`` (the
quadratic model's two directions, ``C`` the GGN of the step's batch) is also
formed exactly, by forward mode, and by one-sided and central differences at
each relative step of ``--one-sided-steps`` and ``--central-steps``, all on
the same batch and weights. The table gives, per workload and scheme, the
median and the largest relative error ``||M - M_exact||_F / ||M_exact||_F``
over those steps. Training itself follows the defaults; the extra products
only observe it. About 3 minutes on 2 CPU cores for the three MNIST
workloads and 3 epochs.
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _schemes(one_sided_steps, central_steps):
    """``[(label, products, module constant, step)]``."""
    return [(f"one-sided {s:g}", "one_sided_differences", "ONE_SIDED_STEP", s) for s in one_sided_steps] + [
        (f"central {s:g}", "finite_differences", "FD_STEP", s) for s in central_steps
    ]


def measure(workload_name, epochs, every, schemes):
    """``{label: [relative error per observed step]}`` along SPNGD's default training of the workload."""
    import keras
    import tensorflow as tf

    import keras_hoopt
    from keras_hoopt.benchmarks.workloads import WORKLOADS
    from keras_hoopt.optimizers import quadratic_model

    workload = WORKLOADS[workload_name]
    errors = {label: [] for label, *_ in schemes}
    original = quadratic_model.QuadraticModel.curvature_matrix

    def record(*values):
        for (label, *_), value in zip(schemes, values):
            errors[label].append(float(value))
        return 0

    def observed(self, directions):
        used = original(self, directions)

        def compare():
            chosen, saved = self.products, {name: getattr(quadratic_model, name) for _, _, name, _ in schemes}
            try:
                self.products = "forward_mode"
                exact = original(self, directions)
                values = []
                for _, products, name, step in schemes:
                    self.products = products
                    setattr(quadratic_model, name, step)
                    values.append(tf.norm(original(self, directions) - exact) / tf.maximum(tf.norm(exact), 1e-30))
            finally:
                self.products = chosen
                for name, value in saved.items():
                    setattr(quadratic_model, name, value)
            with tf.control_dependencies([tf.py_function(record, values, tf.int32)]):
                return tf.identity(used)

        due = tf.equal(optimizer.iterations % every, 0)
        return tf.cond(due, compare, lambda: tf.identity(used))

    (x, y), _ = workload.load_xy()
    keras.utils.set_random_seed(0)
    model = workload.build()
    optimizer = keras_hoopt.SPNGD(**workload.curvature_options)
    model.compile(optimizer=optimizer, loss=workload.loss, jit_compile=False)
    quadratic_model.QuadraticModel.curvature_matrix = observed
    try:
        model.fit(x, y, batch_size=workload.batch_size, epochs=epochs, shuffle=True, verbose=0)
    finally:
        quadratic_model.QuadraticModel.curvature_matrix = original
    return errors


def table(results):
    """Markdown: per workload and scheme, the median and the largest relative error."""
    lines = ["| workload | scheme (relative step) | median error | largest error | steps |", "|---|---|---|---|---|"]
    for workload, errors in results.items():
        for label, values in errors.items():
            lines.append(
                f"| {workload} | {label} | {statistics.median(values):.2e} | {max(values):.2e} | {len(values)} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["mnist_mlp", "mnist_cnn", "mnist_autoencoder"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="observe every N-th step")
    parser.add_argument("--one-sided-steps", nargs="+", type=float, default=[3.45e-4, 3e-5, 1e-5])
    parser.add_argument("--central-steps", nargs="+", type=float, default=[4.9e-3, 3e-4])
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.every < 1:
        parser.error("--epochs and --every must be >= 1")
    schemes = _schemes(args.one_sided_steps, args.central_steps)
    results = {}
    for workload in args.workloads:
        results[workload] = measure(workload, args.epochs, args.every, schemes)
        print(f"  {workload}: {len(next(iter(results[workload].values())))} steps observed", flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()

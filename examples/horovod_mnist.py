"""Data-parallel SP-NGD on MNIST-5k with Horovod (Keras 3: no horovod.tensorflow.keras needed).

    horovodrun -np 2 --gloo -H localhost:2 python examples/horovod_mnist.py
    horovodrun -np 2 --gloo -H localhost:2 python examples/horovod_mnist.py --epochs 1 --steps 3   # smoke run

Each process trains on its contiguous share of every global batch; the optimizer
averages gradients and curvature statistics over processes and each process inverts
only the layers it owns (docs/distributed.md). Rank 0 logs and writes the checkpoint.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_hoopt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole set)")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--model-parallel", default="auto", choices=["auto", "off", "inverses", "gradients"])
    parser.add_argument("--checkpoint", default="horovod_mnist.keras")
    args = parser.parse_args(argv)

    hvd.init()  # before compile: the optimizer picks Horovod up
    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_mnist_5k()
    share = args.global_batch // hvd.size()
    steps = args.steps or len(x) // args.global_batch
    index = np.concatenate([
        np.arange(s * args.global_batch + hvd.rank() * share, s * args.global_batch + (hvd.rank() + 1) * share)
        for s in range(steps)
    ])

    keras.utils.set_random_seed(hvd.rank())  # different on purpose: the broadcast makes them equal
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    optimizer = keras_hoopt.SPNGD(learning_rate=0.3, damping=1e-2, communication="horovod",
                                  model_parallel=args.model_parallel)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x[index], y[index], batch_size=share, epochs=args.epochs, shuffle=False,
              callbacks=[keras_hoopt.callbacks.BroadcastGlobalVariables(0),
                         keras_hoopt.callbacks.AverageMetrics()],  # logs: mean over processes
              verbose=2 if hvd.rank() == 0 else 0)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    communication = optimizer.communication_summary()
    owned = [layer for layer, owner in communication["owners"].items() if owner == hvd.rank()]
    print(f"rank {hvd.rank()}: train loss {history.history['loss'][-1]:.6f} (mean over processes), "
          f"test accuracy {accuracy:.3f}, inverted layers {owned}, "
          f"sent {communication['bytes_per_step'] / 1e3:.0f} kB per step", flush=True)
    if hvd.rank() == 0:
        model.save(args.checkpoint)


if __name__ == "__main__":
    main()

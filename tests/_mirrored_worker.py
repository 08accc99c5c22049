"""Subprocess of tests/test_training.py: KFAC under MirroredStrategy on 2 logical CPU devices.

The logical devices must be configured before TensorFlow initialises its devices, hence a fresh
process. Trains each model variant for 3 steps of a global batch of 64, once under the strategy
and once on a single device, writes the weights and statistics to the .npz given as argv[1] and
prints a JSON summary as its last stdout line.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_hoopt  # noqa: E402


# "sync_bn": Conv2D + BatchNormalization(synchronized=True) + Dense with KFAC (statistics every
# step); "sync_bn_spngd": the same with SPNGD, whose statistics are computed inside a tf.cond (only
# when due), where synchronized BatchNorm's cross-replica moments once failed to trace. "no_bn"
# exists for debugging (python tests/_mirrored_worker.py out.npz no_bn). "no_bn_adaptive": SPNGD
# with step_size="quadratic_model" and damping_control="lm" every step: the curvature products and
# the losses of rho are per-replica means, averaged over the replicas. (With synchronized
# BatchNorm the forward-mode pass does not see the cross-replica moments move: the choices then
# differ by up to ~30% from the single-device run's, see docs/choosing.md.)
VARIANTS = tuple(sys.argv[2:]) or ("sync_bn", "sync_bn_spngd", "no_bn_adaptive")


def build(variant):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="c")]
    if variant.startswith("sync_bn"):
        layers.append(keras.layers.BatchNormalization(synchronized=True, momentum=0.5, name="bn"))
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(8, activation="relu", name="d1"),
        keras.layers.Dense(3, name="d2"),
    ]
    return keras.Sequential(layers)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(192, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 4:].mean(axis=(1, 2, 3)) > 0)
    return x, y.astype("int32")


def train(variant, strategy):
    x, y = data()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build(variant)
        # The fixed step: with synchronized BatchNorm the quadratic model differs across replicas (the
        # forward-mode pass does not see the all-reduced moments move; docs/choosing.md).
        common = dict(learning_rate=0.05, damping=1e-2, kl_clip=1e-2, step_size="fixed", fisher="empirical")
        if variant.endswith("spngd"):
            optimizer = keras_hoopt.SPNGD(similarity_threshold=0.5, **common)
        elif variant.endswith("adaptive"):
            optimizer = keras_hoopt.SPNGD(
                learning_rate=1.0, damping=1e-2, similarity_threshold=0.0, step_size="quadratic_model",
                damping_control="lm", damping_control_interval=1, kl_clip=None, fisher="empirical",
                # Central differences: the default one-sided ones take a 14x smaller step, so they carry
                # 14x more of the rounding that differs between one device's batch of 64 and two
                # replicas' 32 (weights then agree to ~1e-3, not the 1e-4 held here). The default's
                # replica bookkeeping is checked by tests/test_distributed.py (spngd_gradients,
                # lowrank_gradients under MirroredStrategy).
                quadratic_model_products="finite_differences",
            )
        else:
            optimizer = keras_hoopt.KFAC(inverse_update_interval=2, **common)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    initial = [w.numpy() for w in model.weights]
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)  # 3 steps
    stats = {}
    for row in optimizer.curvature_summary():
        for name in row["statistics"]:
            stats[f"{row['layer']}_{name}"] = optimizer.statistic(row["layer"], name)
    summary = optimizer.curvature_summary()
    if optimizer.step_size == "quadratic_model":
        summary.append({"step": optimizer.step_summary()})
    return initial, [w.numpy() for w in model.weights], stats, summary


def main(out):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    arrays, info = {}, {"replicas": strategy.num_replicas_in_sync}
    for variant in VARIANTS:
        info[variant] = {}
        for mode, s in (("mirrored", strategy), ("single", None)):
            initial, weights, stats, summary = train(variant, s)
            for i, w in enumerate(weights):
                arrays[f"{variant}/{mode}/{i}"] = w
            for i, w in enumerate(initial):
                arrays[f"{variant}/initial/{i}"] = w
            for key, value in stats.items():
                arrays[f"{variant}/{mode}/stat/{key}"] = value
            info[variant][mode] = {"summary": summary}
            info[variant]["count"] = len(weights)
            info[variant]["statistics"] = sorted(stats)
            keras.backend.clear_session()
    np.savez(out, **arrays)
    print(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1])

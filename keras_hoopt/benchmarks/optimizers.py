"""Optimizers compared by the benchmarks, each with a small learning-rate grid."""

import keras

import keras_hoopt

# name -> (factory(lr, **workload.curvature_options), full grid, quick grid)
CURVATURE_OPTIMIZERS = ("kfac", "spngd", "thor")
OPTIMIZERS = {
    "kfac": (
        lambda lr, **options: keras_hoopt.KFAC(learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-3, **options),
        [0.1, 0.3, 1.0],
        [0.3, 1.0],
    ),
    "spngd": (
        lambda lr, **options: keras_hoopt.SPNGD(learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-3, **options),
        [0.1, 0.3, 1.0],
        [0.3, 1.0],
    ),
    # THOR's default frequency (100) suits ImageNet's 5,000 steps per epoch; these
    # workloads have 32, so statistics are refreshed every 20 steps.
    "thor": (
        lambda lr, **options: keras_hoopt.THOR(
            learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-3, frequency=20, **options
        ),
        [0.1, 0.3, 1.0],
        [0.3, 1.0],
    ),
    "sgd": (
        lambda lr: keras.optimizers.SGD(learning_rate=lr, momentum=0.9),
        [0.03, 0.1, 0.3],
        [0.1, 0.3],
    ),
    "adam": (
        lambda lr: keras.optimizers.Adam(learning_rate=lr),
        [1e-3, 3e-3, 1e-2],
        [3e-3, 1e-2],
    ),
}

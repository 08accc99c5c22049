"""keras_hoopt: higher-order (natural-gradient) optimizers for Keras 3 on TensorFlow.

Use them like any Keras optimizer::

    model.compile(optimizer=keras_hoopt.KFAC(learning_rate=0.01, damping=1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5)
"""

__version__ = "0.1.0"

from keras_hoopt import blocks, callbacks, communication, datasets, refresh, schedules
from keras_hoopt.optimizers import KFAC, SPNGD, THOR, CurvatureOptimizer, NaturalGradient, Newton
from keras_hoopt.saving import load_model, save_model

__all__ = [
    "KFAC",
    "SPNGD",
    "THOR",
    "NaturalGradient",
    "Newton",
    "CurvatureOptimizer",
    "blocks",
    "callbacks",
    "communication",
    "datasets",
    "refresh",
    "schedules",
    "load_model",
    "save_model",
    "__version__",
]

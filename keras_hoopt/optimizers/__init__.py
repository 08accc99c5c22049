"""Curvature optimizers."""

from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.optimizers.kfac import KFAC
from keras_hoopt.optimizers.natural_gradient import NaturalGradient
from keras_hoopt.optimizers.newton import Newton
from keras_hoopt.optimizers.spngd import SPNGD
from keras_hoopt.optimizers.thor import THOR

__all__ = ["CurvatureOptimizer", "KFAC", "SPNGD", "THOR", "NaturalGradient", "Newton"]

#: The names ``model.compile(optimizer=...)`` and ``keras.optimizers.get`` accept after ``import keras_hoopt``.
OPTIMIZER_NAMES = {
    "kfac": KFAC,
    "spngd": SPNGD,
    "thor": THOR,
    "natural_gradient": NaturalGradient,
    "newton": Newton,
}


def _register_names():
    """Make the names resolve like Keras's own ``"adam"``: Keras looks a string up,
    lower-cased, in ``keras.src.optimizers.ALL_OBJECTS_DICT`` and calls ``from_config({})``."""
    from keras.src import optimizers as keras_optimizers

    keras_optimizers.ALL_OBJECTS_DICT.update(OPTIMIZER_NAMES)


_register_names()

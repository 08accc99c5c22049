"""Curvature optimizers."""

from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.optimizers.kfac import KFAC
from keras_hoopt.optimizers.natural_gradient import NaturalGradient
from keras_hoopt.optimizers.newton import Newton
from keras_hoopt.optimizers.spngd import SPNGD
from keras_hoopt.optimizers.thor import THOR

__all__ = ["CurvatureOptimizer", "KFAC", "SPNGD", "THOR", "NaturalGradient", "Newton"]

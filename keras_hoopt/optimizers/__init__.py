"""Curvature optimizers."""

from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.optimizers.kfac import KFAC

__all__ = ["CurvatureOptimizer", "KFAC"]

"""Refresh policies: when each curvature statistic and inverse is recomputed."""

from keras_hoopt.refresh.base import RefreshPolicy
from keras_hoopt.refresh.fixed import FixedInterval

__all__ = ["RefreshPolicy", "FixedInterval"]

"""Refresh policies: when each curvature statistic and inverse is recomputed.

* :class:`FixedInterval` (K-FAC): every N steps.
* :class:`AdaptiveInterval` (SP-NGD): per-statistic intervals adapted by how
  much each statistic changes.
* :class:`TraceRule` (THOR): a global frequency, and inverses recomputed only
  when the layer's Fisher trace moved.
"""

from keras_hoopt.refresh.adaptive import AdaptiveInterval
from keras_hoopt.refresh.base import BlockView, RefreshPolicy
from keras_hoopt.refresh.fixed import FixedInterval
from keras_hoopt.refresh.trace import TraceRule

__all__ = ["RefreshPolicy", "BlockView", "FixedInterval", "AdaptiveInterval", "TraceRule"]

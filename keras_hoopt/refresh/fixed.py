"""Fixed refresh intervals (K-FAC's classic schedule)."""

import tensorflow as tf

from keras_hoopt.refresh.base import RefreshPolicy


def every(interval, step):
    """``step % interval == 0`` (Python ``True`` when ``interval == 1``)."""
    if interval == 1:
        return True
    return tf.equal(tf.math.floormod(step, tf.cast(interval, step.dtype)), 0)


class FixedInterval(RefreshPolicy):
    """Statistics every ``statistics_interval`` steps, inverses every ``inverse_interval``.

    Both are due at step 0, so the first step is always fully preconditioned.
    """

    def __init__(self, statistics_interval=1, inverse_interval=10):
        self.statistics_interval = int(statistics_interval)
        self.inverse_interval = int(inverse_interval)

    def statistics_due(self, view, step):
        due = every(self.statistics_interval, step)
        return {name: due for name in view.names}

    def after_refresh(self, view, old, new, refreshed, step, damping, measured=None):
        return every(self.inverse_interval, step), []

    def get_config(self):
        return {"statistics_interval": self.statistics_interval, "inverse_interval": self.inverse_interval}

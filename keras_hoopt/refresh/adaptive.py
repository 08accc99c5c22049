"""SP-NGD's adaptive per-statistic refresh intervals (Osawa et al. 2020)."""

import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.refresh.base import LAST_REFRESH, REFRESHES, RefreshPolicy, counter_fields

_INTERVAL = 0  # a schedule variable holds [interval, previous interval]


def relative_change(x, y):
    """``sim(X, Y) = ||X - Y||_F / ||Y||_F`` (``inf`` when ``Y`` is zero)."""
    denominator = linalg.frobenius_norm(y)
    return tf.where(denominator > 0, linalg.frobenius_norm(x - y) / tf.maximum(denominator, 1e-30), float("inf"))


def _similarities(new, old, second_last):
    """``[sim(new, old), sim(new, second_last)]``: one graph function per rank, shared by every statistic."""
    return tf.stack([relative_change(new, old), relative_change(new, second_last)])


def next_interval(interval, previous, similar_to_last, similar_to_second_last, max_interval):
    """The interval law (int64 tensors in, ``(interval, previous)`` out).

    * not similar to the last refreshed value -> the statistic is changing:
      halve the interval (at least 1);
    * similar to the last but not to the second-last -> keep it;
    * similar to both -> lengthen it to the sum of the last two intervals
      (Fibonacci-like: 1, 2, 3, 5, 8, ...), capped at ``max_interval``.
    """
    one = tf.ones_like(interval)
    grow = tf.logical_and(similar_to_last, similar_to_second_last)
    keep = tf.logical_and(similar_to_last, tf.logical_not(similar_to_second_last))
    grown = tf.minimum(interval + previous, tf.cast(max_interval, interval.dtype))
    halved = tf.maximum(interval // 2, one)
    new_interval = tf.where(grow, grown, tf.where(keep, interval, halved))
    new_previous = tf.where(grow, interval, tf.where(keep, previous, tf.maximum(halved // 2, one)))
    return new_interval, new_previous


class AdaptiveInterval(RefreshPolicy):
    """Each statistic (each ``A``, each ``G``, each BatchNorm ``F``) has its own interval.

    A statistic is recomputed when ``interval`` steps have passed since its
    last refresh. After a refresh its new value ``X`` is compared with its
    values after the last two refreshes, ``X_-1`` and ``X_-2``, by
    ``sim(X, Y) = ||X - Y||_F / ||Y||_F < similarity_threshold`` and the
    interval follows :func:`next_interval`. The values compared are the
    statistics as used for preconditioning (after the moving average; with
    ``factor_decay=0`` these are the batch statistics of the SP-NGD paper).
    A statistic's inverse is recomputed only when that statistic was.

    With ``similarity_threshold=0`` nothing is ever similar, every interval
    stays 1 and every statistic and inverse is refreshed every step.
    """

    def __init__(self, similarity_threshold=0.1, max_interval=100):
        self.similarity_threshold = float(similarity_threshold)
        self.max_interval = int(max_interval)
        self._schedules, self._history = {}, {}

    def build(self, optimizer, views):
        for view in views:
            for name in view.names:
                shape = view.block.statistic_shapes()[name]
                label = f"{view.block.label}_{name}"
                self._schedules[(view.index, name)] = optimizer.add_variable(
                    (2,), "ones", "int64", name=f"{label}_interval"
                )
                self._history[(view.index, name)] = optimizer.add_variable(
                    shape, "zeros", "float32", name=f"{label}_second_last"
                )

    def statistics_due(self, view, step):
        return self.statistics_due_together([view], step)[0]

    def statistics_due_together(self, views, step):
        """Every statistic's ``refreshes == 0 or step - last_refresh >= interval``, as one vector."""
        entries = _entries(views)
        if not entries:
            return [{} for _ in views]
        fields = [counter_fields(view.counters[name]) for view, name in entries]
        interval = self._stacked_schedules(entries)[:, _INTERVAL]
        refreshes = tf.stack([f[REFRESHES] for f in fields])
        last = tf.stack([f[LAST_REFRESH] for f in fields])
        due = tf.logical_or(tf.equal(refreshes, 0), step - last >= interval)
        return _per_view(views, tf.unstack(due, num=len(entries)))

    measurement_size = 2

    def measure_refresh(self, view, name, old, new):
        """``[sim(X, X_-1), sim(X, X_-2)]`` of the refreshed value ``X = new``."""
        second_last = tf.convert_to_tensor(self._history[(view.index, name)])
        spec = tf.TensorSpec([None] * new.shape.rank, new.dtype)
        measured = linalg.shared_function(_similarities, [spec] * 3)(new, old, second_last)
        measured.set_shape([2])
        return measured

    def after_refresh(self, view, old, new, refreshed, step, damping, measured=None):
        b = view.index
        dues, assignments = self.after_refresh_together(
            [view], {b: old}, {b: new}, {b: refreshed}, step, damping, None if measured is None else {b: measured}
        )
        return dues[0], assignments

    def after_refresh_together(self, views, old, new, refreshed, step, damping, measured=None):
        """The interval law of every refreshed statistic at once (one vector of each quantity)."""
        entries = _entries(views)
        if not entries:
            return [{} for _ in views], []
        schedules = self._stacked_schedules(entries)
        interval, previous = tf.unstack(schedules, num=2, axis=1)
        earlier = tf.stack([counter_fields(view.counters[name])[REFRESHES] for view, name in entries])
        was_refreshed = tf.stack([refreshed[view.index][name] for view, name in entries])
        changes = tf.stack([
            measured[view.index][name] if measured is not None
            else self.measure_refresh(view, name, old[view.index][name], new[view.index][name])
            for view, name in entries
        ])
        alpha = self.similarity_threshold
        adapt = tf.logical_and(was_refreshed, earlier >= 1)  # earlier: refreshes before this one
        similar_last = changes[:, 0] < alpha
        similar_second = tf.logical_and(earlier >= 2, changes[:, 1] < alpha)
        adapted = tf.stack(next_interval(interval, previous, similar_last, similar_second, self.max_interval), axis=1)
        rows = tf.unstack(tf.where(adapt[:, None], adapted, schedules), num=len(entries))
        assignments = []
        for (view, name), row in zip(entries, rows):
            # The norms ran in the fold's branch (refresh steps only); the (2,) schedule is written always.
            assignments.append((self._schedules[(view.index, name)], row, None))
            assignments.append((self._history[(view.index, name)], old[view.index][name], refreshed[view.index][name]))
        # Only the refreshed factors are re-inverted.
        return [dict(refreshed[view.index]) for view in views], assignments

    def _stacked_schedules(self, entries):
        """``[N, 2]`` int64: each entry's ``[interval, previous interval]``."""
        return tf.stack([tf.convert_to_tensor(self._schedules[(view.index, name)]) for view, name in entries])

    def describe(self, view):
        return {
            "intervals": {
                name: int(self._schedules[(view.index, name)].numpy()[_INTERVAL]) for name in view.names
            }
        }

    def get_config(self):
        return {"similarity_threshold": self.similarity_threshold, "max_interval": self.max_interval}


def _entries(views):
    """``(view, name)`` of every statistic of ``views``, in order."""
    return [(view, name) for view in views for name in view.names]


def _per_view(views, values):
    """The flat per-statistic ``values`` (in :func:`_entries` order) as one ``{name: value}`` per view."""
    out, k = [], 0
    for view in views:
        out.append(dict(zip(view.names, values[k: k + len(view.names)])))
        k += len(view.names)
    return out

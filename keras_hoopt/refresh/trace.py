"""THOR's trace-based refresh rule (Chen et al., AAAI 2021)."""

import tensorflow as tf

from keras_hoopt.refresh.base import RefreshPolicy
from keras_hoopt.refresh.fixed import every

_TRACE, _STOPPED = 0, 1

UPDATE, REUSE, STOP = 0, 1, 2


def trace_decision(trace, previous_trace, omega1, omega2):
    """THOR's rule on ``delta = |tr_k - tr_{k-1}| / |tr_{k-1}|``.

    Returns ``UPDATE`` (delta > omega1: recompute the inverse), ``REUSE``
    (omega2 <= delta <= omega1: keep the old inverse) or ``STOP``
    (delta < omega2: keep it and stop refreshing this layer for good). The
    first refresh (no previous trace) is always ``UPDATE``.
    """
    previous = tf.abs(previous_trace)
    delta = tf.abs(tf.abs(trace) - previous) / tf.maximum(previous, 1e-30)
    first = tf.equal(previous_trace, 0.0)
    decision = tf.where(delta > omega1, UPDATE, tf.where(delta >= omega2, REUSE, STOP))
    return tf.where(first, UPDATE, decision)


class TraceRule(RefreshPolicy):
    """Statistics every ``frequency`` steps; inverses only when the trace moved.

    At every ``frequency``-th step the statistics of every layer that has not
    stopped are recomputed, and :func:`trace_decision` on the damped Fisher
    trace ``tr(F + lambda I)`` decides whether its inverses are recomputed,
    reused, or whether the layer stops refreshing for good. ``(omega1, omega2)
    = (0.01, 0)`` is THOR, ``(0.01, 0.001)`` THOR_stop, ``(0, 0)`` THOR_NT.
    """

    def __init__(self, frequency=100, omega1=0.01, omega2=0.0):
        self.frequency = int(frequency)
        self.omega1, self.omega2 = float(omega1), float(omega2)
        self._state = {}

    def build(self, optimizer, views):
        for view in views:
            self._state[view.index] = optimizer.add_variable(
                (2,), "zeros", "float32", name=f"{view.block.label}_trace_state"
            )

    def statistics_due(self, view, step):
        stopped = tf.convert_to_tensor(self._state[view.index])[_STOPPED] > 0
        on_schedule = every(self.frequency, step)
        due = tf.logical_not(stopped) if on_schedule is True else tf.logical_and(on_schedule, tf.logical_not(stopped))
        return {name: due for name in view.names}

    def after_refresh(self, view, old, new, refreshed, step, damping, measured=None):
        state_var = self._state[view.index]
        state = tf.convert_to_tensor(state_var)
        any_refreshed = tf.reduce_any(tf.stack([refreshed[n] for n in view.names]))
        trace = view.block.damped_fisher_trace(new, damping)
        decision = trace_decision(trace, state[_TRACE], self.omega1, self.omega2)
        stopped = tf.logical_or(state[_STOPPED] > 0, tf.equal(decision, STOP))
        new_state = tf.stack([trace, tf.cast(stopped, tf.float32)])
        inverses_due = tf.logical_and(any_refreshed, tf.equal(decision, UPDATE))
        return inverses_due, [(state_var, tf.where(any_refreshed, new_state, state), None)]

    def describe(self, view):
        state = self._state[view.index].numpy()
        return {"stopped": bool(state[_STOPPED] > 0), "trace": float(state[_TRACE])}

    def get_config(self):
        return {"frequency": self.frequency, "omega1": self.omega1, "omega2": self.omega2}

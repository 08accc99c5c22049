"""Argument checks shared by the optimizers: a bad value is a ValueError that
names the parameter and what it accepts."""

import keras
import numpy as np


def check(name, value, ok, accepted):
    if not ok:
        raise ValueError(f"Invalid value for `{name}`: {value!r}. Accepted: {accepted}.")


def is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value, minimum):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def check_learning_rate(learning_rate):
    check(
        "learning_rate",
        learning_rate,
        isinstance(learning_rate, dict)  # a serialized schedule (from_config)
        or callable(learning_rate)
        or hasattr(learning_rate, "dtype")  # a tensor or variable
        or (is_number(learning_rate) and learning_rate >= 0),
        "a float >= 0 or a keras.optimizers.schedules.LearningRateSchedule",
    )


def damping_value(damping):
    """Checked damping: a float > 0 or a schedule (deserialized from a config dict)."""
    if isinstance(damping, dict):
        damping = keras.optimizers.schedules.deserialize(damping)
    check(
        "damping",
        damping,
        callable(damping) or (is_number(damping) and damping > 0),
        "a float > 0 or a schedule (callable of the step)",
    )
    return damping if callable(damping) else float(damping)


def damping_config(damping):
    """The config entry of a damping accepted by :func:`damping_value`."""
    return keras.optimizers.schedules.serialize(damping) if callable(damping) else damping


def check_momentum(momentum, nesterov):
    check("momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "a float in [0, 1)")
    check("nesterov", nesterov, isinstance(nesterov, bool), "True or False")

"""Argument checks shared by the optimizers: a bad value is a ValueError that
names the parameter and what it accepts. Every float must be finite: ``inf``
is rejected like NaN."""

import math

import keras
import numpy as np

#: Accepted values of ``on_nonfinite``.
ON_NONFINITE_CHOICES = ("skip", "raise")

#: Accepted values of ``fallback``: the update of variables no curvature block preconditions.
FALLBACKS = ("adam", "momentum")

# keras.optimizers.Optimizer's float arguments: (name, accepted, test).
_KERAS_FLOAT_ARGUMENTS = (
    ("weight_decay", "None or a finite float >= 0", lambda v: v >= 0),
    ("clipnorm", "None or a finite float > 0", lambda v: v > 0),
    ("clipvalue", "None or a finite float > 0", lambda v: v > 0),
    ("global_clipnorm", "None or a finite float > 0", lambda v: v > 0),
    ("ema_momentum", "a finite float in [0, 1]", lambda v: 0 <= v <= 1),
    ("loss_scale_factor", "None or a finite float > 0", lambda v: v > 0),
)


def check(name, value, ok, accepted):
    if not ok:
        raise ValueError(f"Invalid value for `{name}`: {value!r}. Accepted: {accepted}.")


def is_number(value):
    """A finite real number (not a bool): NaN and +-inf are rejected."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


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
        "a finite float >= 0 or a keras.optimizers.schedules.LearningRateSchedule",
    )


def damping_value(damping):
    """Checked damping: a float > 0 or a schedule (deserialized from a config dict)."""
    if isinstance(damping, dict):
        damping = keras.optimizers.schedules.deserialize(damping)
    check(
        "damping",
        damping,
        callable(damping) or (is_number(damping) and damping > 0),
        "a finite float > 0 or a schedule (callable of the step)",
    )
    return damping if callable(damping) else float(damping)


def damping_config(damping):
    """The config entry of a damping accepted by :func:`damping_value`."""
    return keras.optimizers.schedules.serialize(damping) if callable(damping) else damping


def check_momentum(momentum, nesterov):
    check("momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "a float in [0, 1)")
    check("nesterov", nesterov, isinstance(nesterov, bool), "True or False")


def check_on_nonfinite(on_nonfinite):
    check("on_nonfinite", on_nonfinite, on_nonfinite in ON_NONFINITE_CHOICES,
          " or ".join(repr(c) for c in ON_NONFINITE_CHOICES))


def check_keras_arguments(kwargs):
    """The float arguments an optimizer passes on to ``keras.optimizers.Optimizer``."""
    for name, accepted, test in _KERAS_FLOAT_ARGUMENTS:
        if name in kwargs and kwargs[name] is not None:
            value = kwargs[name]
            check(name, value, is_number(value) and test(value), accepted)


def check_one_model(optimizer, attached, model):
    """One optimizer preconditions one model: a second model is a ValueError (built or not)."""
    if attached is not None and attached is not model:
        raise ValueError(
            f"This {type(optimizer).__name__} optimizer is already attached to the model "
            f"{attached.name!r}; it cannot also train {model.name!r}: its curvature state "
            "(statistics, inverses, momenta) belongs to one model. Create a new optimizer for "
            "each model, e.g. `model.compile(optimizer=keras_hoopt.SPNGD(...))` for each."
        )

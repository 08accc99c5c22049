"""Schedules of the SP-NGD and THOR recipes, as Keras schedule objects.

Both work for ``learning_rate`` and for ``damping`` (every curvature
optimizer accepts a schedule for its damping).
"""

import keras
from keras import ops

from keras_hoopt.optimizers._validation import check, is_int, is_number


def _epoch(step, steps_per_epoch):
    return ops.cast(step, "float32") / float(steps_per_epoch)


def _check_positive(name, value):
    """A finite number > 0 (numpy scalars too); NaN and inf are rejected."""
    check(name, value, is_number(value) and value > 0, "a finite number > 0")


def _check_steps_per_epoch(value):
    check("steps_per_epoch", value, is_int(value, 1), "an int >= 1")


@keras.saving.register_keras_serializable(package="keras_hoopt")
class PolynomialEpochDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``v(e) = v0 * (1 - (e - start) / (end - start))^power`` for ``start <= e <= end``.

    ``e`` is the (fractional) epoch ``step / steps_per_epoch``; the value is
    ``v0`` before ``start_epoch`` and ``end_value`` after ``end_epoch`` (also
    a floor in between). SP-NGD at batch 4k: ``v0=8.18e-3, start_epoch=1,
    end_epoch=53, power=11``; THOR: ``start_epoch=0``.
    """

    def __init__(self, initial_value, steps_per_epoch, end_epoch, start_epoch=0.0, power=2.0, end_value=0.0):
        _check_positive("initial_value", initial_value)
        _check_steps_per_epoch(steps_per_epoch)
        _check_positive("power", power)
        check("end_value", end_value, is_number(end_value) and end_value >= 0, "a finite number >= 0")
        if not (is_number(end_epoch) and is_number(start_epoch) and end_epoch > start_epoch >= 0):
            raise ValueError(
                f"Invalid value for `end_epoch`/`start_epoch`: {end_epoch!r}/{start_epoch!r}. "
                "Accepted: end_epoch > start_epoch >= 0."
            )
        self.initial_value = float(initial_value)
        self.steps_per_epoch = int(steps_per_epoch)
        self.start_epoch, self.end_epoch = float(start_epoch), float(end_epoch)
        self.power, self.end_value = float(power), float(end_value)

    def __call__(self, step):
        epoch = _epoch(step, self.steps_per_epoch)
        progress = ops.clip((epoch - self.start_epoch) / (self.end_epoch - self.start_epoch), 0.0, 1.0)
        value = self.initial_value * ops.power(1.0 - progress, self.power)
        return ops.maximum(value, self.end_value)

    def get_config(self):
        return {
            "initial_value": self.initial_value,
            "steps_per_epoch": self.steps_per_epoch,
            "end_epoch": self.end_epoch,
            "start_epoch": self.start_epoch,
            "power": self.power,
            "end_value": self.end_value,
        }


@keras.saving.register_keras_serializable(package="keras_hoopt")
class EpochExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``v(e) = v0 * decay_rate^(e / epochs_per_decay)``: THOR's damping schedule.

    THOR on ResNet-50: ``v0=0.03, decay_rate=0.5, epochs_per_decay=10``.
    """

    def __init__(self, initial_value, steps_per_epoch, decay_rate=0.5, epochs_per_decay=10.0):
        _check_positive("initial_value", initial_value)
        _check_steps_per_epoch(steps_per_epoch)
        _check_positive("decay_rate", decay_rate)
        _check_positive("epochs_per_decay", epochs_per_decay)
        self.initial_value = float(initial_value)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_rate, self.epochs_per_decay = float(decay_rate), float(epochs_per_decay)

    def __call__(self, step):
        epoch = _epoch(step, self.steps_per_epoch)
        return self.initial_value * ops.power(self.decay_rate, epoch / self.epochs_per_decay)

    def get_config(self):
        return {
            "initial_value": self.initial_value,
            "steps_per_epoch": self.steps_per_epoch,
            "decay_rate": self.decay_rate,
            "epochs_per_decay": self.epochs_per_decay,
        }

"""Tells the user, after each ``fit`` / ``train_on_batch`` step, that a step was skipped.

A curvature optimizer never applies a step whose gradients or update hold
NaN/Inf; it counts it in the int64 variable ``optimizer._skipped_steps``
inside the compiled step, where no Python runs (and XLA allows no print).
This module wraps the model's train function (per instance, installed by the
compile hook) so that after each call the counter is read and, when it moved,
a warning is logged (the first skip at once, later ones at most every
``WARN_EVERY_S`` seconds, with the running count) or, with
``on_nonfinite="raise"``, ``FloatingPointError`` is raised. The read is one
scalar per step. A custom training loop that calls ``apply_gradients`` itself
is not wrapped: read ``optimizer.skipped_steps`` there.
"""

import math
import time
import warnings

WARN_EVERY_S = 30.0
_MARK = "_keras_hoopt_reporter"


class SkipReporter:
    """Reads one optimizer's skip counter after each train-function call."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.seen = None  # the count already reported
        self.last_warning = -math.inf

    def _count(self):
        counter = getattr(self.optimizer, "_skipped_steps", None)
        return 0 if counter is None else int(counter.numpy())

    def wrap(self, train_function):
        def reporting_train_function(*args, **kwargs):
            if self.seen is None:
                self.seen = self._count() if self.optimizer.built else 0
            logs = train_function(*args, **kwargs)
            self.check()
            return logs

        setattr(reporting_train_function, _MARK, self)
        return reporting_train_function

    def check(self):
        count = self._count()
        new = count - (self.seen or 0)
        if new <= 0:
            return
        self.seen = count
        name = type(self.optimizer).__name__
        step = int(self.optimizer.iterations.numpy())
        message = (
            f"{name}: {new} training step(s) up to step {step} had NaN/Inf gradients or "
            f"updates and were skipped ({count} in all): weights, momenta and curvature "
            "statistics kept their last good values. Check the batch data (inputs, labels, "
            "sample weights) and the learning rate / damping."
        )
        if getattr(self.optimizer, "on_nonfinite", "skip") == "raise":
            raise FloatingPointError(message + " (on_nonfinite='raise')")
        now = time.monotonic()
        if now - self.last_warning >= WARN_EVERY_S:
            self.last_warning = now
            warnings.warn(message, RuntimeWarning, stacklevel=2)


def install(model, optimizer):
    """Wrap ``model``'s train function(s) so that ``optimizer``'s skips are reported."""
    reporter = SkipReporter(optimizer)
    make = type(model).make_train_function.__get__(model)

    def make_train_function(force=False):
        make(force)
        function = model.train_function
        if function is not None and getattr(function, _MARK, None) is not reporter:
            model.train_function = reporter.wrap(function)
        return model.train_function

    object.__setattr__(model, "make_train_function", make_train_function)
    model.train_function = None


def uninstall(model):
    model.__dict__.pop("make_train_function", None)

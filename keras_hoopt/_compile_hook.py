"""Lets ``model.compile(optimizer=keras_hoopt.KFAC(...))`` hand the model to the optimizer.

Keras never gives an optimizer its model, yet a curvature optimizer must
capture the model's layer inputs and output gradients from the first traced
train step on. ``Trainer.compile`` is wrapped once (when keras_hoopt is
imported): after Keras's own ``compile`` has run, a curvature optimizer found in
``model.optimizer`` (also inside a ``LossScaleOptimizer``) is attached to the
model; any other optimizer detaches a previous curvature optimizer's capture (whatever
object a keras_hoopt optimizer stored as the model's ``_keras_hoopt_session``:
K-FAC's layer capture or the exact optimizers' batch recorder; each has
``uninstall()``). The model's train function is wrapped to report steps the
optimizer skipped for NaN/Inf (:mod:`keras_hoopt._step_report`).
The wrapper is the same function object for every model class, so Keras's
check ``self.__class__.compile != Trainer.compile`` (used by ``load_model``)
still sees an un-overridden ``compile``.
"""

import functools

from keras.src.trainers import trainer as _trainer

from keras_hoopt import _step_report

_ATTACH_METHOD = "_attach_from_compile"


def _curvature_optimizer(optimizer):
    inner = getattr(optimizer, "inner_optimizer", None)
    candidate = inner if inner is not None else optimizer
    return candidate if hasattr(candidate, _ATTACH_METHOD) else None


def install():
    compile_fn = _trainer.Trainer.compile
    if getattr(compile_fn, "_keras_hoopt_hook", False):
        return

    @functools.wraps(compile_fn)
    def compile(self, *args, **kwargs):
        result = compile_fn(self, *args, **kwargs)
        optimizer = getattr(self, "optimizer", None)
        curvature = _curvature_optimizer(optimizer)
        if curvature is not None:
            scaler = optimizer if optimizer is not curvature else None
            getattr(curvature, _ATTACH_METHOD)(self, getattr(self, "loss", None), scaler)
            _step_report.install(self, curvature)
        else:
            session = self.__dict__.get("_keras_hoopt_session")
            if session is not None:
                session.uninstall()
            _step_report.uninstall(self)
        return result

    compile._keras_hoopt_hook = True
    _trainer.Trainer.compile = compile

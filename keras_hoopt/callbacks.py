"""Keras 3 callbacks for distributed training.

``horovod.tensorflow.keras`` (its ``DistributedOptimizer`` and callbacks)
does not work with Keras 3 (docs/distributed.md): the curvature optimizers
reduce gradients and statistics themselves, and this module provides the
rest of what a Horovod launch needs.
"""

import keras

from keras_hoopt.communication.horovod import import_horovod


class BroadcastGlobalVariables(keras.callbacks.Callback):
    """Copy every model and optimizer variable from worker ``root_rank`` to all workers.

    Runs once per model, when training begins (after Keras has built the model and the
    optimizer), so every Horovod process starts from the same weights
    and curvature state even if each initialised or loaded its own::

        model.fit(dataset, callbacks=[keras_hoopt.callbacks.BroadcastGlobalVariables(0)])

    Under ``tf.distribute`` strategies variables are already mirrored; this
    callback is for Horovod launches and needs Horovod.

    Args:
        root_rank: the worker whose values everyone takes (an int >= 0).
    """

    def __init__(self, root_rank=0):
        super().__init__()
        if not isinstance(root_rank, int) or isinstance(root_rank, bool) or root_rank < 0:
            raise ValueError(f"Invalid value for `root_rank`: {root_rank!r}. Accepted: an int >= 0.")
        self.root_rank = root_rank
        self._broadcast_to = None  # the model last synchronised (once per model)

    @property
    def broadcast_done(self):
        return self._broadcast_to is not None and self._broadcast_to is self.model

    def on_train_begin(self, logs=None):
        if self.broadcast_done:
            return
        hvd = import_horovod()
        if self.root_rank >= hvd.size():
            raise ValueError(
                f"Invalid value for `root_rank`: {self.root_rank}. Accepted: a rank below the "
                f"number of Horovod processes ({hvd.size()})."
            )
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "built", False):
            variables += list(optimizer.variables)
        seen, unique = set(), []
        for variable in variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                unique.append(variable)
        if hvd.size() > 1 and unique:
            hvd.broadcast_variables([getattr(v, "value", v) for v in unique], root_rank=self.root_rank)
        self._broadcast_to = self.model

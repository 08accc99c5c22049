"""Work around Keras 3 bugs that stop documented use of the optimizers.

``model.fit`` under ``tf.distribute.MultiWorkerMirroredStrategy`` fails in
Keras 3 (keras-team/keras#20585, open): before training, ``fit`` takes one
batch to build the model symbolically and averages that batch's structure
``(x, y)`` with ``strategy.reduce("MEAN", ...)``, which
``CollectiveAllReduceStrategy`` rejects ("Attempt to convert a value
(PerReplica...)"). The batch only provides shapes, so this module makes
that step take the local replica's part of each element instead. Then each
step's logs (scalar metric values) are averaged over workers with
``strategy.reduce("MEAN", v, axis=0)``, which fails for a scalar ("Invalid
reduction dimension 0 for input with 0 dimensions"); scalars are averaged
with ``axis=None`` instead. Nothing else changes; the patches are applied
once, when keras_hoopt is imported.
"""

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as _tf_trainer


def _local_part(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def install():
    trainer = _tf_trainer.TensorFlowTrainer
    original = getattr(trainer, "_maybe_symbolic_build", None)
    if original is None or getattr(original, "_keras_hoopt_compat", False):
        return

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None or iterator is None:
            return original(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tree.map_structure(_local_part, next(it))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    _maybe_symbolic_build._keras_hoopt_compat = True
    trainer._maybe_symbolic_build = _maybe_symbolic_build

    reduce_per_replica = _tf_trainer.reduce_per_replica

    def _reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and _tf_trainer._collective_all_reduce_multi_worker(strategy):

            def reduce(value):
                local = _local_part(value)
                if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                    return strategy.reduce("MEAN", value, axis=None)
                return reduce_per_replica(value, strategy, reduction)

            return tree.map_structure(reduce, values)
        return reduce_per_replica(values, strategy, reduction)

    _tf_trainer.reduce_per_replica = _reduce_per_replica

"""``tf.distribute`` backend: collectives of the current replica context.

Works for ``MirroredStrategy`` (replicas are devices of one process) and
``MultiWorkerMirroredStrategy`` (replicas are processes); Keras divides each
replica's loss by the number of replicas, so gradients are summed.
``tf.distribute`` has no reduce-scatter in its public replica-context API and
its synchronisation points cannot sit inside ``tf.cond``: every collective
runs in every step.
"""

import tensorflow as tf

from keras_hoopt.communication.base import Communicator


class TFDistributeCommunication(Communicator):
    """Collectives through ``tf.distribute.get_replica_context()``."""

    name = "tf.distribute"
    gradient_reduction = "sum"
    conditional_collectives = False

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    @property
    def num_workers(self):
        return int(self.strategy.num_replicas_in_sync)

    def worker_id(self):
        context = tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError("tf.distribute collectives run inside a replica context (strategy.run).")
        return tf.cast(context.replica_id_in_sync_group, tf.int32)

    def _records(self):
        # The first replica of each process records (MirroredStrategy: replica 0;
        # MultiWorkerMirroredStrategy with one device per worker: every worker).
        replica = tf.get_static_value(tf.convert_to_tensor(self.worker_id()))
        local = max(len(getattr(self.strategy.extended, "worker_devices", ())), 1)
        return replica is None or int(replica) % local == 0

    def _all_gather_payload(self, flat, sizes):
        # Every worker sends the largest share, padded (see _all_gather).
        return [tf.TensorSpec([max(sizes)], flat.dtype)]

    def _all_reduce(self, tensors, op):
        context = tf.distribute.get_replica_context()
        reduce_op = tf.distribute.ReduceOp.SUM if op == "sum" else tf.distribute.ReduceOp.MEAN
        return list(context.all_reduce(reduce_op, tensors))

    def _all_gather(self, flat, sizes):
        # all_gather needs equal shapes: pad each worker's part to the largest.
        context = tf.distribute.get_replica_context()
        width = max(sizes)
        padded = tf.pad(flat, [[0, width - tf.shape(flat)[0]]])
        gathered = tf.reshape(context.all_gather(padded[None, :], axis=0), [len(sizes), width])
        return tf.concat([gathered[w, :size] for w, size in enumerate(sizes)], axis=0)

    def _broadcast(self, tensors, root):
        context = tf.distribute.get_replica_context()
        mask = tf.cast(tf.equal(self.worker_id(), root), tensors[0].dtype)
        return list(context.all_reduce(tf.distribute.ReduceOp.SUM, [t * tf.cast(mask, t.dtype) for t in tensors]))

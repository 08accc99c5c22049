"""Horovod backend: ``horovod.tensorflow`` collectives between processes.

For launches with ``horovodrun -np N`` (gloo or MPI). Each process minimises
the mean loss of its own batch, so gradients are averaged. Horovod ops may sit
inside ``tf.cond`` when every rank takes the same branch, so statistics that
are not due are not sent. Horovod collectives have no XLA lowering here: the
optimizer turns the model's ``jit_compile`` off (docs/distributed.md).
"""

import tensorflow as tf

from keras_hoopt.communication.base import Communicator

INSTALL_HINT = (
    "communication='horovod' needs Horovod with TensorFlow support: run "
    "`bash scripts/install_horovod.sh` (it builds horovod 0.28.1 for this TensorFlow), "
    "or choose communication='auto', 'tf.distribute' or 'none'."
)


def import_horovod():
    """``horovod.tensorflow``, initialised; a clear ImportError when it is missing."""
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    if not hvd.is_initialized():
        hvd.init()
    return hvd


def horovod_size():
    """Number of Horovod processes if Horovod is imported and initialised, else None."""
    import sys

    module = sys.modules.get("horovod.tensorflow")
    if module is None:
        return None
    try:
        return module.size() if module.is_initialized() else None
    except Exception:  # pragma: no cover - a half-initialised Horovod
        return None


class HorovodCommunication(Communicator):
    """Collectives through ``horovod.tensorflow``."""

    name = "horovod"
    gradient_reduction = "mean"
    conditional_collectives = True

    def __init__(self):
        super().__init__()
        self.hvd = import_horovod()

    @property
    def num_workers(self):
        return int(self.hvd.size())

    def worker_id(self):
        return int(self.hvd.rank())

    def _all_reduce(self, tensors, op):
        hvd_op = self.hvd.Sum if op == "sum" else self.hvd.Average
        return list(self.hvd.grouped_allreduce([tf.convert_to_tensor(t) for t in tensors], op=hvd_op))

    def _records(self):
        return True  # one worker per process: each records its own plan

    def _all_gather(self, flat, sizes):
        # Horovod's allgather takes a different first dimension on each rank.
        return self.hvd.allgather(flat)

    def _broadcast(self, tensors, root):
        return [self.hvd.broadcast(t, root_rank=root) for t in tensors]

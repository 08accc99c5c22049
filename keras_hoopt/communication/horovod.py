"""Horovod backend: ``horovod.tensorflow`` collectives between processes.

For launches with ``horovodrun -np N`` (gloo or MPI). Each process minimises
the mean loss of its own batch, so gradients are averaged. Horovod ops can
sit inside ``tf.cond`` when every rank takes the same branch (verified on a
toy graph), but an all-gather of inverses inside a ``tf.cond`` hung in the
optimizer's step with 4 blocks on 2 ranks (not understood yet), so this
backend declares ``conditional_collectives = False``: every collective runs
every step, as under ``tf.distribute``. Horovod collectives have no XLA
lowering here: the optimizer turns the model's ``jit_compile`` off
(docs/distributed.md).
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
    conditional_collectives = False  # see the module docstring
    turns_off_jit = True

    def __init__(self):
        super().__init__()
        self.hvd = import_horovod()

    @property
    def num_workers(self):
        return int(self.hvd.size())

    def worker_id(self):
        return int(self.hvd.rank())

    def begin_step(self):
        super().begin_step()
        self._calls = 0
        self._previous = []  # outputs of the last collective (see _after_previous)

    def _after_previous(self, flat):
        """``flat`` with one element of the previous collective's output appended.

        Horovod runs a collective once every rank has submitted it, and a rank
        submits it as soon as its inputs are ready. A worker that owns no layer
        sends an empty, constant payload: its all-gather was submitted before
        the step's all-reduce, and with gloo the job deadlocked (4 processes,
        3 layers). A control dependency did not prevent it (the empty constant
        is folded away); a data dependency does: every worker appends one
        element of the previous collective's output, dropped after the gather.
        """
        previous = getattr(self, "_previous", [])
        if not previous:
            return flat, 0
        link = tf.cast(tf.reshape(previous[0], [-1])[:1], flat.dtype)
        return tf.concat([flat, link], 0), int(link.shape[0])

    def _done(self, outputs):
        self._previous = list(outputs)
        return outputs

    def _name(self, kind):
        # Horovod matches a collective across ranks by name; without one it
        # derives it from the input tensor's graph name, which differs between
        # ranks whose share of the work differs. Names are given in call order.
        self._calls = getattr(self, "_calls", 0) + 1
        return f"keras_hoopt_{kind}_{self._calls}"

    def _all_reduce(self, tensors, op):
        hvd_op = self.hvd.Sum if op == "sum" else self.hvd.Average
        return self._done(list(self.hvd.grouped_allreduce(
            [tf.convert_to_tensor(t) for t in tensors], op=hvd_op, name=self._name("all_reduce")
        )))

    def _records(self):
        return True  # one worker per process: each records its own plan

    def _all_gather(self, flat, sizes):
        # Horovod's allgather takes a different first dimension on each rank.
        flat, extra = self._after_previous(flat)
        gathered = self._done([self.hvd.allgather(flat, name=self._name("all_gather"))])[0]
        if not extra:
            return gathered
        pieces, offset = [], 0
        for size in sizes:
            pieces.append(gathered[offset: offset + size])
            offset += size + extra
        return tf.concat(pieces, 0)

    def _broadcast(self, tensors, root):
        return [self.hvd.broadcast(t, root_rank=root, name=self._name("broadcast")) for t in tensors]

"""Horovod backend: ``horovod.tensorflow`` collectives between processes.

For launches with ``horovodrun -np N`` (gloo or MPI). Each process minimises
the mean loss of its own batch, so gradients are averaged. Collectives may sit
inside a ``tf.cond`` that every rank takes the same way
(``conditional_collectives = True``): statistics travel only in steps where
one is due and inverses only when one was recomputed. Two things make that
work, both found as hangs: collectives are named in call order without the
name scope (a ``tf.cond``'s scope differs between ranks), and each collective
takes one element of the previous collective's output as an extra input (a
rank whose payload was a constant submitted its collectives out of order; one
that never used a collective's output never ran it).
Horovod collectives have no XLA lowering here: the optimizer turns the
model's ``jit_compile`` off (docs/distributed.md).
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


def horovod_rank_and_size():
    """``(rank, size)`` if Horovod is imported and initialised, else ``(0, 1)`` (it is never imported here)."""
    import sys

    module = sys.modules.get("horovod.tensorflow")
    try:
        if module is not None and module.is_initialized():
            return int(module.rank()), int(module.size())
    except Exception:  # pragma: no cover - a half-initialised Horovod
        pass
    return 0, 1


def horovod_size():
    """Number of Horovod processes if Horovod is imported and initialised, else None."""
    import sys

    module = sys.modules.get("horovod.tensorflow")
    if module is None or not module.is_initialized():
        return None
    return horovod_rank_and_size()[1]


class HorovodCommunication(Communicator):
    """Collectives through ``horovod.tensorflow``."""

    name = "horovod"
    gradient_reduction = "mean"
    conditional_collectives = True  # see the module docstring
    turns_off_jit = True

    _instances = 0  # communicators created in this process, in order (the same on every rank)

    def __init__(self):
        super().__init__()
        self.hvd = import_horovod()
        HorovodCommunication._instances += 1
        self._prefix = f"keras_hoopt{HorovodCommunication._instances}"

    @property
    def num_workers(self):
        return int(self.hvd.size())

    def worker_id(self):
        return int(self.hvd.rank())

    def begin_step(self):
        super().begin_step()
        self._calls = 0
        self._previous = []  # outputs of the last collective (see _link)

    def _link(self, dtype):
        """One element (shape ``[1]``, ``dtype``) of the previous collective's output, or None.

        Horovod runs a collective once every rank has submitted it, and a rank
        submits it as soon as its inputs are ready, if its output is needed at
        all. Two hangs came from that: a worker that owns no layer sends an
        empty, constant all-gather payload and submitted it before the step's
        all-reduce (a control dependency did not help: the constant was
        folded); and in ``"gradients"`` mode such a worker never uses its
        reduced gradients, so TensorFlow never ran that all-reduce at all.
        Every collective therefore takes one element of the previous one's
        output as an extra input: a chain through the step that fixes the
        order and keeps every collective needed (a ``tf.cond`` waits for its
        captured inputs even when the branch that uses them is not taken).
        """
        previous = getattr(self, "_previous", [])
        if not previous or previous[0].shape.num_elements() == 0:
            return None
        return tf.cast(tf.reshape(previous[0], [-1])[:1], dtype)

    def _finished(self, outputs):
        # The next collective links to these. After a tf.cond the base class
        # calls this again with the cond's outputs (the branch's own tensors do
        # not exist outside the branch).
        self._previous = list(outputs)
        return outputs

    def _name(self, kind):
        # Horovod matches a collective across ranks by name. Without one it
        # derives it from the input tensor's graph name, and with one it still
        # prefixes the name scope, which inside a tf.cond holds the cond's
        # index (cond_2 on one rank, cond_6 on another whose share of the work
        # differs): the ranks then wait for different collectives forever.
        # Names are therefore given in call order, per optimizer, and used
        # without the scope (ignore_name_scope=True).
        self._calls = getattr(self, "_calls", 0) + 1
        return f"{self._prefix}_{kind}_{self._calls}"

    def _all_reduce(self, tensors, op):
        hvd_op = self.hvd.Sum if op == "sum" else self.hvd.Average
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        link = self._link(tensors[0].dtype)
        reduced = list(self.hvd.grouped_allreduce(
            tensors + ([link] if link is not None else []), op=hvd_op, name=self._name("all_reduce"),
            ignore_name_scope=True
        ))
        return self._finished(reduced[: len(tensors)])

    def _records(self):
        return True  # one worker per process: each records its own plan

    def _all_gather(self, flat, sizes):
        # Horovod's allgather takes a different first dimension on each rank.
        link = self._link(flat.dtype)
        if link is not None:
            flat = tf.concat([flat, link], 0)
        gathered = self._finished([self.hvd.allgather(flat, name=self._name("all_gather"), ignore_name_scope=True)])[0]
        if link is None:
            return gathered
        pieces, offset = [], 0
        for size in sizes:  # each worker's payload is followed by its one-element link
            pieces.append(gathered[offset: offset + size])
            offset += size + 1
        return tf.concat(pieces, 0)

    def _broadcast(self, tensors, root):
        return [self.hvd.broadcast(t, root_rank=root, name=self._name("broadcast"), ignore_name_scope=True)
                for t in tensors]

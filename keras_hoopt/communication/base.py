"""Interface of a communication backend: the collectives a curvature optimizer needs.

An optimizer step on ``W`` workers makes, in this order on every worker:

1. one fused all-reduce of the gradients and the statistics that are due
   (:meth:`Communicator.all_reduce`);
2. with model-parallel inversion, one all-gather of what each worker computed
   for the layers it owns (:meth:`Communicator.all_gather`): their inverses,
   or their preconditioned gradients.

Backends differ in how they reach the other workers (a ``tf.distribute``
replica context, Horovod ops) and in two facts the optimizer needs:

* ``gradient_reduction``: ``"sum"`` when the framework already divides each
  worker's loss by the number of workers (``tf.distribute`` under Keras),
  ``"mean"`` otherwise (Horovod: each process minimises its local mean loss);
* ``conditional_collectives``: whether a collective may sit inside a
  ``tf.cond`` that every worker takes the same way (Horovod: yes, so stale
  statistics cost no bytes; ``tf.distribute``: no, its synchronisation points
  cannot sit inside control flow, so inputs that are not due are sent as zeros).

Every collective records its payload in :attr:`Communicator.plan` when it is
traced: what one worker contributes per step, so benchmarks can report bytes.
Where the optimizer gives it a counter (:attr:`Communicator.bytes_sent`, an
int64 variable), a collective also adds its payload to it each time it
actually runs, so skipped conditional collectives are not counted.
"""

import numpy as np
import tensorflow as tf


class Collective:
    """One traced collective: ``kind``, payload ``bytes`` per worker, ``conditional``, ``what``."""

    def __init__(self, kind, nbytes, conditional, what):
        self.kind, self.bytes, self.conditional, self.what = kind, int(nbytes), bool(conditional), what

    def as_dict(self):
        return {"kind": self.kind, "bytes": self.bytes, "conditional": self.conditional, "what": self.what}


def payload_bytes(tensors):
    """Bytes of ``tensors`` as traced. A tensor whose size is known only at run time
    (an ``IndexedSlices`` gradient of an embedding: as many rows as the batch looked
    up) counts as the dense tensor it stands for (an upper bound), else as 0."""
    total = 0
    for t in tensors:
        elements = t.shape.num_elements()
        if elements is None:
            dense_shape = tf.get_static_value(t.dense_shape) if isinstance(t, tf.IndexedSlices) else None
            elements = int(np.prod(dense_shape)) if dense_shape is not None else 0
        total += int(elements) * t.dtype.size
    return total


class Communicator:
    """A communication backend. Subclasses implement the ``_`` methods."""

    name = None
    gradient_reduction = "sum"
    conditional_collectives = False
    turns_off_jit = False  # its collectives cannot be XLA-compiled

    def __init__(self):
        self.plan = []
        self.bytes_sent = None  # int64 variable: payload bytes of the collectives that ran

    # -- facts ---------------------------------------------------------------
    @property
    def num_workers(self):
        """Number of workers (Python int) taking part in every collective."""
        raise NotImplementedError

    def worker_id(self):
        """This worker's index in ``[0, num_workers)`` (int32 scalar tensor or int)."""
        raise NotImplementedError

    # -- collectives -----------------------------------------------------------
    def all_reduce(self, tensors, op="sum", when=None, what="", shapes=None):
        """Element-wise ``op`` (``"sum"`` or ``"mean"``) over workers of each tensor (one fused call).

        ``tensors``: a list of tensors, or a callable returning them (then it
        runs inside the ``tf.cond`` on ``when``, so inputs that are not needed
        are not computed either); with a callable and ``when``, ``shapes``
        lists the ``tf.TensorShape`` of each returned (float32) tensor.
        ``when`` (a boolean scalar tensor with the same value on every worker,
        or None): where it is False, backends with conditional collectives
        skip the communication and return zeros; the caller must then not use
        the results. So does a single worker (nothing travels). Otherwise,
        without conditional collectives, the call always runs.
        """
        compute = tensors if callable(tensors) else (lambda: list(tensors))
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}.")
        conditional = self._skippable(when)

        def communicate():
            local = [tf.convert_to_tensor(t) for t in compute()]
            self._record("all_reduce", local, conditional, what)
            if self.num_workers == 1 or not local:
                return local
            self._count(local)
            return self._all_reduce(local, op)

        if not conditional:
            return communicate()
        if shapes is None:
            shapes = [t.shape for t in compute()] if not callable(tensors) else None
        if shapes is None:
            raise ValueError("all_reduce with a callable and `when` needs `shapes`.")
        return self._finished(tf.cond(when, communicate, lambda: [tf.zeros(shape) for shape in shapes]))

    def all_gather(self, flat, sizes, when=None, what=""):
        """Concatenate every worker's 1-D ``flat`` (worker ``w`` sends ``sizes[w]`` elements).

        ``sizes`` is a Python list, the same on every worker; ``flat`` on worker
        ``w`` has ``sizes[w]`` elements. Returns the 1-D concatenation in
        worker order (``sum(sizes)`` elements) on every worker. With ``when``
        False (conditional backends only) returns zeros of that size.
        """
        total = int(sum(sizes))
        conditional = self._skippable(when)
        payload = self._all_gather_payload(flat, sizes)
        self._record("all_gather", payload, conditional, what)
        if self.num_workers == 1:
            return flat
        if total == 0:
            return tf.zeros([0], flat.dtype)

        def communicate():
            self._count(payload)
            return self._all_gather(flat, sizes)

        if not conditional:
            return communicate()
        out = tf.cond(when, communicate, lambda: tf.zeros([total], flat.dtype))
        return self._finished([out])[0]

    def broadcast(self, tensors, root=0):
        """Values of ``tensors`` on worker ``root``, on every worker (eager or graph)."""
        tensors = list(tensors)
        if self.num_workers == 1 or not tensors:
            return tensors
        return self._broadcast(tensors, root)

    # -- helpers ---------------------------------------------------------------
    def begin_step(self):
        """Called when an optimizer step is traced: :attr:`plan` restarts (one replica per process records it)."""
        if self._records():
            self.plan = []

    def _records(self):
        return tf.get_static_value(tf.convert_to_tensor(self.worker_id())) in (0, None)

    def _record(self, kind, tensors, conditional, what):
        if self._records():
            self.plan.append(Collective(kind, payload_bytes(tensors), conditional, what))

    def _all_gather_payload(self, flat, sizes):
        """What this worker puts on the wire for :meth:`all_gather` (tensors or specs, for byte counts)."""
        return [flat]

    def _count(self, tensors):
        """Add the payload of a collective that runs now to :attr:`bytes_sent`."""
        if self.bytes_sent is not None:
            self.bytes_sent.assign_add(tf.constant(payload_bytes(tensors), tf.int64))

    def _skippable(self, when):
        """Whether a collective with ``when`` sits in a ``tf.cond``: the backend allows it, or there
        is one worker and nothing travels (so inputs that are not due are not computed either: the
        quadratic model's Levenberg-Marquardt losses, two forward passes, every 5th step only)."""
        return when is not None and when is not True and (self.conditional_collectives or self.num_workers == 1)

    def _finished(self, outputs):
        """Hook: a conditional collective's outputs after its ``tf.cond``; returns them."""
        return outputs

    def _all_reduce(self, tensors, op):
        raise NotImplementedError

    def _all_gather(self, flat, sizes):
        raise NotImplementedError

    def _broadcast(self, tensors, root):
        raise NotImplementedError

    def describe(self):
        return f"{self.name} ({self.num_workers} worker{'s' if self.num_workers != 1 else ''})"

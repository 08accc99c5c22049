"""Model-parallel inversion at run time: who holds which preconditioner, and the all-gathers.

:mod:`keras_hoopt.communication.placement` decides the owners (a pure
function of the block shapes). :class:`Placement` is what an optimizer keeps
of that decision: the effective mode, the owner of each block, the state that
survives a change of owners (``inverse_holders``, ``state_origin``: optimizer
variables, so checkpoints carry them) and the per-worker counters. Its
:meth:`~Placement.share_preconditioners` (``"inverses"`` mode) and
:meth:`~Placement.share_preconditioned` (``"gradients"`` mode) are the two
all-gathers of the step.

``inverse_holders[b]`` records who holds a valid preconditioner of block
``b``: -1 every worker, ``k`` only worker ``k`` (``"gradients"`` mode);
``state_origin`` is the worker whose memory the state is (a checkpoint written
by rank 0 and read anywhere says 0). A worker recomputes a preconditioner it
needs but does not validly hold: after resuming on another number of workers
or in another mode.
"""

import tensorflow as tf

from keras_hoopt.communication.placement import assign_owners, inversion_cost, resolve_mode


def worker_index(communicator):
    """This worker's index as a Python int (known when tracing)."""
    value = tf.get_static_value(tf.convert_to_tensor(communicator.worker_id()))
    if value is None:  # pragma: no cover - every supported backend knows it statically
        raise RuntimeError(f"{communicator.name}: the worker index is not known when tracing.")
    return int(value)


def _shape(tensor):
    return tf.TensorShape(tensor.shape)


def _size(shape):
    return max(shape.num_elements(), 1)


def any_flag(flags):
    """``any(flags)`` of Python or tensor booleans, as Python ``True``/``False`` where known."""
    if any(f is True for f in flags):
        return True
    return tf.reduce_any(tf.stack(flags)) if flags else False


class Placement:
    """Owners of each block's inversion, and what each worker holds.

    Args:
        optimizer: the optimizer (its ``add_variable`` creates the state).
        blocks: the curvature blocks, in build order.
        communicator: the :class:`~keras_hoopt.communication.Communicator`.
        model_parallel: the optimizer's ``model_parallel`` argument.
        split_dim: THOR's block split (enters the inversion cost).
        num_statistics: how many statistics the blocks have in all.
    """

    def __init__(self, optimizer, blocks, communicator, model_parallel, split_dim, num_statistics):
        self.communicator = communicator
        workers = communicator.num_workers
        self.mode = resolve_mode(model_parallel, workers, communicator.conditional_collectives)
        costs = [inversion_cost(block.statistic_shapes(), split_dim) for block in blocks]
        self.owners = assign_owners(costs, workers) if self.mode != "off" else [-1] * len(costs)
        self.holders = optimizer.add_variable(
            (len(blocks),), lambda shape, dtype=None: -tf.ones(shape, "int32"), "int32", name="inverse_holders"
        )
        self.origin = optimizer.add_variable((), "zeros", "int32", name="state_origin")
        # Per-worker counts, not optimizer state: not checkpointed, not synchronised.
        with tf.init_scope():
            self.local_inversions = tf.Variable(
                tf.zeros([num_statistics], tf.int64),
                trainable=False,
                name="local_inversions",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
            self.bytes_sent = tf.Variable(
                tf.zeros([], tf.int64),
                trainable=False,
                name="bytes_sent",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
        communicator.bytes_sent = self.bytes_sent

    def for_step(self):
        """This worker's view for one traced step (its index, the holder state as read now).

        A view per trace: under ``tf.distribute`` the replicas of one process
        trace the step in interleaved threads, each with its own index.
        """
        return StepPlacement(self, worker_index(self.communicator))


class StepPlacement:
    """A :class:`Placement` as one worker sees it in one step: ``me`` is its index."""

    def __init__(self, placement, me):
        self.communicator, self.mode, self.owners = placement.communicator, placement.mode, placement.owners
        self.holders, self.origin = placement.holders, placement.origin
        self.local_inversions = placement.local_inversions
        self.me = me
        holders, origin = tf.convert_to_tensor(placement.holders), tf.convert_to_tensor(placement.origin)
        # per block: whether its held preconditioner state is valid here (one vector comparison, unstacked)
        self._held = tf.unstack(tf.logical_or(tf.equal(holders, -1), tf.equal(holders, origin)), num=len(self.owners))

    def computes(self, b):
        """Whether this worker recomputes (and counts) block ``b``'s preconditioner."""
        return self.mode == "off" or self.owners[b] == self.me

    def holds(self, b):
        """Whether this worker keeps block ``b``'s preconditioner (everyone but in ``"gradients"`` mode)."""
        return self.mode != "gradients" or self.owners[b] == self.me

    def preconditions(self, b):
        """Whether this worker preconditions block ``b``'s gradients itself."""
        return self.mode != "gradients" or self.owners[b] == self.me

    def must_recompute(self, b):
        """Boolean tensor (or False): recompute although not due, because the held state is not valid here.

        In ``"gradients"`` mode only the owner needs it; otherwise everyone,
        and the holders and origin read the same on every worker.
        """
        if self.mode == "gradients" and not self.computes(b):
            return False
        return tf.logical_not(self._held[b])

    def assignments(self):
        """This step's writes of the holder state: ``[(variable, value, None)]``."""
        layout = [-1] * len(self.owners) if self.mode != "gradients" else list(self.owners)
        return [
            (self.holders, tf.constant(layout, tf.int32), None),
            (self.origin, tf.constant(self.me, tf.int32), None),
        ]

    # -- the all-gathers ----------------------------------------------------
    def share_preconditioners(self, run, state, ok):
        """``"inverses"`` mode: all-gather each owner's recomputed preconditioner state.

        ``state[b][name]`` is ``{part: tensor}``, ``ok[b][name]`` and
        ``run[b][name]`` booleans. Each worker sends, for the blocks it owns,
        every part and ``ok`` (as 0/1) of every statistic; only statistics
        recomputed this step (``run``) take the gathered value. With
        conditional collectives nothing travels in steps where nothing was
        recomputed. Returns ``(state, ok)``.
        """
        comm, me = self.communicator, self.me
        entries = []  # (worker, b, name, part or None for ok, value), block-major
        for b in sorted(state):
            for name in state[b]:
                for part, value in state[b][name].items():
                    entries.append((self.owners[b], b, name, part, value))
                entries.append((self.owners[b], b, name, None, ok[b][name]))
        entries.sort(key=lambda e: e[0])  # stable: worker-major, block order inside
        sizes = [0] * comm.num_workers
        for w, _, _, _, value in entries:
            sizes[w] += _size(_shape(value))
        mine = [tf.reshape(tf.cast(value, tf.float32), [-1]) for w, _, _, _, value in entries if w == me]
        flat = tf.concat(mine, 0) if mine else tf.zeros([0], tf.float32)
        when = any_flag([run[b][n] for b in sorted(state) for n in state[b]])
        gathered = comm.all_gather(flat, sizes, when=when, what="inverses")
        state = {b: {n: dict(parts) for n, parts in s.items()} for b, s in state.items()}
        ok = {b: dict(v) for b, v in ok.items()}
        offset = 0
        for w, b, name, part, current in entries:
            shape = _shape(current)
            piece = tf.reshape(gathered[offset: offset + _size(shape)], shape)
            offset += _size(shape)
            if w == me:
                continue
            if part is None:
                ok[b][name] = tf.where(run[b][name], piece > 0.5, current)
            else:
                state[b][name][part] = tf.cond(
                    run[b][name], lambda piece=piece: piece, lambda current=current: current
                )
        return state, ok

    def share_preconditioned(self, run, preconditioned, vg, ok, blocks, gradients):
        """``"gradients"`` mode: all-gather each owner's preconditioned gradients, its part of
        ``<p, grad>`` and its inversion decisions and outcomes (an owner may
        have recomputed a preconditioner the others did not know was due).

        ``blocks``: ``[(block, variable indices, statistic names)]``;
        ``gradients``: ``{variable index: gradient}``. Returns
        ``(preconditioned, vg, ok, run)``.
        """
        comm, me = self.communicator, self.me
        layout = []  # (worker, kind, key, shape)
        for b, (block, indices, names) in enumerate(blocks):
            w = self.owners[b]
            if all(i in gradients for i in indices):
                # A preconditioned gradient has its variable's shape (also for a sparse
                # IndexedSlices gradient, whose row count is known only at run time).
                for variable, i in zip(block.variables, indices):
                    layout.append((w, "update", (b, i), variable.shape))
                layout.append((w, "vg", b, tf.TensorShape([])))
            for name in names:
                layout.append((w, "ok", (b, name), tf.TensorShape([])))
                layout.append((w, "run", (b, name), tf.TensorShape([])))
        layout.sort(key=lambda e: e[0])
        sizes = [0] * comm.num_workers
        for w, _, _, shape in layout:
            sizes[w] += _size(tf.TensorShape(shape))
        mine = []
        for w, kind, key, _ in layout:
            if w != me:
                continue
            if kind == "update":
                value = preconditioned[key[0]][key[1]]
            elif kind == "vg":
                value = vg[key]
            else:
                value = tf.cast((ok if kind == "ok" else run)[key[0]][key[1]], tf.float32)
            mine.append(tf.reshape(tf.cast(value, tf.float32), [-1]))
        flat = tf.concat(mine, 0) if mine else tf.zeros([0], tf.float32)
        gathered = comm.all_gather(flat, sizes, what="preconditioned gradients")
        preconditioned = {b: dict(u) for b, u in preconditioned.items()}
        vg = dict(vg)
        ok, run = {b: dict(v) for b, v in ok.items()}, {b: dict(v) for b, v in run.items()}
        offset = 0
        for w, kind, key, shape in layout:
            shape = tf.TensorShape(shape)
            piece = tf.reshape(gathered[offset: offset + _size(shape)], shape)
            offset += _size(shape)
            if kind == "update":
                preconditioned.setdefault(key[0], {})[key[1]] = piece
            elif kind == "vg":
                vg[key] = piece
            elif w != me:
                (ok if kind == "ok" else run)[key[0]][key[1]] = piece > 0.5
        return preconditioned, vg, ok, run

"""One curvature update step, as a short list of named stages.

:class:`CurvatureStep` is built by :meth:`CurvatureOptimizer._backend_update_step`
for each traced step (in replica context) and runs :data:`STAGES` in order,
each in a ``tf.name_scope`` of its name (so a profile can attribute ops to it):

1. ``capture``: take this step's record of layer inputs and output gradients
   (:mod:`keras_hoopt.capture`), the gradients by variable index, and the
   refresh counters;
2. ``batch_statistics``: the refresh policy's decision of which statistics
   are due, lazy thunks that compute them, and (Monte-Carlo Fisher) the one
   sampled backward pass their output gradients come from, in a ``tf.cond``
   on any of them being due;
3. ``reduce``: all-reduce the gradients and the due statistics over workers
   (:mod:`keras_hoopt.communication`);
4. ``fold``: moving averages of the due statistics, a non-finite batch
   statistic skipped;
5. ``decide``: the policy's decision of which preconditioners to recompute;
6. ``refresh_preconditioners``: recompute them (on their owner in
   model-parallel modes), the last good state kept where a factorisation fails;
7. ``share``: ``"inverses"`` mode all-gathers the recomputed preconditioners
   (:class:`keras_hoopt.communication.sharing.Placement`);
8. ``running_state``: blocks with running state (the eigenbasis form's
   diagonal, :mod:`keras_hoopt.blocks.eigenbasis`) fold this batch's value in
   the bases just refreshed, averaged over workers;
9. ``precondition``: each block's preconditioned gradients (in
   ``"gradients"`` mode each owner its share, then all-gathered);
10. ``step_size``: with ``step_size="quadratic_model"``, the learning rate and
   momentum of the preconditioned variables from the quadratic model of the
   loss, and (``damping_control="lm"``) the Levenberg-Marquardt damping
   (:mod:`keras_hoopt.optimizers.quadratic_model`);
11. ``clip``: KL-clipping (with ``step_size="fixed"``);
12. ``apply``: one fused finiteness check, then every write (state, weights,
    momenta) through one ``merge_call``, all gated on it: a non-finite step
    applies nothing.

Stages communicate through the attributes of the step object; each reads
what earlier stages wrote and adds its own. Writes are collected as
``(variable, new value, when)``: ``when`` None writes always, a boolean
tensor only where it holds (a stale statistic or preconditioner is neither
recomputed nor copied).
"""

import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.optimizers import quadratic_model
from keras_hoopt.capture import OUTPUT
from keras_hoopt.communication.sharing import any_flag
from keras_hoopt.refresh.base import (
    FAILED_INVERSIONS,
    INVERSIONS,
    LAST_REFRESH,
    NONFINITE_SKIPS,
    REFRESHES,
    counter_fields,
)

STAGES = (
    "capture",
    "batch_statistics",
    "reduce",
    "fold",
    "decide",
    "refresh_preconditioners",
    "share",
    "running_state",
    "precondition",
    "step_size",
    "clip",
    "apply",
)


def as_write(assignment):
    """``(variable, value)`` or ``(variable, value, when)`` -> the 3-tuple."""
    return tuple(assignment) if len(assignment) == 3 else (*assignment, None)


def fold_statistic(old, counters, batch_thunk, due, step, factor_decay, measure=None, measurement_size=0):
    """Moving average of one statistic, computed only when due; a non-finite batch value is skipped.

    ``F <- decay F + (1 - decay) F_batch`` (the first refresh takes the batch
    value). ``counters`` is a counter vector or its
    :func:`~keras_hoopt.refresh.base.counter_fields`. ``measure(new)`` (the refresh policy's
    :meth:`~keras_hoopt.refresh.RefreshPolicy.measure_refresh`, a float32
    vector of ``measurement_size``) runs in the same branch, so the policy's
    norms cost nothing in a step that does not refresh (zeros there). Returns
    ``(value, counter fields, refreshed, measured)``.
    """
    fields = counter_fields(counters)
    first = tf.equal(fields[REFRESHES], 0)

    def nothing_measured():
        return tf.zeros([measurement_size], tf.float32)

    def refresh():
        value, finite = _moving_average(old, batch_thunk(), first, factor_decay)
        return value, finite, (measure(value) if measure is not None else nothing_measured())

    if due is True:
        value, finite, measured = refresh()
        due = tf.constant(True)
    else:
        value, finite, measured = tf.cond(due, refresh, lambda: (old, tf.constant(False), nothing_measured()))
    take = tf.logical_and(due, finite)
    skipped = tf.logical_and(due, tf.logical_not(finite))
    fields[REFRESHES] = fields[REFRESHES] + tf.cast(take, tf.int64)
    fields[NONFINITE_SKIPS] = fields[NONFINITE_SKIPS] + tf.cast(skipped, tf.int64)
    fields[LAST_REFRESH] = tf.where(take, step, fields[LAST_REFRESH])
    return value, fields, take, measured


def _fold(old, batch_value, first, factor_decay):
    finite = linalg.all_finite(batch_value)
    decay = tf.where(first, 0.0, factor_decay)
    return tf.where(finite, decay * old + (1.0 - decay) * batch_value, old), finite


def _moving_average(old, batch_value, first, factor_decay):
    """``(decay old + (1 - decay) batch_value, finite)`` (``old`` where the batch value is not finite).

    One graph function per rank and dtype (:func:`~keras_hoopt.linalg.shared_function`), called by
    every statistic's fold: traced, optimised and instantiated once instead of once per statistic.
    """
    old = tf.convert_to_tensor(old)
    batch_value = tf.cast(batch_value, old.dtype)
    spec = tf.TensorSpec([None] * old.shape.rank, old.dtype)
    scalar = tf.TensorSpec([], tf.float32)
    value, finite = linalg.shared_function(_fold, [spec, spec, tf.TensorSpec([], tf.bool), scalar])(
        old, batch_value, first, tf.cast(factor_decay, tf.float32)
    )
    value.set_shape(old.shape)
    finite.set_shape([])
    return value, finite


def count_inversions(counters, run, ok):
    """The counter vector after this step's inversion: ``INVERSIONS`` if it succeeded, else ``FAILED_INVERSIONS``."""
    fields = counter_fields(counters)
    fields[INVERSIONS] = fields[INVERSIONS] + tf.cast(tf.logical_and(run, ok), tf.int64)
    fields[FAILED_INVERSIONS] = fields[FAILED_INVERSIONS] + tf.cast(tf.logical_and(run, tf.logical_not(ok)), tf.int64)
    return tf.stack(fields)


def kl_clip_coefficient(vg_sum, learning_rate, kl_clip):
    """``nu = min(1, sqrt(c / (lr^2 <p, grad>)))`` (1 where ``<p, grad>`` is not positive)."""
    vg = vg_sum * learning_rate * learning_rate
    return tf.where(vg > 0.0, tf.minimum(1.0, tf.sqrt(kl_clip / tf.maximum(vg, 1e-30))), 1.0)


def write(variable, value, when, step_ok):
    """``variable.assign(value)``, only where ``when`` holds (always if None) and the step is finite.

    An unconditional write of a skipped step keeps the old value by a select
    (these are small: counters, intervals); a conditional one folds
    ``step_ok`` into its condition.
    """
    if when is None or when is True:
        variable.assign(tf.where(step_ok, value, variable))
        return
    _write_where(when, [(variable, value)], step_ok)


def write_grouped(assignments, step_ok):
    """:func:`write` of every ``(variable, value, when)``, one ``tf.cond`` per distinct ``when``.

    A statistic and its second-last copy, or a preconditioner's parts, share
    their condition: writing them in one branch saves a ``tf.cond`` (and its
    trace, graph optimisation and per-step cost) each. Used outside
    tf.distribute, where a variable needs no ``extended.update`` of its own.
    """
    groups = {}
    for variable, value, when in assignments:
        if when is None or when is True:
            write(variable, value, when, step_ok)
        else:
            groups.setdefault(id(when), (when, []))[1].append((variable, value))
    for when, writes in groups.values():
        _write_where(when, writes, step_ok)


def _write_where(when, writes, step_ok):
    """Every ``(variable, value)`` of ``writes`` assigned in one ``tf.cond`` on ``when and step_ok``."""
    _when(tf.logical_and(when, step_ok), lambda: [variable.assign(value) for variable, value in writes])


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (in an update context, this replica's)."""
    return getattr(variable, "value", variable).handle


def _when(condition, apply):
    """``apply()`` (side effects only) inside a ``tf.cond`` on ``condition``."""

    def run():
        apply()
        return tf.constant(True)

    tf.cond(condition, run, lambda: tf.constant(False))


#: Keras's Adam defaults, used by the ``"adam"`` fallback.
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7


def adam_fallback_update(grad, first, second, learning_rate, step):
    """Adam (Kingma & Ba 2015, Keras's form) for a variable no curvature block preconditions.

    ``m <- m + (1 - b1)(g - m)``, ``v <- v + (1 - b2)(g^2 - v)``, and the change
    ``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` with ``t = step``
    (1 at the first step). Returns ``(change, m, v)``: the variable moves by ``-change``.
    """
    first = first + (grad - first) * (1.0 - ADAM_BETA_1)
    second = second + (tf.square(grad) - second) * (1.0 - ADAM_BETA_2)
    alpha = learning_rate * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, step)) / (1.0 - tf.pow(ADAM_BETA_1, step))
    return alpha * first / (tf.sqrt(second) + ADAM_EPSILON), first, second


def _where_due(compute, due, zeros):
    """``compute()`` where ``due`` (Python ``True`` or a bool tensor), else ``zeros()``.

    A collective's inputs must exist on every worker in every step, so what is
    not due is sent as zeros (the decision is the same on every worker).
    """
    return compute() if due is True else tf.cond(due, compute, zeros)


def _dense(gradient):
    """``gradient`` as a dense tensor (an ``IndexedSlices`` summed into its dense shape)."""
    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


def _count_skip(counter, step_ok):
    counter.assign_add(tf.cast(tf.logical_not(step_ok), tf.int64))


def _restore_if_skipped(variable, before, step_ok):
    variable.assign(tf.where(step_ok, variable, tf.cast(before, variable.dtype)))


class CurvatureStep:
    """One traced update step of a :class:`~keras_hoopt.optimizers.CurvatureOptimizer`.

    Args:
        optimizer: the optimizer (its variables, policy, placement, hooks).
        grads, trainable_variables, learning_rate: as Keras passes them to
            ``_backend_update_step``.
    """

    def __init__(self, optimizer, grads, trainable_variables, learning_rate):
        self.optimizer = optimizer
        self.grads, self.trainable_variables, self.learning_rate = grads, trainable_variables, learning_rate
        self.assignments = []

    def run(self):
        for stage in STAGES:
            with tf.name_scope(stage):
                getattr(self, stage)()

    # ---------------------------------------------------------------- stages
    def capture(self):
        opt = self.optimizer
        att = opt._attachment
        self.record = att.session.pop_record() if att.session is not None else None
        if self.record is not None:
            opt._resolve_fisher(record=self.record)
        self.replicas = opt._distribution_strategy.num_replicas_in_sync
        self.communicator = att.communicator
        self.communicator.begin_step()
        self.placement = att.placement.for_step()
        # Optimizer steps, not micro-batches: with gradient_accumulation_steps=k
        # Keras's _iterations counts micro-batches and iterations = _iterations // k.
        self.step = tf.convert_to_tensor(opt.iterations)
        self.lr = tf.cast(self.learning_rate, tf.float32)
        self.damping = opt._current_damping()
        # Gradients by variable index (Keras filtered out the None ones).
        position = {opt._var_key(v): opt._get_variable_index(v) for v in self.trainable_variables}
        self.by_index = {position[opt._var_key(v)]: g for g, v in zip(self.grads, self.trainable_variables)}
        self.views = opt._views([counter_fields(c) for c in opt._counters])
        self.blocks = list(zip(self.views, opt._slot_indices()))

    def batch_statistics(self):
        """``self.due[b][name]`` (the policy's decision) and ``self.thunks[b][name]()``.

        Only blocks recorded in this step get entries. The thunks run inside
        the ``tf.cond`` of :func:`fold_statistic` (one worker) or of the
        all-reduce (several); with the Monte-Carlo Fisher they take their
        output gradients from :meth:`_sampled_backward_pass`, built here.
        """
        self.due, self.thunks = {}, {}
        if self.record is None:
            return
        policy = self.optimizer.refresh_policy
        recorded = []
        for view in self.views:
            block = view.block
            calls = self.record.calls.get(id(block.layer))
            if not calls or not all(c.complete for c in calls):
                continue
            recorded.append(view)
            out = {}
            for name in view.names:

                def compute(name=name, block=block, calls=calls):
                    return block.compute_statistic(
                        name, calls, lambda tap=OUTPUT, calls=calls: self._output_grads(calls, tap)
                    )

                out[name] = compute
            self.thunks[view.index] = out
        # Every recorded block's decision at once (one vectorised pass where the policy has one).
        for view, due in zip(recorded, policy.statistics_due_together(recorded, self.step)):
            self.due[view.index] = due
        self._sampled_grads = self._sampled_backward_pass() if self.record.sampled_loss is not None else None

    def _sampled_backward_pass(self):
        """``{(id(call), tap): gradient}`` of the sampled loss, one backward pass where any is needed.

        With the Monte-Carlo Fisher every due statistic that needs output
        gradients (:meth:`~keras_hoopt.blocks.CurvatureBlock.needs_output_grads`,
        and every statistic of a block with running state) takes them from
        this one pass, run in a ``tf.cond`` on any of them being due: one
        backward sweep from the sampled loss instead of one per statistic (each
        of which went down to its own layer, quadratic in the depth). A tap the
        sampled loss does not reach gets zeros.
        """
        opt = self.optimizer
        keys, outputs, flags = [], [], []
        for view in self.views:
            b = view.index
            if b not in self.thunks:
                continue
            calls = self.record.calls[id(view.block.layer)]
            for call in calls:
                for tap in sorted(call.outputs):
                    keys.append((id(call), tap))
                    outputs.append(call.outputs[tap])
            running = bool(opt._running.get(b))
            flags += [self.due[b][n] for n in view.names if running or view.block.needs_output_grads(n)]
        needed = any_flag(flags)
        if not keys or needed is False:
            return {}

        def backward():
            grads = self.record.sampled_tape.gradient(self.record.sampled_loss, outputs)
            return [tf.zeros_like(o) if g is None else tf.convert_to_tensor(g) for g, o in zip(grads, outputs)]

        grads = backward() if needed is True else tf.cond(
            needed, backward, lambda: [tf.zeros_like(o) for o in outputs]
        )
        return dict(zip(keys, grads))

    def reduce(self):
        """Reduce the gradients and average the due statistics over workers.

        With one worker nothing is communicated and the statistic thunks stay
        lazy. With several, gradients and statistics travel in one fused
        all-reduce (statistics that are not due are sent as zeros: the decision
        is the same on every worker, but a collective's inputs must be), or,
        where the backend allows collectives inside ``tf.cond``, in two: the
        gradients every step, the statistics only in steps where one is due.
        Statistics come back as thunks of their reduced value.
        """
        comm = self.communicator
        order = sorted(self.by_index)
        self.order = order
        if comm.num_workers == 1:
            return
        # Sparse (IndexedSlices) gradients of embeddings go dense: the fused all-reduce needs the
        # same shape on every worker, and a slice's row count can differ between them.
        grads = [_dense(self.by_index[i]) for i in order]
        thunks, due = self.thunks, self.due
        keys = [(p, n) for p in sorted(thunks) for n in sorted(thunks[p])]
        blocks = self.optimizer._attachment.blocks
        shapes = [tf.TensorShape(blocks[p][0].statistic_shapes()[n]) for p, n in keys]
        op = comm.gradient_reduction
        scale = self._mean_scale()  # statistics are averaged

        def local_statistics():
            return [
                _where_due(thunks[p][n], due[p][n], lambda shape=shape: tf.zeros(shape)) * scale
                for (p, n), shape in zip(keys, shapes)
            ]

        dense = [i for i, g in enumerate(grads) if g is not None]
        flags = [due[p][n] for p, n in keys]
        any_due = any_flag(flags)
        if comm.conditional_collectives and any_due is not True:
            reduced = comm.all_reduce([grads[i] for i in dense], op, what="gradients")
            statistics = comm.all_reduce(
                local_statistics, op, when=any_due, what="statistics", shapes=shapes
            ) if keys else []
        else:
            both = comm.all_reduce(
                [grads[i] for i in dense] + local_statistics(), op, what="gradients+statistics"
            )
            reduced, statistics = both[: len(dense)], both[len(dense):]
        grads = list(grads)
        for i, value in zip(dense, reduced):
            grads[i] = value
        self.by_index = dict(zip(order, grads))
        self.thunks = {p: {} for p in thunks}
        for (p, n), value in zip(keys, statistics):
            self.thunks[p][n] = lambda value=value: value

    def fold(self):
        """``self.old``/``self.new``/``self.refreshed``/``self.counters``/``self.measured`` per block and statistic.

        ``self.measured[b][name]``: the refresh policy's measurement of the
        refreshed statistic (zeros where it was not refreshed).
        """
        opt = self.optimizer
        policy = opt.refresh_policy
        size = policy.measurement_size
        self.old, self.new, self.refreshed, self.counters, self.measured = {}, {}, {}, {}, {}
        nothing_measured = tf.zeros([size], tf.float32)  # of a block not recorded this step
        for view, (_, _, slots) in self.blocks:
            b = view.index
            old, new, refreshed, counters, measured = {}, {}, {}, {}, {}
            for name, slot in slots:
                old[name] = tf.convert_to_tensor(opt._statistics[slot])
                new[name], counters[name], refreshed[name] = old[name], view.counters[name], tf.constant(False)
                measured[name] = nothing_measured
                if b in self.thunks:

                    def measure(value, view=view, name=name, before=old[name]):
                        return policy.measure_refresh(view, name, before, value)

                    new[name], counters[name], refreshed[name], measured[name] = fold_statistic(
                        old[name], view.counters[name], self.thunks[b][name], self.due[b][name], self.step,
                        opt.factor_decay, measure if size else None, size,
                    )
                    self.assignments.append((opt._statistics[slot], new[name], refreshed[name]))
            self.old[b], self.new[b], self.refreshed[b], self.counters[b] = old, new, refreshed, counters
            self.measured[b] = measured

    def decide(self):
        """``self.preconditioners_due[b]``: the policy's decision, one boolean or ``{name: boolean}``."""
        policy = self.optimizer.refresh_policy
        views = [view for view, _ in self.blocks]
        dues, writes = policy.after_refresh_together(
            views, self.old, self.new, self.refreshed, self.step, self.damping, self.measured
        )
        self.assignments.extend(as_write(a) for a in writes)
        self.preconditioners_due = {view.index: due for view, due in zip(views, dues)}

    def refresh_preconditioners(self):
        """Recompute each block's preconditioner state where due (or not validly held here).

        ``self.state[b][name]`` is ``{part: tensor}`` (the block's layout,
        :meth:`~keras_hoopt.blocks.CurvatureBlock.preconditioner_layout`),
        ``self.run[b][name]`` whether it was recomputed (by its owner) and
        ``self.ok[b][name]`` whether that succeeded (meaningful where computed
        here); a failed factorisation keeps the last good state.
        """
        opt, placement = self.optimizer, self.placement
        self.state, self.ok, self.run = {}, {}, {}
        for view, (block, _, slots) in self.blocks:
            b = view.index
            names = [n for n, _ in slots]
            due = self.preconditioners_due[b]
            due = due if isinstance(due, dict) else {n: due for n in names}
            force = placement.must_recompute(b)
            counters = self.counters[b]
            ever = tf.reduce_all([counters[n][REFRESHES] > 0 for n in names])
            state, ok, run = {}, {}, {}
            for name, slot in slots:
                old = {part: tf.convert_to_tensor(v) for part, v in opt._preconditioners[slot].items()}
                wanted = due[name] if force is False or due[name] is True else tf.logical_or(due[name], force)
                run[name] = ever if wanted is True else tf.logical_and(wanted, ever)
                if not placement.computes(b):
                    state[name], ok[name] = old, tf.constant(True)
                    continue

                def compute(name=name, old=old, block=block):
                    new, success = block.compute_preconditioner(name, self.new[b], self.damping, opt._split_dim)
                    return {part: tf.where(success, new[part], old[part]) for part in old}, success

                state[name], ok[name] = tf.cond(run[name], compute, lambda old=old: (old, tf.constant(True)))
            self.state[b], self.ok[b], self.run[b] = state, ok, run

    def share(self):
        """``"inverses"`` mode: every worker gets the preconditioners its owners recomputed; then the writes."""
        placement, opt = self.placement, self.optimizer
        if placement.mode == "inverses":
            self.state, self.ok = placement.share_preconditioners(self.run, self.state, self.ok)
        for view, (_, _, slots) in self.blocks:
            b = view.index
            for name, slot in slots:
                # Same structure on every replica (merge_call): a non-holder's write is a no-op.
                when = self.run[b][name] if placement.holds(b) else tf.constant(False)
                for part, variable in opt._preconditioners[slot].items():
                    self.assignments.append((variable, self.state[b][name][part], when))

    def running_state(self):
        """Fold each block's running state (:meth:`~keras_hoopt.blocks.CurvatureBlock.running_layout`).

        Where any of the block's statistics is due this step, its batch value
        (computed in the preconditioner state just refreshed or shared, and
        averaged over workers) is folded with ``factor_decay``; ``rebased``
        says that the block's preconditioner state was recomputed this step.
        The folded state joins ``self.state[b]["running"]`` (with the step's
        damping) for :meth:`precondition`.
        """
        opt = self.optimizer
        comm = self.communicator
        for view, (block, _, slots) in self.blocks:
            b = view.index
            variables = opt._running.get(b)
            if not variables:
                continue
            old = {part: tf.convert_to_tensor(v) for part, v in variables.items()}
            state = self.state[b]
            rebased = any_flag([tf.logical_and(self.run[b][n], self.ok[b][n]) for n, _ in slots])
            rebased = tf.constant(rebased) if isinstance(rebased, bool) else rebased
            calls = self.record.calls.get(id(block.layer)) if self.record is not None else None
            due = any_flag(list(self.due[b].values())) if b in self.due else False
            batch = None
            if due is not False:

                def local(calls=calls, block=block, state=state):
                    return block.running_batch_value(
                        calls, lambda tap=OUTPUT, calls=calls: self._output_grads(calls, tap), state
                    )

                batch = local
                if comm.num_workers > 1:
                    batch = self._averaged_over_workers(local, due, {p: v.shape for p, v in variables.items()})
            new = block.fold_running(old, batch, due, rebased, state, opt.factor_decay)
            when = tf.logical_or(rebased, due) if due is not True else None
            for part, variable in variables.items():
                self.assignments.append((variable, new[part], when))
            self.state[b] = {**state, "running": {**new, "damping": self.damping}}

    def _mean_scale(self):
        """What each worker's term is multiplied by so that the reduction is the workers' mean."""
        comm = self.communicator
        return 1.0 / comm.num_workers if comm.gradient_reduction == "sum" else 1.0

    def _averaged_over_workers(self, local, due, shapes):
        """A thunk of the worker average of ``local()`` (a ``{part: tensor}``), communicated where ``due``."""
        comm = self.communicator
        parts = sorted(shapes)
        scale = self._mean_scale()

        def values():
            out = _where_due(local, due, lambda: {p: tf.zeros(shapes[p]) for p in parts})
            return [out[p] * scale for p in parts]

        reduced = comm.all_reduce(
            values, comm.gradient_reduction, when=due, what="running state",
            shapes=[tf.TensorShape(shapes[p]) for p in parts],
        )
        return lambda: dict(zip(parts, reduced))

    def precondition(self):
        """``self.preconditioned`` (by variable index) and ``self.vg_sum = sum_l <p_l, grad_l>``; counters."""
        placement, opt = self.placement, self.optimizer
        preconditioned, vg = {}, {}
        for view, (block, indices, _) in self.blocks:
            b = view.index
            if all(i in self.by_index for i in indices) and placement.preconditions(b):
                block_grads = [self.by_index[i] for i in indices]
                updates = block.apply_preconditioner(block_grads, self.state[b])
                preconditioned[b] = dict(zip(indices, updates))
                vg[b] = tf.add_n([tf.reduce_sum(u * tf.cast(g, tf.float32)) for g, u in zip(block_grads, updates)])
        if placement.mode == "gradients":
            att_blocks = [(block, indices, [n for n, _ in slots]) for _, (block, indices, slots) in self.blocks]
            preconditioned, vg, self.ok, self.run = placement.share_preconditioned(
                self.run, preconditioned, vg, self.ok, att_blocks, self.by_index
            )
        self.vg_sum = tf.add_n(list(vg.values())) if vg else tf.constant(0.0, tf.float32)
        self.preconditioned = {i: u for updates in preconditioned.values() for i, u in updates.items()}
        # Counters (identical on every worker: `ok` was shared with the preconditioners).
        local = [tf.zeros([], tf.int64)] * len(opt._statistics)  # inversions run here, per slot
        for view, (_, _, slots) in self.blocks:
            b = view.index
            for name, slot in slots:
                counters = count_inversions(self.counters[b][name], self.run[b][name], self.ok[b][name])
                self.assignments.append((opt._counters[slot], counters, None))
                if placement.computes(b):
                    local[slot] = tf.cast(self.run[b][name], tf.int64)
        placement.local_inversions.assign_add(tf.stack(local) if local else tf.zeros([0], tf.int64))
        self.assignments.extend(placement.assignments())

    def step_size(self):
        """``self.step_lr``/``self.step_momentum``: what the preconditioned variables apply this step.

        ``step_size="fixed"``: the learning rate and the (subclass's) momentum.
        ``"quadratic_model"``: ``learning_rate * (alpha, mu)``, the minimiser
        of the damped quadratic model in the span of ``-p`` and the velocity
        (the previous update), the curvature products averaged over workers;
        the given ones without a record; where the model cannot be solved, 0 and 0
        (the preconditioned variables stay). Then, every ``damping_control_interval`` steps with
        ``damping_control="lm"``, ``rho`` on this batch and the next lambda
        (:meth:`_levenberg_marquardt`).
        """
        opt = self.optimizer
        self.given_momentum, momentum_writes = opt._momentum_coefficient(self.lr)
        self.assignments += [as_write(a) for a in momentum_writes]
        self.step_momentum = self.given_momentum
        self.step_lr = self.lr
        if opt.step_size == "quadratic_model" and self.preconditioned and self.record is not None:
            self._quadratic_model_step()
        self.assignments.append((opt._step_coefficients, tf.stack([self.step_lr, self.step_momentum]), None))

    def _quadratic_model_step(self):
        opt = self.optimizer
        indices = sorted(self.preconditioned)
        variables = [opt._trainable_variables[i] for i in indices]
        # The model's directions are u_1 = -p and u_2 = v (the velocity), given as d = (p, v) with
        # signs s = (-1, 1): the curvature products carry the sign in the differences' step, the
        # Gram matrix and b take it on their 2 x 2 and 2 entries, so no pass over the weights
        # negates p. g . p is the precondition stage's vg_sum; |p| and |v| the Gram diagonal's.
        directions = [[tf.cast(self.preconditioned[i], tf.float32) for i in indices]]
        with_momentum = opt.momentum > 0
        if with_momentum:
            directions.append([tf.cast(tf.convert_to_tensor(opt._momentums[i]), tf.float32) for i in indices])
        direction_signs = [-1.0, 1.0][: len(directions)]
        signs = tf.constant(direction_signs)
        unsigned_gram = quadratic_model.gram_matrix(directions)
        model = quadratic_model.QuadraticModel(
            opt._attachment.session, self.record, variables, opt._loss_identity, opt.quadratic_model_batch_fraction,
            opt.quadratic_model_products, direction_signs=direction_signs,
            direction_norms=tf.unstack(tf.sqrt(tf.linalg.diag_part(unsigned_gram))),
        )
        try:
            undamped, velocity_seen = self._curvature_products(model, directions, unsigned_gram)
        except quadratic_model.ProductsUnavailable as error:
            if opt._requested_step_control["step_size"] != "auto":
                raise
            # The model's call cannot be re-run statelessly or traced by forward mode (an op without
            # a gradient, a while loop over TensorLists): "auto" falls back to the fixed step, for good.
            self.lr = opt._fall_back_to_fixed_step(error.cause, self.lr)
            self.step_lr = self.lr
            return
        gram = unsigned_gram * (signs[:, None] * signs[None, :])
        b = [self.vg_sum]
        if with_momentum:
            grads = [tf.cast(_dense(self.by_index[i]), tf.float32) for i in indices]
            b.append(quadratic_model.gradient_components(grads, directions[1:])[0])
        b = signs * tf.stack(b)
        if with_momentum and velocity_seen is not None:
            # No curvature along the velocity measured yet: the 1-D solve (mu = 0), not a model that
            # sees only the damping along it (which asks for the largest momentum).
            kept = tf.stack([1.0, tf.cast(velocity_seen, tf.float32)])
            pairs = kept[:, None] * kept[None, :]
            undamped, gram, b = undamped * pairs, gram * pairs, b * kept
        if not with_momentum:  # no velocity: a zero second direction, so the 1-D solve (mu = 0)
            undamped, gram, b = tf.pad(undamped, [[0, 1], [0, 1]]), tf.pad(gram, [[0, 1], [0, 1]]), tf.pad(b, [[0, 1]])
        c, ok = quadratic_model.minimise_in_span(b, undamped + self.damping * gram)
        chosen = self.lr * c
        if opt.kl_clip is not None:  # the exact-Fisher KL of the step: delta^T C delta <= kl_clip
            length = tf.tensordot(chosen, tf.linalg.matvec(undamped, chosen), 1)
            nu = tf.where(length > 0.0, tf.minimum(1.0, tf.sqrt(opt.kl_clip / tf.maximum(length, 1e-30))), 1.0)
            nu = tf.where(ok, nu, 1.0)
            chosen = chosen * nu
            self.assignments.append((opt._kl_clip_coefficient, nu, None))
        # A model that cannot be solved (NaN/Inf in a curvature product) moves no preconditioned
        # variable: lr and momentum 0 (the velocity restarts), counted in quadratic_model_failures.
        self.step_lr = tf.where(ok, chosen[0], 0.0)
        self.step_momentum = tf.where(ok, chosen[1], 0.0) if with_momentum else self.step_momentum
        failures = opt._quadratic_model_failures
        self.assignments.append((failures, failures + tf.cast(tf.logical_not(ok), tf.int64), None))
        if opt.damping_control == "lm":
            coefficients = tf.stack([self.step_lr, self.step_momentum if with_momentum else 0.0])
            self._levenberg_marquardt(model, directions, coefficients, b, undamped, ok, signs)

    def _curvature_products(self, model, directions, unsigned_gram):
        """``([k, k], velocity_seen)``: ``u_i^T C u_j`` of the model's directions, averaged over workers,
        and whether the curvature along the last direction (the velocity) is known (None: always).

        With ``quadratic_model_interval=n > 1`` they are measured every ``n``-th step only (the
        curvature products' forward passes run in a ``tf.cond``); in between they are the last
        measurement per unit length times this step's lengths, ``R_ij |u_i| |u_j|`` with
        ``R_ij = u_i^T C u_j / (|u_i| |u_j|)`` as last measured, so the step still follows this
        step's gradient (``b``) and lengths; only the curvature along the directions is stale.
        """
        opt = self.optimizer
        interval = opt.quadratic_model_interval
        if interval == 1:
            return self.communicator.all_reduce(
                [model.curvature_matrix(directions)], "mean", what="curvature products"
            )[0], None
        k = len(directions)
        measured_now = tf.logical_or(
            self.step < quadratic_model.MEASURED_FIRST_STEPS, tf.equal(self.step % interval, 0)
        )
        (measured,) = self.communicator.all_reduce(
            lambda: [model.curvature_matrix(directions)], "mean", when=measured_now, what="curvature products",
            shapes=[[k, k]],
        )
        stored = tf.convert_to_tensor(opt._unit_curvature)[:k, :k]
        curvature, per_unit, keep, velocity_seen = quadratic_model.between_measurements(
            measured, measured_now, stored, tf.sqrt(tf.linalg.diag_part(unsigned_gram))
        )
        self.assignments.append((opt._unit_curvature, tf.pad(per_unit, [[0, 2 - k], [0, 2 - k]]), keep))
        return curvature, velocity_seen

    def _levenberg_marquardt(self, model, directions, coefficients, b, undamped, ok, signs):
        """Every ``damping_control_interval`` steps: ``rho`` of this step on its batch, and the next lambda.

        ``coefficients`` are those of the model's directions ``s_k d_k`` (``directions``: the ``d_k``).
        """
        opt = self.optimizer
        if self.record.data is None and opt._requested_step_control["damping_control"] == "auto":
            return  # a custom training loop: no batch to re-evaluate the loss on, lambda stays
        due = tf.logical_and(ok, tf.equal((self.step + 1) % opt.damping_control_interval, 0))

        def losses_before_and_after():
            # The step's change, built here so that it is computed only in the steps that measure rho.
            signed = tf.unstack(coefficients[: len(directions)] * signs, num=len(directions))
            delta = [
                tf.add_n([signed[k] * d[j] for k, d in enumerate(directions)]) for j in range(len(directions[0]))
            ]
            return [model.losses(opt._attachment.model, delta)]

        losses = self.communicator.all_reduce(
            losses_before_and_after, "mean", when=due, what="lm losses", shapes=[[2]]
        )[0]
        rho = quadratic_model.reduction_ratio(losses[0], losses[1], quadratic_model.model_change(coefficients, b, undamped))
        next_damping = quadratic_model.adapted_damping(self.damping, rho, opt.damping_control_interval, opt.min_damping)
        self.assignments.append((opt._reduction_ratio, rho, due))
        self.assignments.append((opt._adapted_damping, next_damping, due))

    def clip(self):
        opt = self.optimizer
        if opt.step_size == "fixed" and opt.kl_clip is not None and self.preconditioned:
            nu = kl_clip_coefficient(self.vg_sum, self.lr, opt.kl_clip)
            self.preconditioned = {i: u * nu for i, u in self.preconditioned.items()}
            self.assignments.append((opt._kl_clip_coefficient, nu, None))

    def apply(self):
        opt, att = self.optimizer, self.optimizer._attachment
        var_updates = []
        for i in self.order:
            variable = opt._trainable_variables[i]
            update = self.preconditioned.get(i, self.by_index[i])
            decayed = opt.weight_decay is not None and opt._use_weight_decay(variable)
            var_updates.append((variable.value, tf.cast(update, variable.dtype), decayed, i in self.preconditioned))
        momentum = self.step_momentum
        # The applied change is lr * update (and mu * velocity): a learning rate or momentum that
        # is not finite (a schedule gone to inf) skips the step as well.
        step_ok = linalg.all_finite_together(
            [u for _, u, _, _ in var_updates] + [self.lr, self.step_lr, self.given_momentum, momentum]
        )
        restores = [
            (variable.value, before)
            for view in self.views
            if self.record is not None
            for variable, before in view.block.forward_state_before(self.record.calls.get(id(view.block.layer)))
        ]
        if not self.thunks and att.blocks:
            opt._warn_no_records()
        assignments = [(getattr(v, "value", v), value, when) for v, value, when in (as_write(a) for a in self.assignments)]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_apply, opt._distribution_strategy, assignments, var_updates, restores,
            (self.learning_rate, self.step_lr), (self.given_momentum, momentum), step_ok,
        )

    # ---------------------------------------------------------------- helpers
    def _output_grads(self, calls, tap=OUTPUT):
        """Per-example gradients ``g`` (float32) of tap ``tap`` of one block's calls."""
        opt = self.optimizer
        if self.record.sampled_loss is not None:  # fisher="mc", or "auto" resolved to it
            return [tf.cast(self._sampled_grads[(id(c), tap)], tf.float32) for c in calls]
        scale = float(self.replicas) / opt._loss_scale()
        return [
            tf.cast(c.output_grads[tap], tf.float32) * tf.cast(tf.shape(c.inputs)[0], tf.float32) * scale
            for c in calls
        ]

    def _distributed_apply(self, distribution, assignments, var_updates, restores, learning_rates, momenta, step_ok):
        """``learning_rates``/``momenta``: ``(for the other variables, for the preconditioned ones)``."""
        opt = self.optimizer
        strategy = tf.distribute.has_strategy()
        if strategy:  # mirrored variables: every write through the strategy
            for variable, value, when in assignments:
                distribution.extended.update(variable, write, args=(value, when, step_ok), group=False)
        else:
            write_grouped(assignments, step_ok)
        distribution.extended.update(opt._skipped_steps.value, _count_skip, args=(step_ok,), group=False)
        for variable, before in restores:  # layer state the skipped step's forward pass wrote
            distribution.extended.update(variable, _restore_if_skipped, args=(before, step_ok), group=False)

        def arguments(update, decayed, preconditioned):  # of _variable_update, after the variable
            return update, learning_rates[preconditioned], momenta[preconditioned], decayed, learning_rates[0]

        if strategy:  # each variable's update in its own cond, through the strategy
            for variable, *update in var_updates:
                # step_ok (like the update) is per replica here: it goes in args, unwrapped per device.
                distribution.extended.update(
                    variable, lambda v, ok, *args: _when(ok, lambda: self._variable_update(v, *args)),
                    args=(step_ok, *arguments(*update)), group=False,
                )
        else:  # every variable's update in one cond: a skipped step touches no weight
            _when(step_ok, lambda: [self._variable_update(variable, *arguments(*u)) for variable, *u in var_updates])

    def _variable_update(self, variable, update, learning_rate, momentum, decayed, given_lr):
        """Momentum SGD on ``update`` (after Keras's decoupled weight decay), in place.

        Runs only in a finite step (the caller's ``tf.cond``). ``learning_rate``/
        ``momentum``: this variable's (chosen by the quadratic model for a
        preconditioned one); ``given_lr``: the optimizer's, which the weight
        decay and the fallback use. The momentum update is TensorFlow's fused
        kernel (``v <- mu v - lr u``, then ``w <- w + v``, or ``w <- w + mu v - lr u``
        with Nesterov): one pass over the weights instead of one per
        element-wise op.

        A variable no block preconditions takes the ``fallback`` update instead
        (:func:`adam_fallback_update` for ``"adam"``).
        """
        opt = self.optimizer
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        given = tf.cast(given_lr, dtype)
        index = opt._get_variable_index(variable)
        if decayed:
            variable.assign_sub(tf.convert_to_tensor(variable) * tf.cast(opt.weight_decay, dtype) * given)
        if index in opt._fallback_moments:
            first, second = opt._fallback_moments[index]
            step = tf.cast(opt.iterations + 1, dtype)
            change, new_first, new_second = adam_fallback_update(
                update, tf.convert_to_tensor(first), tf.convert_to_tensor(second), given * opt.fallback_lr_ratio, step
            )
            opt.assign(first, new_first)
            opt.assign(second, new_second)
            variable.assign_sub(change)
        elif opt.momentum > 0:
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=variable.handle, accum=_handle(opt._momentums[index]), lr=lr, grad=update,
                momentum=tf.cast(momentum, dtype), use_nesterov=opt.nesterov,
            )
        else:
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=update)
        cap = opt._norm_caps.get(index)
        if cap is not None:
            weights = tf.convert_to_tensor(variable)
            variable.assign(weights * tf.minimum(1.0, cap / tf.maximum(tf.norm(weights), 1e-30)))


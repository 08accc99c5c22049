"""Shared machinery of the curvature (natural-gradient) optimizers.

:class:`CurvatureOptimizer` is a ``keras.optimizers.Optimizer`` that

1. attaches to its model (at ``model.compile`` or via ``model=``) and installs
   capture of layer inputs and output gradients (:mod:`keras_hoopt.capture`);
2. in ``build`` maps the trainable variables to curvature blocks
   (:mod:`keras_hoopt.blocks`) and creates every state variable (statistics,
   inverses, counters, momenta) in a fixed order, so ``.keras`` files and
   checkpoints restore it;
3. in each update step (replica context): computes this batch's statistics
   for the blocks whose statistics are due, all-reduces them together with the
   gradients (:mod:`keras_hoopt.communication`), folds them into moving
   averages, recomputes the inverses that are due (with several workers, each
   worker only those of the layers it owns, then shares them or the
   preconditioned gradients: :mod:`keras_hoopt.communication.placement`),
   preconditions, KL-clips, and applies momentum SGD; all writes go through
   one ``merge_call`` so ``tf.distribute`` replicas stay identical.

Subclasses choose the refresh policy (:mod:`keras_hoopt.refresh`).
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_hoopt import _compile_hook, _keras_compat, linalg
from keras_hoopt.blocks import block_type_for
from keras_hoopt.communication import CHOICES as COMMUNICATION_CHOICES
from keras_hoopt.communication import make_communicator
from keras_hoopt.communication.placement import (
    MODEL_PARALLEL_MODES,
    assign_owners,
    inversion_cost,
    resolve_mode,
)
from keras_hoopt.capture import CaptureSession, replica_id
from keras_hoopt.fisher import FISHER_TYPES, make_output_sampler
from keras_hoopt.optimizers._validation import (
    check,
    check_keras_arguments,
    check_learning_rate,
    check_momentum,
    check_on_nonfinite,
    check_one_model,
    damping_config,
    damping_value,
    is_number,
)
from keras_hoopt.refresh import BlockView

# Layout of each statistic's int64 counter vector.
REFRESHES, LAST_REFRESH, INVERSIONS, NONFINITE_SKIPS, FAILED_INVERSIONS = range(5)
_NUM_COUNTERS = 5


def _count_skip(counter, step_ok):
    counter.assign_add(tf.cast(tf.logical_not(step_ok), tf.int64))


def _restore_if_skipped(variable, before, step_ok):
    variable.assign(tf.where(step_ok, variable, tf.cast(before, variable.dtype)))


def _identity_initializer(shape, dtype=None):
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or "float32")


def _as_write(assignment):
    """``(variable, value)`` or ``(variable, value, when)`` -> the 3-tuple."""
    return tuple(assignment) if len(assignment) == 3 else (*assignment, None)


def _write(variable, value, when, step_ok):
    """``variable.assign(value)``, only where ``when`` holds (always if None) and the step is finite.

    An unconditional write of a skipped step keeps the old value by a select
    (these are small: counters, intervals); a conditional one folds
    ``step_ok`` into its condition.
    """
    if when is None or when is True:
        variable.assign(tf.where(step_ok, value, variable))
        return
    when = tf.logical_and(when, step_ok)

    def assign():
        variable.assign(value)
        return tf.constant(True)

    tf.cond(when, assign, lambda: tf.constant(False))


class _Attachment:
    """Plain (untracked) holder of the model, capture session and blocks."""

    def __init__(self):
        self.model = None
        self.loss = None
        self.session = None
        self.loss_scaler = None
        self.blocks = []  # list of (block, [variable index], statistic names)
        self.warned_uncovered = False
        self.warned_no_records = False
        self.communicator = None
        self.mode = "off"  # effective model-parallel mode
        self.owners = []  # worker index owning each block's inversion
        self.local_inversions = None  # per-worker count of inversions run here
        self.bytes_sent = None  # per-worker payload bytes of the collectives that ran


class CurvatureOptimizer(keras.optimizers.Optimizer):
    """Base class: momentum SGD on Fisher-preconditioned gradients.

    Args:
        learning_rate: float or ``keras.optimizers.schedules.LearningRateSchedule``.
        damping: Tikhonov damping ``lambda`` (> 0), float or a schedule of the
            step (any ``LearningRateSchedule``).
        momentum: momentum ``mu`` in ``[0, 1)`` applied to the preconditioned
            gradient: ``v <- mu v - lr * p``, ``w <- w + v``.
        nesterov: Nesterov momentum.
        factor_decay: moving-average decay of the statistics in ``[0, 1)``:
            ``F <- decay * F + (1 - decay) * F_batch`` (0: this batch only; the
            first refresh takes the batch value).
        kl_clip: KL-clipping constant ``c > 0`` (Ba et al. 2017) or ``None``:
            preconditioned gradients are scaled by
            ``min(1, sqrt(c / (lr^2 * sum_l <p_l, grad_l>)))``.
        fisher: ``"empirical"`` (training labels) or ``"mc"`` (one label per
            example sampled from the model's predictive distribution).
        seed: integer seed of the Monte-Carlo label sampler.
        model: the model to precondition; optional when the optimizer is passed
            to ``model.compile`` (it attaches itself then).
        communication: how workers exchange gradients and curvature:
            ``"auto"`` (a ``tf.distribute`` strategy with several replicas, or
            Horovod initialised with several processes, or nothing),
            ``"tf.distribute"``, ``"horovod"`` or ``"none"``
            (:mod:`keras_hoopt.communication`).
        model_parallel: with several workers, who inverts what:
            ``"off"`` (every worker inverts every layer), ``"inverses"``
            (each worker inverts its share of the layers and the inverses are
            all-gathered: every worker holds all of them; KAISA's
            communication-optimal end), ``"gradients"`` (each worker inverts
            and preconditions its share and the preconditioned gradients are
            all-gathered; inverses live only on their owner; SP-NGD's hybrid
            scheme, KAISA's memory-optimal end) or ``"auto"`` (``"inverses"``
            with Horovod, ``"gradients"`` with ``tf.distribute``;
            docs/distributed.md).
        on_nonfinite: what a step whose gradients or preconditioned update
            hold NaN/Inf does. It never applies anything: weights, momenta,
            statistics, inverses and counters keep their last good values
            (one fused finiteness check, the same decision on every worker),
            and ``skipped_steps`` counts it. ``"skip"`` (default) logs a
            rate-limited warning and trains on; ``"raise"`` raises
            ``FloatingPointError`` after the step (in ``fit`` /
            ``train_on_batch``), with the model still at its last good state.
        **kwargs: ``keras.optimizers.Optimizer`` arguments (``weight_decay``,
            ``clipnorm``, ``global_clipnorm``, ``loss_scale_factor``, ...).
    """

    def __init__(
        self,
        learning_rate=0.01,
        damping=1e-3,
        momentum=0.9,
        nesterov=False,
        factor_decay=0.95,
        kl_clip=1e-3,
        fisher="empirical",
        seed=None,
        model=None,
        communication="auto",
        model_parallel="auto",
        on_nonfinite="skip",
        name="curvature_optimizer",
        **kwargs,
    ):
        check_learning_rate(learning_rate)
        check_keras_arguments(kwargs)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        damping = damping_value(damping)
        check_momentum(momentum, nesterov)
        check("factor_decay", factor_decay, is_number(factor_decay) and 0 <= factor_decay < 1, "a float in [0, 1)")
        check("kl_clip", kl_clip, kl_clip is None or (is_number(kl_clip) and kl_clip > 0), "None or a finite float > 0")
        check("fisher", fisher, fisher in FISHER_TYPES, " or ".join(repr(f) for f in FISHER_TYPES))
        check("seed", seed, seed is None or isinstance(seed, (int, np.integer)), "None or an int")
        check("communication", communication, communication in COMMUNICATION_CHOICES,
              " or ".join(repr(c) for c in COMMUNICATION_CHOICES))
        check("model_parallel", model_parallel, model_parallel in MODEL_PARALLEL_MODES,
              " or ".join(repr(m) for m in MODEL_PARALLEL_MODES))
        check_on_nonfinite(on_nonfinite)
        self.communication = communication
        self.model_parallel = model_parallel
        self.on_nonfinite = on_nonfinite
        self.damping = damping if callable(damping) else float(damping)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.factor_decay = float(factor_decay)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.fisher = fisher
        self.seed = None if seed is None else int(seed)
        self._sampler_seed = int(np.random.randint(0, 2**30)) if seed is None else int(seed)
        self._attachment = _Attachment()
        self._split_dim = None  # THOR: invert factors as diagonal blocks of this size
        self._norm_caps = {}  # variable index -> norm cap (SP-NGD weight rescaling)
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------ model
    @property
    def refresh_policy(self):
        """The :class:`~keras_hoopt.refresh.RefreshPolicy` of this optimizer."""
        raise NotImplementedError

    def attach(self, model, loss=None):
        """Precondition ``model``'s layers (done automatically by ``model.compile``)."""
        self._attach(model, loss, None)

    def _attach_from_compile(self, model, loss, loss_scaler):
        self._attach(model, loss, loss_scaler)
        if self._make_communicator().turns_off_jit and getattr(model, "jit_compile", False):
            # Horovod's collectives have no XLA lowering (docs/distributed.md).
            warnings.warn(
                f"{type(self).__name__}: communication={self.communication!r} runs Horovod "
                "collectives, which XLA cannot compile; the model's jit_compile is turned off.",
                stacklevel=3,
            )
            model.jit_compile = False
        # Without a tf.distribute strategy Keras builds the optimizer inside
        # the first trace of the train step; creating variables there makes
        # tf.function trace the whole step a second time (seconds for a
        # curvature optimizer). Building now, when the model already has its
        # weights, saves that second trace.
        outer = loss_scaler if loss_scaler is not None else self
        if (
            not outer.built
            and getattr(model, "_distribute_strategy", None) is None
            and model.built
            and all(layer.built for layer in model._flatten_layers())
            and model.trainable_variables
        ):
            outer.build(model.trainable_variables)

    def _attach(self, model, loss, loss_scaler):
        att = self._attachment
        check_one_model(self, att.model, model)
        if loss is None and att.model is model:
            loss = att.loss
        sampler = None
        if self.fisher == "mc" and loss is not None:
            sampler = make_output_sampler(loss)  # raises for unsupported losses
        if att.session is not None:
            att.session.uninstall()
        block_types = {}
        for layer in model._flatten_layers(include_self=False, recursive=True):
            block_type = block_type_for(layer)
            if block_type is not None:
                block_types[id(layer)] = block_type
        att.model, att.loss, att.loss_scaler = model, loss, loss_scaler
        att.session = CaptureSession(model, block_types, sampler, self._sample_seed)
        att.session.install()

    def _strategy(self):
        return getattr(self, "_distribution_strategy", None) or tf.distribute.get_strategy()

    def _make_communicator(self):
        return make_communicator(self.communication, self._strategy())

    def _sample_seed(self):
        step = tf.cast(tf.convert_to_tensor(self.iterations), tf.int32)
        return tf.stack([tf.constant(self._sampler_seed, tf.int32) + 7919 * replica_id(), step])

    # ------------------------------------------------------------------ build
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        att = self._attachment
        if att.model is None:
            raise ValueError(
                f"{type(self).__name__} needs its model: pass it to "
                f"`model.compile(optimizer=...)` or construct it with `model=model`."
            )
        if self.fisher == "mc" and att.session.output_sampler is None:
            raise ValueError(
                "fisher='mc' needs the model's loss to sample labels: compile the "
                "model with this optimizer (model.compile(optimizer=..., loss=...))."
            )
        index_of = {self._var_key(v): i for i, v in enumerate(var_list)}
        candidates = []
        for layer in att.model._flatten_layers(include_self=False, recursive=True):
            block_type = att.session.block_types.get(id(layer))
            if block_type is None:
                continue
            block = block_type(layer)
            keys = [self._var_key(v) for v in block.variables]
            if block.variables and all(k in index_of for k in keys):
                candidates.append((min(index_of[k] for k in keys), block, [index_of[k] for k in keys]))
        candidates.sort(key=lambda c: c[0])
        self._statistics, self._inverses, self._counters = [], [], []
        att.blocks = []
        for _, block, indices in candidates:
            names = list(block.statistic_shapes())
            for name, shape in block.statistic_shapes().items():
                label = f"{block.name}_{name}"
                self._statistics.append(self.add_variable(shape, _identity_initializer, "float32", name=label))
                self._inverses.append(self.add_variable(shape, _identity_initializer, "float32", name=f"{label}_inverse"))
                self._counters.append(self.add_variable((_NUM_COUNTERS,), "zeros", "int64", name=f"{label}_counters"))
            att.blocks.append((block, indices, names))
        self.refresh_policy.build(self, self._views(counters=None))
        self._build_placement()
        # The KL-clip coefficient nu of the last step (1: not clipped), for monitoring.
        self._kl_clip_coefficient = self.add_variable((), "ones", "float32", name="kl_clip_coefficient")
        self._skipped_steps = self.add_variable((), "zeros", "int64", name="skipped_steps")
        self._momentums = []
        if self.momentum > 0:
            for variable in var_list:
                self._momentums.append(self.add_variable_from_reference(variable, "momentum"))
        covered = {i for _, indices, _ in att.blocks for i in indices}
        uncovered = sorted({v.path.rsplit("/", 1)[0] for i, v in enumerate(var_list) if i not in covered})
        if uncovered and not att.warned_uncovered:
            att.warned_uncovered = True
            warnings.warn(
                f"{type(self).__name__}: no curvature block for {', '.join(uncovered)}; "
                "these layers get the plain first-order (momentum SGD) update.",
                stacklevel=2,
            )

    def _build_placement(self):
        """Communicator, owners of the inversions, and the state that survives a change of them.

        ``inverse_holders[b]`` records who holds a valid inverse of block
        ``b``: -1 every worker, ``k`` only worker ``k`` (``"gradients"`` mode);
        ``state_origin`` is the worker whose memory the state is (a checkpoint
        written by rank 0 and read anywhere says 0). A worker recomputes an
        inverse it needs but does not validly hold: after resuming on another
        number of workers or in another mode.
        """
        att = self._attachment
        att.communicator = self._make_communicator()
        workers = att.communicator.num_workers
        att.mode = resolve_mode(self.model_parallel, workers, att.communicator.conditional_collectives)
        costs = [inversion_cost(block.statistic_shapes(), self._split_dim) for block, _, _ in att.blocks]
        att.owners = assign_owners(costs, workers) if att.mode != "off" else [-1] * len(costs)
        self._inverse_holders = self.add_variable(
            (len(att.blocks),), lambda shape, dtype=None: -tf.ones(shape, "int32"), "int32", name="inverse_holders"
        )
        self._state_origin = self.add_variable((), "zeros", "int32", name="state_origin")
        # Per-worker counts, not optimizer state: not checkpointed, not synchronised.
        with tf.init_scope():
            att.local_inversions = tf.Variable(
                tf.zeros([len(self._statistics)], tf.int64),
                trainable=False,
                name="local_inversions",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
            att.bytes_sent = tf.Variable(
                tf.zeros([], tf.int64),
                trainable=False,
                name="bytes_sent",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
        att.communicator.bytes_sent = att.bytes_sent

    def _views(self, counters):
        """One :class:`~keras_hoopt.refresh.BlockView` per block."""
        views = []
        for index, (block, _, slots) in enumerate(self._slot_indices()):
            values = None if counters is None else {n: counters[s] for n, s in slots}
            views.append(BlockView(index, block, [n for n, _ in slots], values))
        return views

    def _slot_indices(self):
        """Yield ``(block, var indices, [(name, slot index)])`` in build order."""
        slot = 0
        for block, indices, names in self._attachment.blocks:
            yield block, indices, [(name, slot + k) for k, name in enumerate(names)]
            slot += len(names)

    # ------------------------------------------------------------ update step
    def _current_damping(self):
        if callable(self.damping):
            return tf.cast(self.damping(self.iterations), tf.float32)
        return tf.constant(self.damping, tf.float32)

    def _loss_scale(self):
        scaler = self._attachment.loss_scaler
        scale = tf.constant(1.0, tf.float32)
        if scaler is not None and getattr(scaler, "built", False):
            scale = tf.cast(tf.convert_to_tensor(scaler.dynamic_scale), tf.float32)
        if self.loss_scale_factor is not None:
            scale = scale * self.loss_scale_factor
        return scale

    def _output_grads(self, record, calls, replicas):
        """Per-example output gradients ``g`` of one block's calls (float32)."""
        if self.fisher == "mc":
            return [tf.cast(g, tf.float32) for g in record.sampled_output_grads(calls)]
        scale = float(replicas) / self._loss_scale()
        return [
            tf.cast(c.output_grad, tf.float32) * tf.cast(tf.shape(c.inputs)[0], tf.float32) * scale
            for c in calls
        ]

    def _batch_statistics(self, record, views, step, replicas):
        """This step's batch statistics, as thunks that are only run where due.

        Returns ``(due, thunks)``: ``due[i][name]`` is the policy's decision and
        ``thunks[i][name]()`` builds the local batch statistic, for every block
        ``i`` recorded in this step. Nothing is computed here: the thunks run
        inside the ``tf.cond`` of :meth:`_fold_statistic` (one replica) or of
        :meth:`_all_reduce` (several).
        """
        due_all, thunks = {}, {}
        if record is None:
            return due_all, thunks
        policy = self.refresh_policy
        for view in views:
            block = view.block
            calls = record.calls.get(id(block.layer))
            if not calls or any(c.output_grad is None or c.inputs is None for c in calls):
                continue
            out = {}
            for name in view.names:

                def compute(name=name, block=block, calls=calls):
                    return block.compute_statistic(
                        name, calls, lambda: self._output_grads(record, calls, replicas)
                    )

                out[name] = compute
            due_all[view.index], thunks[view.index] = policy.statistics_due(view, step), out
        return due_all, thunks

    def _reduce(self, comm, grads, thunks, due):
        """Reduce the gradients and average the due statistics over workers.

        With one worker nothing is communicated and the statistic thunks stay
        lazy. With several, gradients and statistics travel in one fused
        all-reduce (statistics that are not due are sent as zeros: the decision
        is the same on every worker, but a collective's inputs must be), or,
        where the backend allows collectives inside ``tf.cond``, in two: the
        gradients every step, the statistics only in steps where one is due.
        Statistics come back as thunks of their reduced value.
        """
        if comm.num_workers == 1:
            return grads, thunks
        keys = [(p, n) for p in sorted(thunks) for n in sorted(thunks[p])]
        shapes = [tf.TensorShape(self._attachment.blocks[p][0].statistic_shapes()[n]) for p, n in keys]
        op = comm.gradient_reduction
        scale = 1.0 / comm.num_workers if op == "sum" else 1.0  # statistics are averaged

        def local_statistics():
            out = []
            for (p, n), shape in zip(keys, shapes):
                flag = due[p][n]
                value = thunks[p][n]() if flag is True else tf.cond(
                    flag, thunks[p][n], lambda shape=shape: tf.zeros(shape)
                )
                out.append(value * scale)
            return out

        dense = [i for i, g in enumerate(grads) if g is not None]
        flags = [due[p][n] for p, n in keys]
        any_due = True if any(f is True for f in flags) else (
            tf.reduce_any(tf.stack(flags)) if flags else False
        )
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
        out = {p: {} for p in thunks}
        for (p, n), value in zip(keys, statistics):
            out[p][n] = lambda value=value: value
        return grads, out

    def _worker(self, comm):
        """This worker's index as a Python int (known when tracing)."""
        value = tf.get_static_value(tf.convert_to_tensor(comm.worker_id()))
        if value is None:  # pragma: no cover - every supported backend knows it statically
            raise RuntimeError(f"{comm.name}: the worker index is not known when tracing.")
        return int(value)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        att = self._attachment
        record = att.session.pop_record() if att.session is not None else None
        strategy = self._distribution_strategy
        replicas = strategy.num_replicas_in_sync
        comm = att.communicator
        comm.begin_step()
        me, mode, owners = self._worker(comm), att.mode, att.owners
        # Optimizer steps, not micro-batches: with gradient_accumulation_steps=k
        # Keras's _iterations counts micro-batches and iterations = _iterations // k.
        step = tf.convert_to_tensor(self.iterations)
        lr = tf.cast(learning_rate, tf.float32)
        policy = self.refresh_policy

        # Gradients by variable index (Keras filtered out the None ones).
        position = {self._var_key(v): self._get_variable_index(v) for v in trainable_variables}
        by_index = {position[self._var_key(v)]: g for g, v in zip(grads, trainable_variables)}

        views = self._views([tf.convert_to_tensor(c) for c in self._counters])
        due, batch_stats = self._batch_statistics(record, views, step, replicas)
        order = sorted(by_index)
        reduced, batch_stats = self._reduce(comm, [by_index[i] for i in order], batch_stats, due)
        by_index = dict(zip(order, reduced))

        # State writes as (variable, new value, when): ``when`` None writes
        # always, a boolean tensor writes only where it holds (a stale
        # statistic or inverse is neither recomputed nor copied).
        assignments = []
        damping = self._current_damping()
        holders = tf.convert_to_tensor(self._inverse_holders)
        origin = tf.convert_to_tensor(self._state_origin)
        blocks = list(zip(views, self._slot_indices()))

        # 1. statistics, refresh decisions, and the inverses this worker computes.
        inverses, ok, run = {}, {}, {}
        counters = {}
        for view, (block, indices, slots) in blocks:
            b = view.index
            old, new, refreshed = {}, {}, {}
            counters[b] = {}
            for name, slot in slots:
                old[name] = tf.convert_to_tensor(self._statistics[slot])
                new[name], counters[b][name], refreshed[name] = old[name], view.counters[name], tf.constant(False)
                if b in batch_stats:
                    new[name], counters[b][name], refreshed[name] = self._fold_statistic(
                        old[name], view.counters[name], batch_stats[b][name], due[b][name], step
                    )
                    assignments.append((self._statistics[slot], new[name], refreshed[name]))
            inverses_due, policy_assignments = policy.after_refresh(view, old, new, refreshed, step, damping)
            assignments.extend(_as_write(a) for a in policy_assignments)
            # A worker that needs an inverse it does not validly hold recomputes
            # it (after resuming on another number of workers or mode). In
            # "gradients" mode only the owner needs it; otherwise everyone, and
            # the holders and origin read the same on every worker.
            held = tf.logical_or(tf.equal(holders[b], -1), tf.equal(holders[b], origin))
            here = mode == "off" or owners[b] == me
            force = tf.logical_not(held) if mode != "gradients" or here else False
            inverses[b], ok[b], run[b] = self._refresh_inverses(
                block, slots, new, counters[b], damping, inverses_due, force, here
            )

        # 2. share the inverses (each worker computed its own share).
        if mode == "inverses":
            inverses, ok = self._share(comm, owners, me, run, [inverses, ok], blocks, "inverses")
        for view, (block, indices, slots) in blocks:
            b = view.index
            for name, slot in slots:
                # Same structure on every replica (merge_call): a non-owner's write is a no-op.
                held_here = mode != "gradients" or owners[b] == me
                when = run[b][name] if held_here else tf.constant(False)
                assignments.append((self._inverses[slot], inverses[b][name], when))

        # 3. precondition (in "gradients" mode each worker its own share, then share).
        preconditioned, vg = {}, {}
        for view, (block, indices, slots) in blocks:
            b = view.index
            if all(i in by_index for i in indices) and (mode != "gradients" or owners[b] == me):
                block_grads = [by_index[i] for i in indices]
                updates = block.precondition(block_grads, inverses[b])
                preconditioned[b] = dict(zip(indices, updates))
                vg[b] = tf.add_n([tf.reduce_sum(u * tf.cast(g, tf.float32)) for g, u in zip(block_grads, updates)])
        if mode == "gradients":
            preconditioned, vg, ok, run = self._share_preconditioned(
                comm, owners, me, run, preconditioned, vg, ok, blocks, by_index
            )
        vg_sum = tf.add_n(list(vg.values())) if vg else tf.constant(0.0, tf.float32)
        preconditioned = {i: u for updates in preconditioned.values() for i, u in updates.items()}

        # 4. counters (identical on every worker: `ok` was shared with the inverses).
        local = tf.zeros([len(self._statistics)], tf.int64)
        for view, (block, indices, slots) in blocks:
            b = view.index
            for name, slot in slots:
                c = tf.tensor_scatter_nd_add(
                    counters[b][name],
                    [[INVERSIONS], [FAILED_INVERSIONS]],
                    tf.stack([
                        tf.cast(tf.logical_and(run[b][name], ok[b][name]), tf.int64),
                        tf.cast(tf.logical_and(run[b][name], tf.logical_not(ok[b][name])), tf.int64),
                    ]),
                )
                assignments.append((self._counters[slot], c, None))
                if mode == "off" or owners[b] == me:
                    local = tf.tensor_scatter_nd_add(local, [[slot]], tf.cast(run[b][name], tf.int64)[None])
        att.local_inversions.assign_add(local)
        layout = [-1] * len(blocks) if mode != "gradients" else list(owners)
        assignments.append((self._inverse_holders, tf.constant(layout, tf.int32), None))
        assignments.append((self._state_origin, tf.constant(me, tf.int32), None))

        if self.kl_clip is not None and preconditioned:
            vg = vg_sum * lr * lr
            nu = tf.where(vg > 0.0, tf.minimum(1.0, tf.sqrt(self.kl_clip / tf.maximum(vg, 1e-30))), 1.0)
            preconditioned = {i: u * nu for i, u in preconditioned.items()}
            assignments.append((self._kl_clip_coefficient, nu, None))

        var_updates = []
        for i in order:
            variable = self._trainable_variables[i]
            update = preconditioned.get(i, by_index[i])
            decayed = self.weight_decay is not None and self._use_weight_decay(variable)
            var_updates.append((variable.value, tf.cast(update, variable.dtype), decayed))
        step_ok = linalg.all_finite_together([u for _, u, _ in var_updates])
        restores = [
            (variable.value, before)
            for view in views
            if record is not None
            for variable, before in view.block.forward_state_before(record.calls.get(id(view.block.layer)))
        ]
        if not batch_stats and att.blocks:
            self._warn_no_records()
        momentum, momentum_assignments = self._momentum_coefficient(lr)
        assignments += [_as_write(a) for a in momentum_assignments]
        assignments = [(getattr(v, "value", v), value, when) for v, value, when in assignments]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_apply, strategy, assignments, var_updates, restores, learning_rate, momentum, step_ok
        )

    def _warn_no_records(self):
        """Warn once (when tracing) that a training step recorded nothing for any block."""
        att = self._attachment
        if att.warned_no_records:
            return
        att.warned_no_records = True
        warnings.warn(
            f"{type(self).__name__}: no curvature block recorded its layer's inputs and output "
            "gradients in this training step, so no statistic or inverse is refreshed (the "
            "layers keep stale or identity preconditioning). Likely causes: a custom "
            "`train_step` that calls the model without `training=True` (call "
            "`self(x, training=True)`); the layers were called outside the compiled model, "
            "e.g. through another model or a bare function (compile that model with its own "
            "optimizer); or `apply_gradients` called on gradients of a loss this model's "
            "training call did not produce. See docs/troubleshooting.md.",
            stacklevel=3,
        )

    def _share(self, comm, owners, me, run, values, blocks, what):
        """All-gather per-factor values (``[{b: {name: tensor}}, ...]``) from their owners.

        Each worker sends, for the blocks it owns, every factor's entry of
        each dict in ``values`` (booleans as 0/1); only factors recomputed this
        step (``run``) take the gathered value. With conditional collectives
        nothing travels in steps where no inverse was recomputed.
        """
        names = {b: [n for n, _ in slots] for b, (_, (_, _, slots)) in enumerate(blocks)}
        shape_of = lambda t: tf.TensorShape(t.shape)  # noqa: E731
        sizes = [0] * comm.num_workers
        layout = []  # (worker, b, name, k, shape)
        for b in range(len(blocks)):
            for name in names[b]:
                for k, value in enumerate(values):
                    shape = shape_of(value[b][name])
                    layout.append((owners[b], b, name, k, shape))
                    sizes[owners[b]] += max(shape.num_elements(), 1)
        layout.sort(key=lambda e: e[0])  # stable: worker-major, block order inside
        mine = [
            tf.reshape(tf.cast(values[k][b][name], tf.float32), [-1])
            for w, b, name, k, _ in layout if w == me
        ]
        flat = tf.concat(mine, 0) if mine else tf.zeros([0], tf.float32)
        flags = [run[b][n] for b in range(len(blocks)) for n in names[b]]
        when = True if any(f is True for f in flags) else tf.reduce_any(tf.stack(flags)) if flags else False
        gathered = comm.all_gather(flat, sizes, when=when, what=what)
        out = [{b: dict(v[b]) for b in v} for v in values]
        offset = 0
        for w, b, name, k, shape in layout:
            size = max(shape.num_elements(), 1)
            piece = tf.reshape(gathered[offset: offset + size], shape)
            offset += size
            if w == me:
                continue
            current = values[k][b][name]
            if current.dtype == tf.bool:
                piece = piece > 0.5
            out[k][b][name] = tf.where(run[b][name], piece, current) if current.dtype == tf.bool else tf.cond(
                run[b][name], lambda piece=piece: piece, lambda current=current: current
            )
        return out

    def _share_preconditioned(self, comm, owners, me, run, preconditioned, vg, ok, blocks, by_index):
        """``"gradients"`` mode: all-gather each owner's preconditioned gradients, its part of
        ``<p, grad>`` and its inversion decisions and outcomes (an owner may
        have recomputed an inverse the others did not know was due)."""
        sizes = [0] * comm.num_workers
        layout = []  # (worker, kind, key, shape)
        for b, (_, (block, indices, slots)) in enumerate(blocks):
            w = owners[b]
            if all(i in by_index for i in indices):
                for i in indices:
                    layout.append((w, "update", (b, i), by_index[i].shape))
                layout.append((w, "vg", b, tf.TensorShape([])))
            for name, _ in slots:
                layout.append((w, "ok", (b, name), tf.TensorShape([])))
                layout.append((w, "run", (b, name), tf.TensorShape([])))
        layout.sort(key=lambda e: e[0])
        for w, _, _, shape in layout:
            sizes[w] += max(shape.num_elements(), 1)
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
            size = max(shape.num_elements(), 1)
            piece = tf.reshape(gathered[offset: offset + size], shape)
            offset += size
            if kind == "update":
                preconditioned.setdefault(key[0], {})[key[1]] = piece
            elif kind == "vg":
                vg[key] = piece
            elif w != me:
                (ok if kind == "ok" else run)[key[0]][key[1]] = piece > 0.5
        return preconditioned, vg, ok, run

    def _momentum_coefficient(self, learning_rate):
        """``(mu for this step, state assignments)``; SP-NGD rescales it."""
        return tf.constant(self.momentum, tf.float32), []

    def _fold_statistic(self, old, counters, batch_thunk, due, step):
        """Moving average of one statistic, computed only when due; skips a non-finite batch value.

        Returns ``(value, counters, refreshed)``.
        """
        first = tf.equal(counters[REFRESHES], 0)

        def refresh():
            batch_value = batch_thunk()
            finite = linalg.all_finite(batch_value)
            decay = tf.where(first, 0.0, self.factor_decay)
            return tf.where(finite, decay * old + (1.0 - decay) * batch_value, old), finite

        if due is True:
            value, finite = refresh()
            due = tf.constant(True)
        else:
            value, finite = tf.cond(due, refresh, lambda: (old, tf.constant(False)))
        take = tf.logical_and(due, finite)
        skipped = tf.logical_and(due, tf.logical_not(finite))
        counters = tf.tensor_scatter_nd_add(
            counters,
            [[REFRESHES], [NONFINITE_SKIPS]],
            tf.stack([tf.cast(take, tf.int64), tf.cast(skipped, tf.int64)]),
        )
        counters = tf.tensor_scatter_nd_update(
            counters, [[LAST_REFRESH]], tf.where(take, step, counters[LAST_REFRESH])[None]
        )
        return value, counters, take

    def _refresh_inverses(self, block, slots, factors, counters, damping, due, force, here):
        """Damped inverses of a block, each recomputed when due (or forced); last good ones kept.

        ``due`` is one decision for the whole block or ``{name: decision}``
        (Python or tensor booleans); ``force`` (boolean tensor) recomputes
        even when not due. Only a worker with ``here`` True computes; others
        return the old inverse. Returns ``(inverses, ok, run)`` per statistic:
        ``run`` whether the inverse was recomputed (by its owner), ``ok``
        whether that succeeded (meaningful where computed here).
        """
        names = [n for n, _ in slots]
        due = due if isinstance(due, dict) else {n: due for n in names}
        ever = tf.reduce_all([counters[n][REFRESHES] > 0 for n in names])
        inverses, ok, run = {}, {}, {}
        for name, slot in slots:
            old = tf.convert_to_tensor(self._inverses[slot])
            wanted = due[name] if force is False or due[name] is True else tf.logical_or(due[name], force)
            run[name] = ever if wanted is True else tf.logical_and(wanted, ever)
            if not here:
                inverses[name], ok[name] = old, tf.constant(True)
                continue

            def compute(name=name, old=old):
                inverse, success = block.compute_inverse(name, factors, damping, self._split_dim)
                return tf.where(success, inverse, old), success

            inverses[name], ok[name] = tf.cond(run[name], compute, lambda old=old: (old, tf.constant(True)))
        return inverses, ok, run

    def _distributed_apply(self, distribution, assignments, var_updates, restores, learning_rate, momentum, step_ok):
        for variable, value, when in assignments:
            distribution.extended.update(variable, _write, args=(value, when, step_ok), group=False)
        distribution.extended.update(self._skipped_steps.value, _count_skip, args=(step_ok,), group=False)
        for variable, before in restores:  # layer state the skipped step's forward pass wrote
            distribution.extended.update(variable, _restore_if_skipped, args=(before, step_ok), group=False)
        for variable, update, decayed in var_updates:
            distribution.extended.update(
                variable, self._momentum_update, args=(update, learning_rate, momentum, decayed, step_ok), group=False
            )

    def _apply_weight_decay(self, variables):
        """Nothing here: decoupled weight decay is applied with the update (:meth:`_momentum_update`),
        so that a skipped (non-finite) step leaves the weights exactly as they were."""

    def _momentum_update(self, variable, update, learning_rate, momentum, decayed, step_ok):
        """Momentum SGD on ``update`` (after Keras's decoupled weight decay), kept only if ``step_ok``."""
        lr = tf.cast(learning_rate, variable.dtype)
        index = self._get_variable_index(variable)
        weights = tf.convert_to_tensor(variable)
        new_weights = weights
        if decayed:
            new_weights = new_weights - new_weights * tf.cast(self.weight_decay, variable.dtype) * lr
        if self.momentum > 0:
            velocity = self._momentums[index]
            mu = tf.cast(momentum, variable.dtype)
            old_velocity = tf.convert_to_tensor(velocity)
            new_velocity = mu * old_velocity - lr * update
            self.assign(velocity, tf.where(step_ok, new_velocity, old_velocity))
            new_weights = new_weights + (mu * new_velocity - lr * update if self.nesterov else new_velocity)
        else:
            new_weights = new_weights - lr * update
        cap = self._norm_caps.get(index)
        if cap is not None:
            norm = tf.norm(new_weights)
            new_weights = new_weights * tf.minimum(1.0, cap / tf.maximum(norm, 1e-30))
        self.assign(variable, tf.where(step_ok, new_weights, weights))

    def update_step(self, gradient, variable, learning_rate):  # pragma: no cover
        raise NotImplementedError(
            "Curvature optimizers update all variables together in _backend_update_step."
        )

    # ------------------------------------------------------------ inspection
    def curvature_summary(self):
        """One dict per preconditioned layer: the documented way to inspect curvature.

        Keys: ``layer`` (name), ``kind`` (``"dense"``, ``"conv2d"``,
        ``"batchnorm"``...), ``factor_shapes`` (``{statistic: shape}``),
        ``refreshes`` (times its statistics were recomputed),
        ``steps_since_refresh``, ``inversions`` (successful inverse
        recomputations), ``nonfinite_skips`` (refreshes skipped because the
        batch statistic was NaN/Inf), ``failed_inversions`` (inversions that
        failed even with extra damping; the last good inverse was kept), and
        ``statistics`` with these counters per statistic.
        """
        if not self.built:
            return []
        iterations = int(self.iterations.numpy())
        summary = []
        views = self._views(counters=None)
        for view, (block, _, slots) in zip(views, self._slot_indices()):
            per_stat = {}
            for name, slot in slots:
                c = self._counters[slot].numpy()
                refreshed = int(c[REFRESHES]) > 0
                per_stat[name] = {
                    "refreshes": int(c[REFRESHES]),
                    "steps_since_refresh": iterations - 1 - int(c[LAST_REFRESH]) if refreshed else iterations,
                    "inversions": int(c[INVERSIONS]),
                    "nonfinite_skips": int(c[NONFINITE_SKIPS]),
                    "failed_inversions": int(c[FAILED_INVERSIONS]),
                }
            stats = per_stat.values()
            summary.append(
                {
                    "layer": block.name,
                    "kind": block.kind,
                    "factor_shapes": {k: tuple(v) for k, v in block.statistic_shapes().items()},
                    "refreshes": max(s["refreshes"] for s in stats),
                    "steps_since_refresh": min(s["steps_since_refresh"] for s in stats),
                    "inversions": max(s["inversions"] for s in stats),
                    "nonfinite_skips": sum(s["nonfinite_skips"] for s in stats),
                    "failed_inversions": sum(s["failed_inversions"] for s in stats),
                    "statistics": per_stat,
                    **self.refresh_policy.describe(view),
                }
            )
        return summary

    def communication_summary(self):
        """What this worker exchanged with the others: the documented way to inspect communication.

        Keys: ``backend`` (``"horovod"``, ``"tf.distribute"`` or ``"none"``),
        ``workers``, ``model_parallel`` (the effective mode), ``owners``
        (``{layer: worker that inverts it}``; -1: every worker),
        ``collectives`` (one dict per collective of a step, in order, as
        traced: ``kind``, ``what``, payload ``bytes`` this worker contributes
        and whether it is ``conditional``, i.e. skipped in steps where nothing
        it carries is due), ``bytes_sent`` (payload bytes this worker
        contributed to the collectives that actually ran since it was built;
        with several replicas in one process their mean),
        ``bytes_per_step`` (that over the steps taken) and ``inversions_here``
        (factorisations run in this process: each worker's own share).
        """
        att = self._attachment
        if not self.built or att.communicator is None:
            return {}
        comm = att.communicator
        local = self._strategy().experimental_local_results  # this process's replicas
        sent = float(np.mean([v.numpy() for v in local(att.bytes_sent)]))
        inversions = sum(int(v.numpy().sum()) for v in local(att.local_inversions))
        steps = int(self.iterations.numpy())
        return {
            "backend": comm.name,
            "workers": comm.num_workers,
            "model_parallel": att.mode,
            "owners": {block.name: int(owner) for (block, _, _), owner in zip(att.blocks, att.owners)},
            "collectives": [c.as_dict() for c in comm.plan],
            "bytes_sent": int(round(sent)),
            "bytes_per_step": sent / steps if steps else 0.0,
            "inversions_here": inversions,
        }

    def current_damping(self):
        """The damping ``lambda`` used by the next step (a float; schedules evaluated)."""
        return float(self._current_damping().numpy())

    @property
    def skipped_steps(self):
        """Steps skipped because their gradients or update held NaN/Inf (nothing was applied)."""
        return int(self._skipped_steps.numpy()) if self.built else 0

    def health_summary(self):
        """One dict: what went wrong numerically since the optimizer was built.

        Keys: ``steps`` (optimizer iterations), ``skipped_steps`` (non-finite
        steps that applied nothing), ``nonfinite_statistics`` (batch
        statistics skipped for NaN/Inf, over all layers),
        ``failed_inversions`` (factorisations that failed even with extra
        damping; the last good inverse was kept) and ``on_nonfinite``.
        """
        rows = self.curvature_summary()
        return {
            "steps": int(self.iterations.numpy()),
            "skipped_steps": self.skipped_steps,
            "nonfinite_statistics": sum(r["nonfinite_skips"] for r in rows),
            "failed_inversions": sum(r["failed_inversions"] for r in rows),
            "on_nonfinite": self.on_nonfinite,
        }

    @property
    def kl_clip_coefficient(self):
        """The KL-clip scale ``nu`` applied in the last step (1.0: not clipped; None before build)."""
        return float(self._kl_clip_coefficient.numpy()) if self.built else None

    def statistic(self, layer_name, name):
        """Current value (numpy) of statistic ``name`` (e.g. ``"A"``) of a layer."""
        return self._slot_value(self._statistics, layer_name, name)

    def inverse(self, layer_name, name):
        """Current damped inverse (numpy) of statistic ``name`` of a layer."""
        return self._slot_value(self._inverses, layer_name, name)

    def _slot_value(self, variables, layer_name, name):
        for block, _, slots in self._slot_indices():
            if block.name == layer_name:
                for stat, slot in slots:
                    if stat == name:
                        return variables[slot].numpy()
        raise KeyError(f"No statistic {name!r} for layer {layer_name!r}.")

    # ------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "damping": damping_config(self.damping),
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "factor_decay": self.factor_decay,
                "kl_clip": self.kl_clip,
                "fisher": self.fisher,
                "seed": self.seed,
                "communication": self.communication,
                "model_parallel": self.model_parallel,
                "on_nonfinite": self.on_nonfinite,
            }
        )
        return config


_compile_hook.install()
_keras_compat.install()

"""Shared machinery of the exact second-order optimizers (natural gradient, Newton).

The exact methods need, at update time, the training batch ``(x, y,
sample_weight)`` and the model, neither of which Keras hands to an optimizer.

* :class:`BatchRecorder` wraps ``compute_loss`` on the model INSTANCE (not the
  class; nothing in Keras is patched globally). ``Trainer.train_step`` calls
  ``self._compute_loss(x, y, y_pred, sample_weight, training=True)``, which
  looks ``self.compute_loss`` up on the instance, so the wrapper sees the batch
  of every training step. It stores it in an untracked dict keyed by
  ``(FuncGraph or "eager", replica id)``; the optimizer pops the entry of its own
  graph (walking up ``outer_graph`` from inside ``tf.cond`` bodies) in the same
  step. This works with ``jit_compile=False`` and ``True``, ``run_eagerly=True``,
  ``steps_per_execution > 1``, gradient accumulation and ``tf.distribute``.
  It also wraps the instance's ``call`` to read the float non-trainable
  variables (BatchNormalization's moving statistics) before the training
  forward pass writes them, so that a skipped (non-finite) step can put them
  back.
* :class:`ExactOptimizer` recomputes the training forward pass as a function of
  the flat vector ``theta`` of all trainable parameters (in the optimizer's
  variable order, each variable flattened row-major) inside a
  ``keras.StatelessScope``, so the recomputation has no side effect
  (BatchNormalization moving statistics, seed generators and metrics are not
  touched), and forms a dense ``P x P`` curvature matrix from it. Subclasses
  define the matrix (Fisher or Hessian) and the solve. The same recomputation
  gives the batch loss at a candidate ``theta``, which drives the
  Levenberg-Marquardt step control (:meth:`ExactOptimizer._levenberg_marquardt`).

The recorder is registered under the model attribute ``_keras_hoopt_session``
(the key :mod:`keras_hoopt.capture` uses), so compiling the model again with
another optimizer (curvature or plain) uninstalls it, and attaching an exact
optimizer uninstalls a previous K-FAC capture.
"""

import functools
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.capture import current_graph_chain, replica_id
from keras_hoopt.optimizers._validation import (
    check,
    check_keras_arguments,
    check_learning_rate,
    check_momentum,
    check_on_nonfinite,
    check_one_model,
    damping_config,
    damping_value,
    is_int,
)

_EAGER = "eager"
_SESSION_KEY = "_keras_hoopt_session"
_LOSS_ARGS = ("x", "y", "y_pred", "sample_weight", "training")
_WRAPPED = ("call", "compute_loss")  # model methods the recorder wraps on the instance

#: Accepted values of ``step_control``.
STEP_CONTROLS = ("lm", None)

# Levenberg-Marquardt rule (Martens & Grosse 2015, sec. 6.5; tensorflow/kfac, kfac-jax):
# rho = actual / predicted reduction; rho < LM_LOWER_RHO -> lambda *= LM_GROW,
# rho > LM_UPPER_RHO -> lambda *= LM_SHRINK, adapted every step (not every 5 as there).
# The user's damping (float or schedule) is the floor; LM_MAX_DAMPING caps the growth.
LM_LOWER_RHO = 0.25
LM_UPPER_RHO = 0.75
LM_SHRINK = 2.0 / 3.0
LM_GROW = 1.5
LM_MAX_DAMPING = 1e8


class Batch:
    """One training batch seen by ``compute_loss``.

    ``state_before``: ``[(variable, value)]`` of the model's float
    non-trainable variables (BatchNormalization's moving statistics) read just
    before the training forward pass wrote them, restored if the step is
    skipped as non-finite.
    """

    def __init__(self, x, y, sample_weight, state_before=()):
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.state_before = list(state_before)


class BatchRecorder:
    """Records ``(x, y, sample_weight)`` of each training ``compute_loss`` call, and the
    model's forward-pass state read by the ``call`` just before it."""

    def __init__(self, model):
        self.model = model
        self._records = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._installed = False
        self._previous = {}  # instance-level methods that were there before

    # -- installation -------------------------------------------------------
    def install(self):
        if self._installed:
            return
        model = self.model
        previous = model.__dict__.get(_SESSION_KEY)
        if previous is not None and previous is not self:
            previous.uninstall()
        self._previous = {name: model.__dict__.get(name) for name in _WRAPPED}
        original_call, original_loss = model.call, model.compute_loss

        @functools.wraps(original_call)
        def call(*args, **kwargs):
            if not getattr(self._local, "paused", False):
                self._local.state_before = (self._key(current_graph_chain()[0]), self._forward_state())
            return original_call(*args, **kwargs)

        @functools.wraps(original_loss)
        def compute_loss(*args, **kwargs):
            if not getattr(self._local, "paused", False):
                bound = dict(zip(_LOSS_ARGS, args))
                bound.update(kwargs)
                training = bound.get("training", True)
                static = tf.get_static_value(training) if tf.is_tensor(training) else training
                if static is None or bool(static):
                    state = self._state_of_this_pass()
                    self._store(Batch(bound.get("x"), bound.get("y"), bound.get("sample_weight"), state))
            return original_loss(*args, **kwargs)

        object.__setattr__(model, "call", call)
        object.__setattr__(model, "compute_loss", compute_loss)
        object.__setattr__(model, _SESSION_KEY, self)
        self._installed = True

    def uninstall(self):
        if not self._installed:
            return
        model = self.model
        for name, previous in self._previous.items():
            model.__dict__.pop(name, None)
            if previous is not None:
                object.__setattr__(model, name, previous)
        if model.__dict__.get(_SESSION_KEY) is self:
            model.__dict__.pop(_SESSION_KEY, None)
        self._records.clear()
        self._installed = False

    def _forward_state(self):
        """``[(variable, value now)]`` of the float non-trainable variables (moving statistics)."""
        return [
            (v, tf.identity(tf.convert_to_tensor(v)))
            for v in self.model.non_trainable_variables
            if keras.backend.is_float_dtype(v.dtype)
        ]

    def _state_of_this_pass(self):
        """The state read by the ``call`` of this graph and replica before its forward pass, or ``[]``."""
        key, state = getattr(self._local, "state_before", (None, []))
        return state if key == self._key(current_graph_chain()[0]) else []

    # -- records ------------------------------------------------------------
    def paused(self):
        """Context in which ``compute_loss`` calls are not recorded (recomputation)."""
        recorder = self

        class _Paused:
            def __enter__(self):
                self.before = getattr(recorder._local, "paused", False)
                recorder._local.paused = True

            def __exit__(self, *exc):
                recorder._local.paused = self.before

        return _Paused()

    def _key(self, graph):
        return (graph if graph is _EAGER else weakref.ref(graph), replica_id())

    def _store(self, batch):
        graph = current_graph_chain()[0]
        key = self._key(graph)
        with self._lock:
            for dead in [k for k in self._records if k[0] is not _EAGER and k[0]() is None]:
                del self._records[dead]
            self._records[key] = batch

    def pop(self):
        """The batch of the training step being run/traced, or ``None``."""
        with self._lock:
            for graph in current_graph_chain():
                key = self._key(graph)
                if key in self._records:
                    return self._records.pop(key)
        return None


class ExactOptimizer(keras.optimizers.Optimizer):
    """Base class: momentum SGD on ``(C + lambda I)^-1 grad`` with an exact ``P x P`` matrix ``C``.

    Each step proposes ``delta`` (the weight change momentum SGD would apply)
    and, with ``step_control="lm"``, accepts it only if it lowers this batch's
    loss, adapting ``lambda`` by the Levenberg-Marquardt rule
    (:meth:`_levenberg_marquardt`). A step whose gradient, matrix or update is
    not finite applies nothing and is counted in :attr:`skipped_steps`.

    Subclasses implement :meth:`_batch_curvature` (and optionally
    :meth:`_solve`). See :class:`keras_hoopt.NaturalGradient` and
    :class:`keras_hoopt.Newton`.
    """

    #: How the per-replica matrices are combined: "mean" or "sum".
    _replica_reduction = "mean"
    #: What the matrix is called in error messages.
    _matrix_name = "curvature matrix"

    def __init__(
        self,
        learning_rate=1.0,
        damping=1.0,
        momentum=0.0,
        nesterov=False,
        max_parameters=5000,
        jacobian_chunk_size=None,
        step_control="lm",
        on_nonfinite="skip",
        name="exact_optimizer",
        **kwargs,
    ):
        check_learning_rate(learning_rate)
        check_keras_arguments(kwargs)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        damping = damping_value(damping)
        check_momentum(momentum, nesterov)
        check("max_parameters", max_parameters, is_int(max_parameters, 1), "an int >= 1")
        check("jacobian_chunk_size", jacobian_chunk_size, jacobian_chunk_size is None or is_int(jacobian_chunk_size, 1),
              "None or an int >= 1")
        check("step_control", step_control, step_control in STEP_CONTROLS, " or ".join(repr(c) for c in STEP_CONTROLS))
        check_on_nonfinite(on_nonfinite)
        self.step_control = step_control
        self.on_nonfinite = on_nonfinite
        self.jacobian_chunk_size = None if jacobian_chunk_size is None else int(jacobian_chunk_size)
        self.damping = damping
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.max_parameters = int(max_parameters)
        self._holder = _Holder()
        # Subclasses set their own fields, then call ``self.attach(model)`` if given.

    # ------------------------------------------------------------------ model
    def attach(self, model, loss=None):
        """Use ``model``'s training batches (done automatically by ``model.compile``)."""
        self._attach(model, loss)

    def _attach_from_compile(self, model, loss, loss_scaler):
        self._attach(model, loss)

    def _attach(self, model, loss):
        holder = self._holder
        check_one_model(self, holder.model, model)
        if loss is None:
            loss = holder.loss if holder.model is model else getattr(model, "loss", None)
        self._validate_loss(loss)
        if getattr(model, "built", False):
            self._check_size(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
        if holder.recorder is not None:
            holder.recorder.uninstall()
        holder.model, holder.loss, holder.compiled = model, loss, None
        holder.recorder = BatchRecorder(model)
        holder.recorder.install()

    def _validate_loss(self, loss):
        """Subclass hook: raise ValueError at compile time for an unusable loss."""

    def _check_size(self, count):
        if count > self.max_parameters:
            raise ValueError(
                f"{type(self).__name__} forms and solves the exact {count} x {count} "
                f"{self._matrix_name}, but the parameter limit is max_parameters="
                f"{self.max_parameters} (this model has {count:,} trainable parameters). "
                "Use keras_hoopt.KFAC (Kronecker-factored approximation) for larger models, "
                "or raise max_parameters if you have the memory and time "
                f"(O(P^2) memory, O(P^3) time per step)."
            )

    # ------------------------------------------------------------------ build
    def build(self, var_list):
        if self.built:
            return
        holder = self._holder
        if holder.model is None:
            raise ValueError(
                f"{type(self).__name__} needs its model: pass it to "
                "`model.compile(optimizer=...)` or construct it with `model=model`."
            )
        self._check_size(sum(int(np.prod(v.shape)) for v in var_list))
        model_keys = {self._var_key(v) for v in holder.model.trainable_variables}
        foreign = [v.path for v in var_list if self._var_key(v) not in model_keys]
        if foreign:
            raise ValueError(
                f"{type(self).__name__} can only update trainable variables of its model; "
                f"got {', '.join(foreign)}."
            )
        super().build(var_list)
        self._momentums = []
        if self.momentum > 0:
            for variable in var_list:
                self._momentums.append(self.add_variable_from_reference(variable, "momentum"))
        self._failed_solves = self.add_variable((), "zeros", "int64", name="failed_solves")
        self._skipped_steps = self.add_variable((), "zeros", "int64", name="skipped_steps")
        if self.step_control == "lm":
            self._rejected_steps = self.add_variable((), "zeros", "int64", name="rejected_steps")
            # The adapted lambda before the floor ``damping``: 0 starts the first step at the floor.
            self._adapted_damping = self.add_variable((), "zeros", "float32", name="damping")

    @property
    def failed_solves(self):
        """Steps whose damped solve failed at every damping level (the raw gradient was used)."""
        return int(self._failed_solves.numpy()) if self.built else 0

    @property
    def skipped_steps(self):
        """Steps that applied nothing because the gradient, matrix or update held NaN/Inf."""
        return int(self._skipped_steps.numpy()) if self.built else 0

    @property
    def rejected_steps(self):
        """Finite steps the Levenberg-Marquardt control rejected (the batch loss did not decrease)."""
        return int(self._rejected_steps.numpy()) if self.built and self.step_control == "lm" else 0

    def current_damping(self):
        """The damping ``lambda`` the next step will use (a float; adapted, schedules evaluated)."""
        return float(self._step_damping().numpy())

    # ------------------------------------------------------------ parameters
    def parameter_layout(self):
        """``[(variable path, shape, offset)]``: where each variable sits in ``theta``."""
        variables = self._parameter_variables()
        layout, offset = [], 0
        for v in variables:
            layout.append((v.path, tuple(v.shape), offset))
            offset += int(np.prod(v.shape))
        return layout

    def _parameter_variables(self):
        if self.built:
            return list(self._trainable_variables)
        return list(self._holder.model.trainable_variables)

    def _sizes_and_shapes(self, variables):
        return [int(np.prod(v.shape)) for v in variables], [tuple(v.shape) for v in variables]

    def _forward(self, theta, batch, variables, after=None):
        """Training forward pass at parameters ``theta``, without side effects.

        Returns ``(y_pred, after(y_pred))``; ``after`` runs inside the same
        stateless scope (e.g. to compute the training loss).
        """
        model = self._holder.model
        sizes, shapes = self._sizes_and_shapes(variables)
        pieces = _split(theta, sizes)
        mapping = [(v, tf.cast(tf.reshape(p, s), v.dtype)) for v, p, s in zip(variables, pieces, shapes)]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True), self._holder.recorder.paused():
            if model._call_has_training_arg:
                y_pred = model(batch.x, training=True)
            else:
                y_pred = model(batch.x)
            extra = after(y_pred) if after is not None else None
        return y_pred, extra

    def _training_loss(self, batch, y_pred):
        """The model's training loss (``compute_loss``: compiled loss + regularization), float32."""
        loss = self._holder.model._compute_loss(
            x=batch.x, y=batch.y, y_pred=y_pred, sample_weight=batch.sample_weight, training=True
        )
        return tf.cast(loss, tf.float32)

    def _theta(self, variables):
        return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(v), tf.float32), [-1]) for v in variables], 0)

    # ------------------------------------------------------------ update step
    def _base_damping(self):
        """The user's ``damping`` at this step (a schedule evaluated at ``iterations``), float32."""
        if callable(self.damping):
            return tf.cast(self.damping(self.iterations), tf.float32)
        return tf.constant(self.damping, tf.float32)

    def _step_damping(self):
        """``lambda`` of the coming step: the user's damping, or (``step_control="lm"``)
        ``max(adapted lambda, damping)``."""
        if self.step_control is None or not self.built:
            return self._base_damping()
        return tf.maximum(tf.convert_to_tensor(self._adapted_damping), self._base_damping())

    def _batch_curvature(self, theta, batch, variables, replicas):
        """This replica's ``P x P`` curvature matrix (float32). Subclass hook."""
        raise NotImplementedError

    def _solve(self, matrix, grad, damping):
        """``((matrix + lam I)^-1 grad, ok, lam)`` by Cholesky, retried with more damping.

        Same policy as :func:`keras_hoopt.linalg.damped_inverse` (``lam`` =
        damping, then 10x, 100x, 1000x), but solving against the gradient only.
        In float64. ``lam`` is the damping of the last attempt (the one that
        succeeded, or 1000x when ``ok`` is False).
        """
        matrix = tf.cast(linalg.symmetrize(matrix), tf.float64)
        grad = tf.cast(grad, tf.float64)[:, None]
        damping = tf.cast(damping, tf.float64)
        eye = tf.eye(tf.shape(matrix)[0], dtype=tf.float64)

        def cond(k, solution, ok):
            return tf.logical_and(k < linalg.MAX_ATTEMPTS, tf.logical_not(ok))

        def body(k, solution, ok):
            lam = damping * tf.pow(tf.constant(linalg.RETRY_GROWTH, tf.float64), tf.cast(k, tf.float64))
            chol = tf.linalg.cholesky(matrix + lam * eye)
            solution = tf.linalg.cholesky_solve(chol, grad)
            return k + 1, solution, linalg.all_finite(solution)

        attempts, solution, ok = tf.while_loop(cond, body, (tf.constant(0), tf.zeros_like(grad), tf.constant(False)))
        used = tf.cast(damping, tf.float32) * tf.pow(linalg.RETRY_GROWTH, tf.cast(attempts - 1, tf.float32))
        return tf.cast(solution[:, 0], tf.float32), ok, used

    def _recorded_batch(self):
        """The batch recorded by ``compute_loss`` for this step; RuntimeError when there is none."""
        holder = self._holder
        batch = holder.recorder.pop() if holder.recorder is not None else None
        if batch is None:
            raise RuntimeError(
                f"{type(self).__name__} found no training batch for this step. It reads the batch "
                "from the model's `compute_loss`: train with `model.fit` / `model.train_on_batch` "
                "of the model compiled with this optimizer, or, in a custom training loop, call "
                "`model.compute_loss(x, y, y_pred, sample_weight, training=True)` before "
                "`apply_gradients`."
            )
        return batch

    def _all_reduce_sum(self, values, replicas):
        """Sum ``values`` (a list of tensors) over replicas; unchanged with one replica."""
        context = tf.distribute.get_replica_context()
        if replicas > 1 and context is not None:
            return context.all_reduce(tf.distribute.ReduceOp.SUM, values)
        return values

    def _batch_loss(self, theta, batch, variables):
        """This replica's training loss of ``batch`` at parameters ``theta`` (stateless, float32)."""
        return self._forward(theta, batch, variables, after=lambda y_pred: self._training_loss(batch, y_pred))[1]

    def _proposal(self, direction, learning_rate, variables):
        """``(velocity', delta)``: the momentum buffer and the weight change of this step if accepted::

            v' = momentum * v - lr * p
            delta = v'                        (heavy ball)
                  = momentum * v' - lr * p    (Nesterov)
                  = -lr * p                   (momentum 0; velocity' is None)
                  - lr * weight_decay * w     (Keras's decoupled weight decay, where it applies)
        """
        lr = tf.cast(learning_rate, tf.float32)
        step = -lr * direction
        if self.momentum == 0:
            velocity, delta = None, step
        else:
            velocity = self.momentum * self._theta(self._momentums) + step
            delta = self.momentum * velocity + step if self.nesterov else velocity
        if self.weight_decay is not None:
            decayed = [v if self._use_weight_decay(v) else tf.zeros(v.shape, v.dtype) for v in variables]
            delta = delta - lr * tf.cast(self.weight_decay, tf.float32) * self._theta(decayed)
        return velocity, delta

    def _apply_weight_decay(self, variables):
        """Nothing here: the decay is part of the proposed update (:meth:`_proposal`), so the
        step control sees it and a rejected or skipped step does not decay the weights."""

    def _levenberg_marquardt(self, batch, variables, delta, grad, matrix, damping, replicas):
        """``(accept, next lambda)``: Levenberg-Marquardt control of the proposed ``delta``.

        ``damping`` is the ``lambda`` the solve used (after its retries, so a
        Hessian that needed 10x more damping to factor raises ``lambda`` for
        the next steps).

        The same batch's loss is recomputed at ``theta`` and ``theta + delta``
        (stateless, all-reduced over replicas like the gradient) and compared
        with the reduction predicted by the quadratic model with the UNDAMPED
        matrix ``C`` (kfac-jax's default)::

            actual    = L(theta) - L(theta + delta)
            predicted = -(grad . delta + 0.5 delta^T C delta)
            rho       = actual / predicted     (0 if predicted <= 0 or actual is not finite)
            lambda'   = min(LM_MAX_DAMPING, lambda * LM_GROW)  if rho < LM_LOWER_RHO
                        lambda * LM_SHRINK                   if rho > LM_UPPER_RHO
                        lambda                               otherwise
            accept    = L(theta + delta) finite and actual > 0

        The next step uses ``max(lambda', damping)``: the user's damping (or
        its schedule) is the floor. On an exact quadratic (linear least
        squares with Newton, or with the Gauss-Newton Fisher) ``rho == 1``:
        the step is accepted and ``lambda`` shrinks towards the floor.
        """
        theta = self._theta(variables)
        before, after = self._all_reduce_sum(
            [self._batch_loss(theta, batch, variables), self._batch_loss(theta + delta, batch, variables)], replicas
        )
        actual = before - after
        predicted = -(tf.tensordot(grad, delta, 1) + 0.5 * tf.tensordot(delta, tf.linalg.matvec(matrix, delta), 1))
        trusted = tf.logical_and(tf.math.is_finite(actual), predicted > 0)
        rho = tf.where(trusted, actual / tf.where(trusted, predicted, 1.0), 0.0)
        factor = tf.where(rho < LM_LOWER_RHO, LM_GROW, tf.where(rho > LM_UPPER_RHO, LM_SHRINK, 1.0))
        next_damping = tf.minimum(damping * factor, LM_MAX_DAMPING)
        accept = tf.logical_and(tf.math.is_finite(after), actual > 0)
        return accept, next_damping

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        batch = self._recorded_batch()
        strategy = self._distribution_strategy
        replicas = strategy.num_replicas_in_sync
        variables = list(self._trainable_variables)
        sizes, _ = self._sizes_and_shapes(variables)

        position = {self._var_key(v): self._get_variable_index(v) for v in trainable_variables}
        by_index = {position[self._var_key(v)]: g for g, v in zip(grads, trainable_variables)}
        flat_grad = tf.concat(
            [
                tf.reshape(tf.cast(by_index[i], tf.float32), [-1]) if i in by_index else tf.zeros([sizes[i]])
                for i in range(len(variables))
            ],
            0,
        )
        if tf.executing_eagerly() and replicas == 1:
            # run_eagerly: one cached tf.function instead of re-tracing the vectorised
            # Jacobian (tf.vectorized_map wraps itself in a new tf.function each call).
            matrix = self._compiled_curvature(variables)(batch.x, batch.y, batch.sample_weight)
        else:
            matrix = self._batch_curvature(self._theta(variables), batch, variables, replicas)
        scale = 1.0 / replicas if self._replica_reduction == "mean" else 1.0
        flat_grad, matrix = self._all_reduce_sum([flat_grad, matrix * scale], replicas)

        damping = self._step_damping()
        direction, ok, used_damping = self._solve(matrix, flat_grad, damping)
        direction = tf.where(ok, direction, flat_grad)
        velocity, delta = self._proposal(direction, learning_rate, variables)
        # All inputs are all-reduced, so every replica takes the same decisions.
        finite = linalg.all_finite_together([flat_grad, matrix, delta])
        counters = [
            (self._failed_solves, tf.logical_and(finite, tf.logical_not(ok))),
            (self._skipped_steps, tf.logical_not(finite)),
        ]
        assignments = []
        if self.step_control == "lm":
            accepted, next_damping = self._levenberg_marquardt(
                batch, variables, delta, flat_grad, matrix, used_damping, replicas
            )
            counters.append((self._rejected_steps, tf.logical_and(finite, tf.logical_not(accepted))))
            assignments.append((self._adapted_damping.value, tf.where(finite, next_damping, self._adapted_damping)))
            accept = tf.logical_and(finite, accepted)
        else:
            accept = finite
        for counter, event in counters:
            assignments.append((counter.value, counter + tf.cast(event, tf.int64)))
        for variable, before in batch.state_before:  # what the skipped step's forward pass wrote
            assignments.append((variable.value, tf.where(finite, tf.convert_to_tensor(variable), before)))

        # A rejected or skipped step changes no weight. Momenta: accepted -> v'; skipped -> kept;
        # rejected -> 0 (a restart: a kept velocity that overshoots would be proposed again and
        # again on a full batch, since only lambda changes between the attempts).
        delta_pieces = _split(delta, sizes)
        velocity_pieces = None if velocity is None else _split(velocity, sizes)
        var_updates = []
        for i in sorted(by_index):
            variable = variables[i]
            step = tf.where(accept, tf.reshape(delta_pieces[i], variable.shape), 0.0)
            var_updates.append((variable.value, tf.cast(step, variable.dtype)))
            if velocity_pieces is not None:
                buffer = self._momentums[i]
                otherwise = tf.where(finite, 0.0, tf.cast(buffer, tf.float32))
                kept = tf.where(accept, tf.reshape(velocity_pieces[i], buffer.shape), otherwise)
                assignments.append((buffer.value, tf.cast(kept, buffer.dtype)))
        tf.__internal__.distribute.interim.maybe_merge_call(self._distributed_apply, strategy, assignments, var_updates)

    def _distributed_apply(self, distribution, assignments, var_updates):
        for variable, value in assignments:
            distribution.extended.update(variable, lambda v, x: v.assign(x), args=(value,), group=False)
        for variable, step in var_updates:
            distribution.extended.update(variable, lambda v, x: v.assign_add(x), args=(step,), group=False)

    def update_step(self, gradient, variable, learning_rate):  # pragma: no cover
        raise NotImplementedError("Exact second-order optimizers update all variables together.")

    # ------------------------------------------------------------ inspection
    def curvature_matrix(self, x, y=None, sample_weight=None):
        """This optimizer's ``P x P`` matrix (numpy, undamped) at the current weights.

        ``x``, ``y``, ``sample_weight``: one batch, as ``model.fit`` would see
        it. Rows and columns follow :meth:`parameter_layout`. The model must
        be built (and attached).
        """
        if self._holder.model is None:
            raise ValueError(f"{type(self).__name__} is not attached to a model.")
        variables = self._parameter_variables()
        if not self.built:
            self._check_size(sum(int(np.prod(v.shape)) for v in variables))
        fn = self._compiled_curvature(variables)
        to_tensor = lambda s: tf.nest.map_structure(lambda t: None if t is None else tf.convert_to_tensor(t), s)
        return fn(to_tensor(x), to_tensor(y), to_tensor(sample_weight)).numpy()

    def _compiled_curvature(self, variables):
        """``tf.function`` ``(x, y, sample_weight) -> matrix`` at the current weights (one replica)."""
        key = tuple(id(v) for v in variables)
        cached = self._holder.compiled
        if cached is not None and cached[0] == key:
            return cached[1]

        @tf.function(reduce_retracing=True)
        def fn(x, y, sample_weight):
            return self._batch_curvature(self._theta(variables), Batch(x, y, sample_weight), variables, 1)

        self._holder.compiled = (key, fn)
        return fn

    # ------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "damping": damping_config(self.damping),
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "max_parameters": self.max_parameters,
                "jacobian_chunk_size": self.jacobian_chunk_size,
                "step_control": self.step_control,
                "on_nonfinite": self.on_nonfinite,
            }
        )
        return config


def _split(flat, sizes):
    """``flat`` cut into consecutive pieces of ``sizes`` (a list of one piece when there is one size)."""
    return tf.split(flat, sizes) if len(sizes) > 1 else [flat]


class _Holder:
    """Plain (untracked) holder of the model, its loss and the batch recorder."""

    def __init__(self):
        self.model = None
        self.loss = None
        self.recorder = None
        self.compiled = None  # cached tf.function of the curvature (eager use)


def forward_jacobian(fn, theta, chunk=None):
    """``d fn(theta) / d theta_p`` for every ``p``, stacked first: ``[P, *fn's shape]``.

    Forward mode (``tf.autodiff.ForwardAccumulator``), vectorised over the
    ``P`` unit tangents with ``tf.vectorized_map`` (``chunk`` tangents at a
    time through ``tf.map_fn`` when given). For per-example Jacobians of a
    batch this costs ``P`` forward passes, where reverse mode costs one
    full-batch backward pass per output row (``N * K`` of them).
    """
    size = int(theta.shape[0])

    def column(tangent):
        with tf.autodiff.ForwardAccumulator(theta, tangent) as accumulator:
            value = fn(theta)
        return accumulator.jvp(value, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    if chunk is None or chunk >= size:
        return tf.vectorized_map(column, tf.eye(size))
    chunks = -(-size // chunk)
    basis = tf.reshape(tf.eye(chunks * chunk, size), [chunks, chunk, size])
    columns = tf.map_fn(lambda b: tf.vectorized_map(column, b), basis, fn_output_signature=tf.float32)
    columns = tf.reshape(columns, tf.concat([[chunks * chunk], tf.shape(columns)[2:]], 0))
    return columns[:size]


def per_example_weights(sample_weight, n):
    """``sample_weight`` as a ``[n]`` float32 vector (ones when None)."""
    if sample_weight is None:
        return tf.ones([n], tf.float32)
    weights = tf.cast(sample_weight, tf.float32)
    if weights.shape.rank is not None and weights.shape.rank > 1:
        weights = tf.reshape(weights, [n, -1])
        if weights.shape[-1] not in (None, 1):
            raise ValueError(
                "fisher='exact' and 'mc' support one sample weight per example "
                f"(shape [batch] or [batch, 1]); got shape {sample_weight.shape}."
            )
        weights = weights[:, 0]
    return tf.reshape(weights, [n])

"""Step size, momentum and damping chosen by the local quadratic model of the loss.

K-FAC gives a direction; how far to go along it, and how much of the previous
update to keep, are what a fixed learning rate, momentum and KL-clip guess at.
Martens & Grosse (2015, sections 6.4-7) choose them instead from the quadratic
model of the loss around the current weights::

    q(delta) = g . delta + 1/2 delta^T (C + lambda I) delta

with ``C`` the generalised Gauss-Newton matrix (the exact Fisher of the
loss's likelihood, NOT the Kronecker approximation) and ``lambda`` the damping.
With the two candidate directions ``u_1 = -p`` (``p`` the preconditioned
gradient) and ``u_2 = v`` (the previous update, the momentum buffer), the
update ``delta = alpha u_1 + mu u_2`` minimising ``q`` solves the 2 x 2 system::

    M c = -b,   M_ij = u_i^T C u_j + lambda u_i . u_j,   b_i = g . u_i,   c = (alpha, mu)

with ``mu`` kept in ``[0, MAX_MOMENTUM]`` (:func:`minimise_in_span`).

``u_i^T C u_j = mean_n (J_n u_i)^T H_n (J_n u_j)`` needs one Jacobian-vector
product per direction through the model's training call on this step's batch,
recorded by :mod:`keras_hoopt.capture` and re-run without side effects
(``keras.StatelessScope``); ``H_n`` is the loss's output Hessian
(:func:`keras_hoopt.fisher.output_quadratic_form`). kfac-jax calls this its
adaptive learning rate and momentum. Three ways to form ``J u``
(``quadratic_model_products``):

* ``"one_sided_differences"``: ``J u = (f(theta + e u) - f(theta)) / e + O(e)``
  with ``e = ONE_SIDED_STEP max(|theta|, 1) / |u|`` (global norms;
  :data:`ONE_SIDED_STEP` and :data:`FD_STEP` are measured, see their comment).
  ``f(theta)`` is the training pass's own output when a re-run reproduces it
  (no layer of the model draws random numbers, the whole batch), so the two
  directions cost two forward passes; otherwise one more pass computes it.
  ``H_n`` is taken at ``f(theta)``.
* ``"finite_differences"``: central differences of two forward passes,
  ``J u = (f(theta + e u) - f(theta - e u)) / 2e + O(e^2)``, with
  ``e = FD_STEP max(|theta|, 1) / |u|``; ``H_n`` is taken at the mean of the two outputs
  (``f(theta) + O(e^2)``). Four forward passes for the two directions.
* ``"forward_mode"``: ``tf.autodiff.ForwardAccumulator``, exact, but
  TensorFlow builds most ops' forward-mode rules from double backward passes:
  on the deep autoencoder the stage took 75 ms of op time per step against
  46 with central differences (docs/benchmarks.md).

``"auto"`` (the default) takes one-sided differences where every layer
computes in float32 and forward mode otherwise (float16/bfloat16 have too few
digits for a difference).

With ``quadratic_model_interval=n`` (the optimizers' default 4) the products
are measured on every ``n``-th step (and on each of the first
:data:`MEASURED_FIRST_STEPS`); a step in between takes
``M_ij = R_ij |u_i| |u_j|`` with ``R_ij = u_i^T C u_j / (|u_i| |u_j|)`` of the
last measurement (:func:`between_measurements`) and solves the same 2 x 2
system with its own ``b`` and Gram matrix. Only the curvature along the
directions is stale; the step's length still follows its own gradient.

Levenberg-Marquardt damping (Martens & Grosse 2015, section 6.5; tensorflow/kfac
and kfac-jax defaults): every ``interval`` steps the same batch's loss is
recomputed after the update and compared with the model's prediction::

    rho = (L(theta + delta) - L(theta)) / q_0(delta)     (q_0: the undamped model)
    lambda <- lambda / omega   if rho < 1/4
              lambda * omega   if rho > 3/4,    omega = 0.9 ** interval

bounded to ``[min_damping, MAX_DAMPING]`` (the optimizer's ``min_damping``,
default 1e-4). ``L(theta)`` is the loss of the training pass's own output where
a re-run reproduces it and no layer adds a loss in its call (so one forward
pass, for ``L(theta + delta)``); otherwise a re-run computes it too. Only the preconditioned variables
are in ``delta``: the quadratic model says nothing about those a ``fallback``
updates.
"""

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution

from keras_hoopt import linalg
from keras_hoopt.fisher import output_quadratic_form
# The Levenberg-Marquardt thresholds and cap are the exact optimizers' (one rule, two step controls).
from keras_hoopt.optimizers._exact import LM_LOWER_RHO, LM_MAX_DAMPING, LM_UPPER_RHO

LM_DECAY = 0.9  # per step of the adaptation interval (kfac-jax's damping_adaptation_decay)
MIN_DAMPING = 1e-8  # the rule's own floor; optimizers pass their min_damping
MAX_DAMPING = LM_MAX_DAMPING
#: The chosen momentum is kept in ``[0, MAX_MOMENTUM]``: unconstrained, one batch's model asks for
#: momenta of -1 to 12 on a BatchNorm CNN and training falls apart (docs/choosing.md).
MAX_MOMENTUM = 0.99
#: With ``quadratic_model_interval > 1`` the curvature products are still measured in every one of
#: the first steps, where the curvature along the preconditioned gradient changes fastest: measured
#: only every 4th step from the start, the CNN's loss went from 1.5 to 50 in the first five steps.
MEASURED_FIRST_STEPS = 20
#: Below this ``det(M) / (M_11 M_22)`` the two directions are treated as parallel: 1-D solve.
_PARALLEL = 1e-6
#: Accepted values of ``quadratic_model_products``.
PRODUCTS = ("auto", "one_sided_differences", "finite_differences", "forward_mode")
#: The differences' relative steps: float32's epsilon ** (1/3) (central) and ** (1/2) (one-sided),
#: the textbook balances of truncation against rounding. Smaller steps are more accurate against
#: forward mode on ReLU networks (a kink makes the truncation first order in ``e``; measured by
#: ``python -m keras_hoopt.benchmarks.difference_accuracy``) but did not train better: one-sided
#: differences at 1e-5 took 31 epochs to Adam's best on the CNN over three seeds, against 25 at
#: epsilon ** (1/2) and 24 for central differences at epsilon ** (1/3) (docs/benchmarks.md).
FD_STEP = float(2.0 ** -23) ** (1.0 / 3.0)
ONE_SIDED_STEP = float(2.0 ** -23) ** 0.5
#: What TensorFlow raises where the model's call cannot be re-run under ``keras.StatelessScope``,
#: or traced by forward mode (an op without a gradient or a forward rule, a while loop over
#: TensorLists): re-raised as :class:`ProductsUnavailable`.
_UNTRACEABLE = (LookupError, TypeError, ValueError, NotImplementedError)


class ProductsUnavailable(RuntimeError):
    """The model's call cannot be re-run (or differentiated in forward mode) for the curvature products.

    Raised only around the model's own call, so that an error in this
    module's code is never taken for it; ``cause`` (and ``__cause__``, which
    TensorFlow drops where it re-raises from inside a ``tf.cond`` branch) is
    TensorFlow's error. ``step_size="auto"`` falls back to the fixed step on it.
    """

    def __init__(self, message, cause=None):
        super().__init__(message)
        self.cause = cause


def _dot(a, b):
    return tf.add_n([tf.reduce_sum(tf.cast(x, tf.float32) * tf.cast(y, tf.float32)) for x, y in zip(a, b)])


def minimise_in_span(b, m, max_momentum=MAX_MOMENTUM):
    """``(c, ok)``: the ``c`` minimising ``b . c + 1/2 c^T m c`` with ``0 <= c_2 <= max_momentum``.

    ``b``: ``[2]``; ``m``: ``[2, 2]`` symmetric positive definite. The
    unconstrained minimiser solves ``m c = -b``; where its ``c_2`` (the
    momentum) falls outside ``[0, max_momentum]`` the constrained minimiser
    has ``c_2`` on the nearer bound and ``c_1 = -(b_1 + m_12 c_2) / m_11``
    (the model is convex, so that is the constrained optimum). When the
    second direction is zero or parallel to the first (the first step, no
    momentum yet) ``c_2 = 0``. ``ok`` is False when ``m_11`` is not positive
    or the result is not finite.
    """
    m00, m01, m11 = m[0, 0], m[0, 1], m[1, 1]
    det = m00 * m11 - m01 * m01
    two = tf.logical_and(m11 > 0.0, det > _PARALLEL * tf.abs(m00 * m11))
    safe = tf.where(two, det, 1.0)
    momentum = tf.where(two, -(m00 * b[1] - m01 * b[0]) / safe, 0.0)
    momentum = tf.clip_by_value(momentum, 0.0, max_momentum)
    c = tf.stack([-(b[0] + m01 * momentum) / tf.where(m00 > 0.0, m00, 1.0), momentum])
    ok = tf.logical_and(m00 > 0.0, linalg.all_finite(c))
    return c, ok


def model_change(c, b, m):
    """``q(c) = b . c + 1/2 c^T m c``: the change of the loss the quadratic model predicts."""
    return tf.tensordot(b, c, 1) + 0.5 * tf.tensordot(c, tf.linalg.matvec(m, c), 1)


def reduction_ratio(loss_before, loss_after, predicted_change):
    """``rho = actual / predicted change`` (0 where the prediction is not a decrease or the loss is not finite)."""
    actual = loss_after - loss_before
    trusted = tf.logical_and(tf.math.is_finite(actual), predicted_change < 0.0)
    return tf.where(trusted, actual / tf.where(trusted, predicted_change, -1.0), 0.0)


def adapted_damping(damping, rho, interval, min_damping=MIN_DAMPING):
    """The Levenberg-Marquardt rule: ``lambda`` after a measured ``rho`` (see the module docstring)."""
    omega = LM_DECAY ** interval
    factor = tf.where(rho < LM_LOWER_RHO, 1.0 / omega, tf.where(rho > LM_UPPER_RHO, omega, 1.0))
    return tf.clip_by_value(damping * factor, min_damping, MAX_DAMPING)


def _single_output(y_pred):
    if isinstance(y_pred, dict):
        y_pred = list(y_pred.values())
    if isinstance(y_pred, (list, tuple)):
        if len(y_pred) != 1:
            raise ValueError("step_size='quadratic_model' supports single-output models only.")
        y_pred = y_pred[0]
    return y_pred


class QuadraticModel:
    """Curvature-vector products and losses of one step's batch, as functions of the weights.

    Args:
        session: the :class:`~keras_hoopt.capture.CaptureSession` (re-runs the model).
        record: this step's :class:`~keras_hoopt.capture.ForwardRecord`.
        variables: the variables the directions live on.
        identity: ``(family, from_logits)`` of the loss (:func:`keras_hoopt.fisher.loss_identity`).
        batch_fraction: the share of the batch (its leading examples) the
            curvature products are computed on (float in ``(0, 1]``); the
            losses always use the whole batch.
        products: how ``J u`` is formed, one of :data:`PRODUCTS` (module docstring).
        direction_signs: ``+1.0`` or ``-1.0`` per direction (Python floats; ``None``: all ``+1``).
            The model's directions are ``u_i = s_i d_i`` for the ``d_i`` given to
            :meth:`curvature_matrix`, so a negated direction costs no pass over the weights:
            the sign goes on the differences' step (``theta + (s_i e) d_i``) or on the
            forward-mode tangent.
        direction_norms: the global norms ``|d_i|``, where the caller has them already (the
            diagonal of their Gram matrix); ``None`` computes them. They set the differences'
            steps only.
    """

    #: What each value of ``products`` computes ``J u`` with (``"auto"`` resolves in :meth:`_products`).
    _JVPS = {
        "one_sided_differences": "_one_sided_difference_jvps",
        "finite_differences": "_finite_difference_jvps",
        "forward_mode": "_forward_mode_jvps",
    }

    def __init__(
        self, session, record, variables, identity, batch_fraction=1.0, products="auto", direction_signs=None,
        direction_norms=None,
    ):
        self.session, self.record, self.variables, self.identity = session, record, variables, identity
        self.batch_fraction = float(batch_fraction)
        self.products = products
        self.direction_signs, self.direction_norms = direction_signs, direction_norms

    def _curvature_call(self):
        """The recorded ``(args, kwargs)``, every batch-shaped tensor cut to its first ``batch_fraction``."""
        args, kwargs = self.record.model_call
        if self.batch_fraction >= 1.0:
            return args, kwargs
        leaves = [t for t in tf.nest.flatten(args) if tf.is_tensor(t) and t.shape.rank]
        if not leaves:
            return args, kwargs
        batch = tf.shape(leaves[0])[0]
        examples = tf.maximum(1, tf.cast(tf.math.ceil(self.batch_fraction * tf.cast(batch, tf.float32)), tf.int32))

        def cut(t):
            # Tensors whose leading dimension is the batch's (inputs, masks): their first examples.
            batched = tf.is_tensor(t) and t.shape.rank and t.shape[0] == leaves[0].shape[0]
            return t[:examples] if batched else t

        return tf.nest.map_structure(cut, args), tf.nest.map_structure(cut, kwargs)

    def _forward(self, values, after=None, call=None, output=None):
        """``(y_pred, after(y_pred))`` of the training call with ``variables`` set to ``values``, stateless.

        ``output``: the call's output at ``values`` where it is already known (the training pass's):
        then only ``after`` runs in the scope, the model is not re-run.
        """
        args, kwargs = call if call is not None else self.record.model_call
        with keras.StatelessScope(state_mapping=list(zip(self.variables, values)), collect_losses=True):
            y_pred = output
            if y_pred is None:
                try:
                    y_pred = self.session.rerun(args, kwargs)
                except _UNTRACEABLE as error:
                    raise ProductsUnavailable(
                        f"the model's call could not be re-run for the quadratic model's curvature products "
                        f"({type(error).__name__}: {str(error)[:300]})", cause=error
                    ) from error
            extra = after(y_pred) if after is not None else None
        return y_pred, extra

    def curvature_matrix(self, directions):
        """``[k, k]`` with entries ``u_i^T C u_j`` (this worker's batch) for ``k`` directions.

        ``directions``: ``k`` lists of tensors ``d_i`` shaped like ``variables``,
        ``u_i = s_i d_i`` (``direction_signs``). One
        Jacobian-vector product per direction (``products``: two forward
        passes, or one forward-mode pass), over the first ``batch_fraction``
        of the batch.
        """
        call = self._curvature_call()
        jvps, y_pred = getattr(self, self._JVPS[self._products()])(directions, call)
        family, from_logits = self.identity
        k = len(directions)
        rows = [[None] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                rows[i][j] = rows[j][i] = output_quadratic_form(family, from_logits, y_pred, jvps[i], jvps[j])
        return tf.stack([tf.stack(r) for r in rows])

    def _products(self):
        """``products`` with ``"auto"`` resolved (module docstring)."""
        return resolve_products(self.products, self._layers(), self.variables)

    def _layers(self):
        model = getattr(self.session, "model", None)
        return model._flatten_layers(include_self=True) if model is not None else []

    def _reproducible(self):
        """Whether a re-run of the curvature call returns the training pass's own output.

        Not where a layer draws random numbers (Dropout, GaussianNoise: any
        layer holding a ``keras.random.SeedGenerator``, whose state the
        training pass advanced), and not on part of the batch.
        """
        return self.batch_fraction >= 1.0 and self._whole_batch_reproducible()

    def _whole_batch_reproducible(self):
        """Whether a re-run of the whole training call returns the training pass's own output."""
        if self.record.model_output is None:
            return False
        return not any(getattr(layer, "_seed_generators", None) for layer in self._layers())

    def _training_loss_reusable(self):
        """Whether ``L(theta)`` can be taken from the training pass's output: a re-run reproduces it and
        no layer added a loss in that call (activity regularisers, ``add_loss``), whose tensors a
        stateless scope would not see; weight regularisers are recomputed from the weights either way."""
        return self._whole_batch_reproducible() and self.record.added_losses is False

    def _signs(self, directions):
        return list(self.direction_signs) if self.direction_signs is not None else [1.0] * len(directions)

    def _forward_mode_jvps(self, directions, call):
        jvps, y_pred = [], None
        for direction, sign in zip(directions, self._signs(directions)):
            primals = [tf.cast(tf.convert_to_tensor(v), v.dtype) for v in self.variables]
            tangents = [tf.cast(d, v.dtype) for d, v in zip(direction, self.variables)]
            tangents = tangents if sign == 1.0 else [sign * t for t in tangents]
            with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                y_pred = _single_output(self._forward(primals, call=call)[0])
            jvps.append(accumulator.jvp(y_pred, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        return jvps, y_pred

    def _difference_steps(self, values, directions, relative_step):
        """``e`` per direction: ``relative_step max(|theta|, 1) / |d|`` (global norms)."""
        scale = tf.maximum(tf.linalg.global_norm([tf.cast(v, tf.float32) for v in values]), 1.0)
        norms = self.direction_norms
        if norms is None:
            norms = [tf.linalg.global_norm([tf.cast(d, tf.float32) for d in direction]) for direction in directions]
        return [relative_step * scale / tf.where(norm > 0.0, norm, 1.0) for norm in norms]

    def _output_at(self, values, direction, step, call):
        """``f(theta + step u)`` in float32."""
        moved = [v + tf.cast(step, v.dtype) * tf.cast(d, v.dtype) for v, d in zip(values, direction)]
        return tf.cast(_single_output(self._forward(moved, call=call)[0]), tf.float32)

    def _one_sided_difference_jvps(self, directions, call):
        """One-sided differences (module docstring): ``([J u_i], f(theta))``, two or three passes for two."""
        values = [tf.convert_to_tensor(v) for v in self.variables]
        if self._reproducible():
            base = tf.cast(_single_output(self.record.model_output), tf.float32)
        else:
            base = tf.cast(_single_output(self._forward(values, call=call)[0]), tf.float32)
        steps = self._difference_steps(values, directions, ONE_SIDED_STEP)
        signs = self._signs(directions)
        jvps = [(self._output_at(values, d, s * e, call) - base) / e for d, e, s in zip(directions, steps, signs)]
        return jvps, base

    def _finite_difference_jvps(self, directions, call):
        """Central differences (module docstring): ``([J u_i], f(theta))``, four forward passes for two."""
        values = [tf.convert_to_tensor(v) for v in self.variables]
        jvps, outputs = [], []
        steps = self._difference_steps(values, directions, FD_STEP)
        for direction, step, s in zip(directions, steps, self._signs(directions)):
            ends = [self._output_at(values, direction, end * s * step, call) for end in (1.0, -1.0)]
            jvps.append((ends[0] - ends[1]) / (2.0 * step))
            outputs.append(0.5 * (ends[0] + ends[1]))
        return jvps, tf.add_n(outputs) / float(len(outputs))

    def losses(self, model, delta):
        """``[L(theta), L(theta + delta)]``: the training loss (mean) of this worker's batch, stateless.

        ``L(theta)`` from the training pass's output where that is what a re-run would compute
        (:meth:`_training_loss_reusable`); ``L(theta + delta)`` from a re-run.
        """
        if self.record.data is None:
            raise ValueError(
                "damping_control='lm' recomputes the training loss of the step's batch, which it "
                "reads from the model's train_step: train with model.fit / model.train_on_batch."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(self.record.data)

        def loss(y_pred):
            # Under tf.distribute Keras divides each replica's loss by the replica count (so that
            # summed gradients are the global mean's); this replica's own mean is wanted here.
            return unscale_loss_for_distribution(
                model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            )

        values = [tf.convert_to_tensor(v) for v in self.variables]
        shifted = [v + tf.cast(d, v.dtype) for v, d in zip(values, delta)]
        known = self.record.model_output if self._training_loss_reusable() else None
        before = self._forward(values, after=loss, output=known)[1]
        after = self._forward(shifted, after=loss)[1]
        return tf.stack([tf.cast(before, tf.float32), tf.cast(after, tf.float32)])


def resolve_products(products, layers, variables):
    """``products`` with ``"auto"`` resolved: one-sided differences where every layer computes, and
    every variable of the directions is stored, in float32; forward mode otherwise (module docstring)."""
    if products != "auto":
        return products
    in_float32 = all(tf.as_dtype(v.dtype) == tf.float32 for v in variables) and all(
        getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") == "float32" for layer in layers
    )
    return "one_sided_differences" if in_float32 else "forward_mode"


def between_measurements(measured, measured_now, stored, norms):
    """The curvature products of a step where they may not have been measured (``quadratic_model_interval``).

    ``measured``: ``[k, k]`` products ``u_i^T C u_j`` (used only where
    ``measured_now``); ``stored``: ``[k, k]`` products per unit length
    ``R_ij = u_i^T C u_j / (|u_i| |u_j|)`` of the last measurement;
    ``norms``: ``[k]``, this step's ``|u_i|``. Returns ``(curvature, per_unit,
    keep, velocity_seen)``: ``measured`` or ``R_ij |u_i| |u_j|``; the
    ``R`` of this measurement (an entry of a direction of length 0, the
    velocity of the first step, stays as stored); whether to store it (a
    measured step whose ``R`` is finite); whether the last direction's
    curvature is known (measured now or before: otherwise the model sees only
    the damping along it and would ask for the largest momentum).
    """
    lengths = norms[:, None] * norms[None, :]
    positive = lengths > 0.0
    per_unit = tf.where(positive, measured / tf.where(positive, lengths, 1.0), stored)
    keep = tf.logical_and(measured_now, linalg.all_finite(per_unit))
    velocity_seen = tf.logical_or(measured_now, stored[-1, -1] > 0.0)
    return tf.where(measured_now, measured, stored * lengths), per_unit, keep, velocity_seen


def gram_matrix(directions):
    """``[k, k]`` with entries ``u_i . u_j`` (each pair's product computed once: the matrix is symmetric)."""
    k = len(directions)
    dots = {(i, j): _dot(directions[i], directions[j]) for i in range(k) for j in range(i, k)}
    return tf.stack([tf.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)])


def gradient_components(gradients, directions):
    """``[k]`` with entries ``g . u_i``."""
    return tf.stack([_dot(gradients, d) for d in directions])

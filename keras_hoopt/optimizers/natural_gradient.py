"""Exact natural gradient: the full Fisher of a small model, from per-example Jacobians."""

import keras
import numpy as np
import tensorflow as tf

from keras_hoopt.capture import replica_id
from keras_hoopt.fisher import loss_identity, make_output_sampler, output_hessian
from keras_hoopt.optimizers._exact import ExactOptimizer, forward_jacobian, per_example_weights
from keras_hoopt.optimizers._validation import check

#: Accepted values of ``fisher``.
EXACT_FISHER_TYPES = ("exact", "mc", "empirical")


def _single_loss(loss):
    """The one loss of a single-output model, or ``None`` for several losses."""
    if isinstance(loss, dict):
        return list(loss.values())[0] if len(loss) == 1 else None
    if isinstance(loss, (list, tuple)):
        return loss[0] if len(loss) == 1 else None
    return loss


def _describe(loss):
    if isinstance(loss, str):
        return repr(loss)
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


@keras.saving.register_keras_serializable(package="keras_hoopt")
class NaturalGradient(ExactOptimizer):
    """Exact natural gradient for small Keras 3 models (any layer types).

    Forms the full ``P x P`` Fisher of all trainable parameters of this batch
    and takes the damped natural-gradient step::

        F   = (1/N) sum_n w_n J_n^T H_n J_n          (fisher="exact")
            = (1/N) sum_n w_n g~_n g~_n^T            (fisher="mc", g~_n: sampled-label gradient)
            = (1/N) sum_n g_n g_n^T                  (fisher="empirical", g_n: training-label gradient)
        p   = (F + lambda I)^-1 grad
        v   <- momentum * v - lr * p ;   w <- w + v      (if the step is accepted)

    ``lambda`` starts at ``damping`` and is adapted by a Levenberg-Marquardt
    rule (``step_control="lm"``): the batch's loss is recomputed at the
    proposed weights, a step that does not lower it is rejected, and ``lambda``
    grows when the quadratic model overpromised, shrinks back towards
    ``damping`` when it was accurate (docs/exact.md, "Step control").

    ``J_n = d y_pred_n / d theta`` is the per-example Jacobian of the model
    output w.r.t. the flat parameter vector ``theta`` (see
    :meth:`parameter_layout`), ``H_n`` the expected Hessian of ONE example's
    Keras loss w.r.t. that output under the loss's predictive distribution
    (softmax cross-entropy: ``diag(p) - p p^T`` on logits; mean squared error
    over ``K`` outputs: ``(2/K) I``, i.e. the Gaussian ``N(y_pred, K/2)``;
    binary cross-entropy: ``diag(s(1-s))/K`` on logits) and ``w_n`` the sample
    weight. This is the generalised Gauss-Newton matrix; on a linear
    least-squares model it equals the Hessian, so one step with
    ``learning_rate=1`` lands on the optimum.

    Conventions match :class:`keras_hoopt.KFAC`: ``g_n`` is the gradient of ONE
    example's loss (``N`` times the gradient of Keras's mean-reduced batch
    loss w.r.t. example ``n``'s output); ``fisher="mc"`` samples one label per
    example with :func:`keras_hoopt.fisher.make_output_sampler`, the sampler
    K-FAC uses, so that ``E[g~ g~^T] = J^T H J`` exactly; ``fisher="exact"`` is
    that expectation in closed form. With a single Dense layer and MSE the
    exact Fisher is a Kronecker product and K-FAC's step equals this one.
    Regularization losses enter the gradient, not the Fisher.

    How it gets the batch: at ``model.compile`` the optimizer wraps
    ``compute_loss`` on the model instance to record ``(x, y, sample_weight)``
    of each training step, and in its update recomputes the forward pass as a
    function of ``theta`` inside a ``keras.StatelessScope`` (no side effects:
    BatchNormalization statistics and metrics are not updated twice; Dropout
    draws another mask than the training pass). The per-example Jacobians
    ``J_n`` of the whole batch's output (so BatchNormalization's coupling of
    examples is exact) come from forward-mode differentiation vectorised over
    the ``P`` parameter directions (``tf.autodiff.ForwardAccumulator`` in
    ``tf.vectorized_map``): ``P`` forward passes, not ``N K`` backward passes.
    Works with ``jit_compile`` on or off, ``run_eagerly``, mixed precision and
    ``tf.distribute`` (the Fisher is averaged over replicas).

    Args:
        learning_rate: float or schedule. Default 1.0 (the exact step).
        damping: Tikhonov damping added to ``F`` (float > 0 or schedule of
            the step). Default 1.0. With ``step_control="lm"`` it is the
            initial value and the floor of the adapted ``lambda``
            (:meth:`current_damping`); with ``None`` it is used as given. A
            failed Cholesky solve is retried with 10x, 100x and 1000x the
            damping; if all fail the raw gradient is used and
            :attr:`failed_solves` counts it.
        momentum: in ``[0, 1)``. Default 0.
        nesterov: Nesterov momentum. Default False.
        fisher: ``"exact"`` (closed-form expectation; default), ``"mc"`` (one
            sampled label per example) or ``"empirical"`` (training labels;
            any mean-reduced loss). ``"exact"`` and ``"mc"`` need a single
            ``[batch, K]`` output with (sparse) categorical cross-entropy,
            binary cross-entropy or mean squared error, and at most one sample
            weight per example.
        seed: integer seed of the Monte-Carlo label sampler.
        max_parameters: refuse (``ValueError`` at compile/build) models with
            more trainable parameters: the Fisher costs ``O(P^2)`` memory and
            ``O(N K P^2 + P^3)`` time per step. Default 5000.
        jacobian_chunk_size: parameter directions differentiated at once
            (None: all ``P``). Memory grows with ``chunk * N *`` (activations
            per example); lower it for larger batches or models.
        step_control: ``"lm"`` (default): Levenberg-Marquardt control; two
            extra forward passes per step. A rejected step changes no weight,
            resets the momentum and is counted in :attr:`rejected_steps`.
            ``None``: every finite step is applied with ``lambda = damping``.
        on_nonfinite: ``"skip"`` (default) or ``"raise"``. A step whose
            gradient, Fisher or update holds NaN/Inf never applies anything
            (weights, momenta and ``lambda`` keep their values) and is counted
            in :attr:`skipped_steps`; ``"raise"`` asks the training loop to
            raise ``FloatingPointError`` after it.
        model: optional; attached automatically by ``model.compile``.
        **kwargs: ``keras.optimizers.Optimizer`` arguments (``clipnorm``,
            ``weight_decay``...).
    """

    _replica_reduction = "mean"
    _matrix_name = "Fisher"

    def __init__(
        self,
        learning_rate=1.0,
        damping=1.0,
        momentum=0.0,
        nesterov=False,
        fisher="exact",
        seed=None,
        max_parameters=5000,
        jacobian_chunk_size=None,
        step_control="lm",
        on_nonfinite="skip",
        model=None,
        name="natural_gradient",
        **kwargs,
    ):
        check("fisher", fisher, fisher in EXACT_FISHER_TYPES, " or ".join(repr(f) for f in EXACT_FISHER_TYPES))
        check("seed", seed, seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)), "None or an int")
        super().__init__(
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            nesterov=nesterov,
            max_parameters=max_parameters,
            jacobian_chunk_size=jacobian_chunk_size,
            step_control=step_control,
            on_nonfinite=on_nonfinite,
            name=name,
            **kwargs,
        )
        self.fisher = fisher
        self.seed = None if seed is None else int(seed)
        self._sampler_seed = int(np.random.randint(0, 2**30)) if seed is None else int(seed)
        self._family = None
        self._sampler = None
        if model is not None:
            self.attach(model)

    def _validate_loss(self, loss):
        if self.fisher == "empirical" or loss is None:
            return
        if self.fisher == "mc":
            self._sampler = make_output_sampler(loss)  # raises for unsupported losses
        single = _single_loss(loss)
        identity = loss_identity(single) if single is not None else None
        if identity is None:
            raise ValueError(
                f"fisher={self.fisher!r} does not support the loss {_describe(loss)}: supported "
                "losses are sparse_categorical_crossentropy, categorical_crossentropy, "
                "binary_crossentropy and mean_squared_error (one output). Use fisher='empirical' "
                "for other losses."
            )
        self._family = identity

    def _sample_seed(self):
        step = tf.cast(tf.convert_to_tensor(self.iterations), tf.int32)
        return tf.stack([tf.constant(self._sampler_seed, tf.int32) + 7919 * replica_id(), step])

    def _single_output(self, y_pred):
        flat = tf.nest.flatten(y_pred)
        if len(flat) != 1:
            raise ValueError(f"fisher={self.fisher!r} supports single-output models only; use fisher='empirical'.")
        out = flat[0]
        if out.shape.rank != 2:
            raise ValueError(
                f"fisher={self.fisher!r} needs a model output of shape [batch, K]; got rank "
                f"{out.shape.rank}. Use fisher='empirical'."
            )
        return out

    def _batch_curvature(self, theta, batch, variables, replicas):
        if self.fisher != "empirical" and self._family is None:
            raise ValueError(
                f"fisher={self.fisher!r} needs the model's loss: compile the model with this "
                "optimizer (model.compile(optimizer=..., loss=...))."
            )

        def flat_outputs(y_pred, n):
            return tf.concat([tf.reshape(tf.cast(o, tf.float32), [n, -1]) for o in tf.nest.flatten(y_pred)], 1)

        if self.fisher == "empirical":

            def output_grads(y_pred):
                outputs = tf.nest.flatten(y_pred)
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(outputs)
                    loss = self._training_loss(batch, y_pred)
                return tape.gradient(loss, outputs, unconnected_gradients="zero")

            y_pred, grads = self._forward(theta, batch, variables, after=output_grads)
            n = tf.shape(tf.nest.flatten(y_pred)[0])[0]
            # g_n = N * dL/dy_n (times replicas: Keras scales each replica's loss by 1/replicas).
            r = flat_outputs(grads, n) * (tf.cast(n, tf.float32) * float(replicas))
            weights = None
        else:
            y_pred, _ = self._forward(theta, batch, variables)
            out = tf.cast(self._single_output(y_pred), tf.float32)
            n = tf.shape(out)[0]
            weights = per_example_weights(batch.sample_weight, n)
            if self.fisher == "mc":
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(out)
                    sampled = self._sampler(out, self._sample_seed())
                r = tape.gradient(sampled, out)  # per-example: the sampled loss is a sum

        # columns[p, n, m] = d y_pred[n, m] / d theta[p] (forward mode, vectorised over p).
        columns = forward_jacobian(
            lambda t: flat_outputs(self._forward(t, batch, variables)[0], n), theta, self.jacobian_chunk_size
        )
        size = tf.shape(theta)[0]
        if self.fisher == "exact":
            family, from_logits = self._family
            h = output_hessian(family, from_logits, out) * weights[:, None, None]
            hj = tf.einsum("nml,pnl->pnm", h, columns)
            fisher = tf.matmul(tf.reshape(columns, [size, -1]), tf.reshape(hj, [size, -1]), transpose_b=True)
        else:
            g = tf.einsum("nm,pnm->pn", tf.stop_gradient(r), columns)  # per-example gradients, [P, N]
            weighted = g if weights is None else g * weights[None, :]
            fisher = tf.matmul(weighted, g, transpose_b=True)
        return fisher / tf.cast(n, tf.float32)

    def get_config(self):
        config = super().get_config()
        config.update({"fisher": self.fisher, "seed": self.seed})
        return config

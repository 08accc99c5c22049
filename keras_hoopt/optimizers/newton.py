"""Damped Newton's method with the exact Hessian of a small model's training loss."""

import keras
import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.optimizers._exact import ExactOptimizer
from keras_hoopt.optimizers._validation import check


@keras.saving.register_keras_serializable(package="keras_hoopt")
class Newton(ExactOptimizer):
    """Damped (optionally saddle-free) Newton's method for small Keras 3 models.

    Forms the exact ``P x P`` Hessian of this batch's training loss (the
    model's ``compute_loss``: compiled loss, mean over the batch, plus
    regularization losses) w.r.t. the flat vector ``theta`` of all trainable
    parameters (see :meth:`parameter_layout`) and steps::

        H   = d^2 loss / d theta^2                    (symmetrised)
        p   = (H + lambda I)^-1 grad                  (saddle_free=False: Cholesky)
        p   = (|H| + lambda I)^-1 grad                (saddle_free=True: |H| = V |diag(e)| V^T)
        v   <- momentum * v - lr * p ;   w <- w + v      (if the step is accepted)

    ``lambda`` starts at ``damping`` and is adapted by the Levenberg-Marquardt
    rule of :class:`keras_hoopt.NaturalGradient` (``step_control="lm"``; the
    quadratic model uses ``H`` itself, also with ``saddle_free=True``).
    ``H + lambda I`` must be positive definite for the Cholesky solve: a
    failed factorisation is retried with 10x, 100x and 1000x the damping (the
    LM rule continues from the damping that worked, or from 1000x), and if
    all fail the raw gradient is used (counted in :attr:`failed_solves`).
    Near a saddle point or on a non-convex loss use ``saddle_free=True``
    (Dauphin et al. 2014): negative-curvature directions are followed
    downhill, scaled by ``1 / (|e| + damping)``. It uses ``eigh``, which XLA
    (``jit_compile=True``) expands into slow Jacobi sweeps; prefer
    ``jit_compile=False`` with it.

    The Hessian is the Jacobian of the gradient (nested ``tf.GradientTape``,
    ``pfor``-vectorised over the ``P`` rows), recomputed from the batch
    recorded by the model's ``compute_loss`` inside a ``keras.StatelessScope``
    (see :class:`keras_hoopt.NaturalGradient` for how the batch is obtained).

    Args:
        learning_rate: float or schedule. Default 1.0 (the Newton step).
        damping: ``lambda > 0`` (float or schedule). Default 1.0. With
            ``step_control="lm"`` the initial value and the floor of the
            adapted ``lambda`` (:meth:`current_damping`).
        momentum: in ``[0, 1)``. Default 0.
        nesterov: Nesterov momentum. Default False.
        saddle_free: use ``|H|`` (absolute eigenvalues). Default False.
        max_parameters: refuse (``ValueError`` at compile/build) models with
            more trainable parameters. Default 5000.
        jacobian_chunk_size: Hessian rows vectorised at once (None: all ``P``).
        step_control: ``"lm"`` (default) or ``None``, as in
            :class:`keras_hoopt.NaturalGradient`; rejected steps are counted in
            :attr:`rejected_steps`.
        on_nonfinite: ``"skip"`` (default) or ``"raise"``, as in
            :class:`keras_hoopt.NaturalGradient`; skipped steps are counted in
            :attr:`skipped_steps`.
        model: optional; attached automatically by ``model.compile``.
        **kwargs: ``keras.optimizers.Optimizer`` arguments.
    """

    _replica_reduction = "sum"  # Keras scales each replica's loss by 1/replicas.
    _matrix_name = "Hessian"

    def __init__(
        self,
        learning_rate=1.0,
        damping=1.0,
        momentum=0.0,
        nesterov=False,
        saddle_free=False,
        max_parameters=5000,
        jacobian_chunk_size=None,
        step_control="lm",
        on_nonfinite="skip",
        model=None,
        name="newton",
        **kwargs,
    ):
        check("saddle_free", saddle_free, isinstance(saddle_free, bool), "True or False")
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
        self.saddle_free = saddle_free
        if model is not None:
            self.attach(model)

    def _batch_curvature(self, theta, batch, variables, replicas):
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(theta)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(theta)
                _, loss = self._forward(theta, batch, variables, after=lambda y_pred: self._training_loss(batch, y_pred))
            grad = inner.gradient(loss, theta, unconnected_gradients="zero")
        hessian = outer.jacobian(grad, theta, parallel_iterations=self.jacobian_chunk_size, unconnected_gradients="zero")
        return linalg.symmetrize(hessian)

    def _solve(self, matrix, grad, damping):
        if not self.saddle_free:
            return super()._solve(matrix, grad, damping)
        matrix = tf.cast(linalg.symmetrize(matrix), tf.float64)
        values, vectors = tf.linalg.eigh(matrix)
        coords = tf.linalg.matvec(vectors, tf.cast(grad, tf.float64), transpose_a=True)
        coords = coords / (tf.abs(values) + tf.cast(damping, tf.float64))
        solution = tf.linalg.matvec(vectors, coords)
        return tf.cast(solution, tf.float32), linalg.all_finite(solution), tf.cast(damping, tf.float32)

    def get_config(self):
        config = super().get_config()
        config.update({"saddle_free": self.saddle_free})
        return config

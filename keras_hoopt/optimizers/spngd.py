"""SP-NGD: K-FAC with stale statistics and adaptive per-statistic refresh."""

import keras
import tensorflow as tf

from keras_hoopt.optimizers._validation import check, is_int, is_number
from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.refresh import AdaptiveInterval


# Layers whose kernel norm weight_rescaling caps at sqrt(2 d_out): the linear maps (K-FAC's
# output dimension d_out), not embeddings, normalisation scales or recurrent kernels.
_RESCALED_KINDS = ("dense", "einsum_dense", "conv1d", "conv2d", "conv3d")


@keras.saving.register_keras_serializable(package="keras_hoopt")
class SPNGD(CurvatureOptimizer):
    """Scalable and Practical Natural Gradient Descent (Osawa et al. 2020).

    K-FAC (see :class:`keras_hoopt.KFAC` for the blocks, damping, KL-clipping
    and conventions) whose statistics go stale on purpose: every statistic
    (each layer's ``A``, each ``G``, each BatchNorm ``F``) has its own refresh
    interval. A statistic is recomputed only when its interval has passed; the
    compiled step skips it otherwise (``tf.cond``), and a statistic's inverse is
    recomputed only when that statistic was (a K-FAC factor re-inverted alone
    uses the current pi; the other keeps the pi of its own last inversion).
    The interval adapts to how
    fast the statistic changes, with ``sim(X, Y) = ||X - Y||_F / ||Y||_F``
    against its values after the last two refreshes::

        sim(X, X_-1) >= alpha                      -> interval = max(1, interval // 2)
        sim(X, X_-1) < alpha, sim(X, X_-2) >= alpha -> interval unchanged
        both < alpha                               -> interval = min(max_interval,
                                                       interval + previous interval)

    (lengthening is Fibonacci-like: 1, 2, 3, 5, 8, ...). The exact law of the
    paper is not public; this is keras_hoopt's definition. With
    ``similarity_threshold=0`` every statistic refreshes every step and the
    trajectory equals ``KFAC(..., factor_update_interval=1,
    inverse_update_interval=1)``.

    ``curvature_summary()`` reports each statistic's ``intervals``,
    ``refreshes`` and ``inversions``: the work actually done.

    Args:
        learning_rate: float or schedule (e.g.
            :class:`keras_hoopt.schedules.PolynomialEpochDecay`, SP-NGD's decay);
            None (default): 1.0 with the quadratic model's step (it scales
            the model's minimiser), 0.01 with the fixed step
            (:mod:`keras_hoopt.optimizers.step_control`).
        damping: ``lambda > 0`` (float or schedule); None (default): 1e-4,
            Levenberg-Marquardt's initial value, with the quadratic model,
            1e-3 with the fixed step.
        momentum: in ``[0, 1)``. Default 0.9.
        momentum_rescaling: when the learning rate changes, use momentum
            ``mu * lr_t / lr_{t-1}`` for that step, so that a learning-rate drop
            also shrinks the velocity accumulated at the old rate. Default True.
        weight_rescaling: SP-NGD's alternative to weight decay: after each step
            every Dense/Conv2D kernel is rescaled to norm at most
            ``sqrt(2 * d_out)``. Default False.
        similarity_threshold: ``alpha >= 0``. Default 0.1.
        max_interval: cap of a refresh interval (int >= 1). Default 100.
        factor_decay, kl_clip, fisher, nesterov, seed, model, **kwargs: as KFAC.
    """

    def __init__(
        self,
        learning_rate=None,
        damping=None,
        momentum=0.9,
        nesterov=False,
        factor_decay=0.95,
        kl_clip="auto",
        fisher="auto",
        similarity_threshold=0.1,
        max_interval=100,
        momentum_rescaling=True,
        weight_rescaling=False,
        seed=None,
        model=None,
        name="spngd",
        **kwargs,
    ):
        check("similarity_threshold", similarity_threshold,
               is_number(similarity_threshold) and similarity_threshold >= 0, "a float >= 0")
        check("max_interval", max_interval, is_int(max_interval, 1), "an int >= 1")
        check("momentum_rescaling", momentum_rescaling, isinstance(momentum_rescaling, bool), "True or False")
        check("weight_rescaling", weight_rescaling, isinstance(weight_rescaling, bool), "True or False")
        policy = AdaptiveInterval(similarity_threshold, max_interval)
        super().__init__(
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            nesterov=nesterov,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
            fisher=fisher,
            seed=seed,
            model=model,
            name=name,
            **kwargs,
        )
        self._policy = policy
        self.momentum_rescaling = momentum_rescaling
        self.weight_rescaling = weight_rescaling

    @property
    def refresh_policy(self):
        return self._policy

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._previous_learning_rate = self.add_variable((), "zeros", "float32", name="previous_learning_rate")
        if self.weight_rescaling:
            for block, indices, _ in self._attachment.blocks:
                if block.kind in _RESCALED_KINDS:
                    self._norm_caps[indices[0]] = float((2.0 * block.output_dim) ** 0.5)

    def _momentum_coefficient(self, learning_rate):
        mu = tf.constant(self.momentum, tf.float32)
        previous = tf.convert_to_tensor(self._previous_learning_rate)
        if self.momentum_rescaling:
            mu = tf.where(previous > 0.0, mu * learning_rate / tf.maximum(previous, 1e-30), mu)
        return mu, [(self._previous_learning_rate, learning_rate)]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "similarity_threshold": self._policy.similarity_threshold,
                "max_interval": self._policy.max_interval,
                "momentum_rescaling": self.momentum_rescaling,
                "weight_rescaling": self.weight_rescaling,
            }
        )
        return config

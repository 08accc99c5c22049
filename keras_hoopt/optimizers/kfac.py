"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015)."""

import keras

from keras_hoopt.optimizers._validation import check, is_int
from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.refresh import FixedInterval


@keras.saving.register_keras_serializable(package="keras_hoopt")
class KFAC(CurvatureOptimizer):
    """K-FAC optimizer for Keras 3 models (Dense, Conv2D, BatchNormalization).

    Each supported layer's Fisher block is approximated by a Kronecker product
    ``A (x) G`` of the second moments of its inputs ``a`` and of the per-example
    gradients ``g`` of the loss w.r.t. its (pre-activation) outputs; BatchNorm
    layers get an exact unit-wise 2x2 Fisher per channel. The update is::

        p_l = (A_l + pi sqrt(lambda) I)^-1 grad_l (G_l + sqrt(lambda)/pi I)^-1
        nu  = min(1, sqrt(kl_clip / (lr^2 sum_l <p_l, grad_l>)))
        v   <- momentum * v - lr * nu * p ;   w <- w + v

    Conventions: ``g`` is the gradient of ONE example's loss (with Keras's
    mean-reduced loss, the captured ``dy`` times the global batch size);
    ``A = E[a a^T]`` (bias folded in as a trailing 1), ``G = E[g g^T]``; for
    Conv2D ``A = E_n[sum_t a_t a_t^T]`` over the ``|T|`` output locations and
    ``G = E_n[mean_t g_t g_t^T]`` (KFC), so the block is always ``A (x) G``.
    With ``damping -> 0``, ``learning_rate=1``, ``momentum=0``,
    ``factor_decay=0`` and ``kl_clip=None`` one step moves a Dense kernel
    ``W`` (out x in) by exactly ``-(G^-1 dW A^-1)`` of that batch.

    Layers without a block (Embedding, LayerNormalization, custom layers...)
    get the momentum-SGD update with the raw gradient, after one warning.

    Args:
        learning_rate: float or Keras learning-rate schedule; None (default):
            1.0 with the quadratic model's step (it scales the model's
            minimiser), 0.01 with the fixed step
            (:mod:`keras_hoopt.optimizers.step_control`).
        damping: Tikhonov damping ``lambda > 0`` (float or schedule); None
            (default): 1e-4, Levenberg-Marquardt's initial value, with the
            quadratic model, 1e-3 with the fixed step.
        momentum: in ``[0, 1)``. Default 0.9.
        nesterov: Nesterov momentum. Default False.
        factor_decay: statistics moving-average decay in ``[0, 1)``. Default 0.95.
        kl_clip: KL-clipping constant, None or ``"auto"`` (default: 1e-3 with
            ``step_size="fixed"``, None with ``"quadratic_model"``).
        fisher: ``"auto"`` (default), ``"empirical"`` or ``"mc"``: see
            :class:`~keras_hoopt.optimizers.base.CurvatureOptimizer`.
        factor_update_interval: recompute statistics every this many steps (>= 1).
        inverse_update_interval: recompute the damped inverses every this many
            steps (>= 1). Both are due at step 0.
        seed: seed of the Monte-Carlo label sampler.
        model: optional; attached automatically by ``model.compile``.
        **kwargs: ``keras.optimizers.Optimizer`` arguments (``weight_decay``
            -- decoupled, ``clipnorm``, ``global_clipnorm``...).

    References:
        Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
        Approximate Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored
        approximate Fisher matrix for convolution layers", ICML 2016. Ba, Grosse &
        Martens, "Distributed second-order optimization using Kronecker-factored
        approximations", ICLR 2017.
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
        factor_update_interval=1,
        inverse_update_interval=10,
        seed=None,
        model=None,
        name="kfac",
        **kwargs,
    ):
        for key, value in (
            ("factor_update_interval", factor_update_interval),
            ("inverse_update_interval", inverse_update_interval),
        ):
            check(key, value, is_int(value, 1), "an int >= 1")
        policy = FixedInterval(factor_update_interval, inverse_update_interval)
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

    @property
    def refresh_policy(self):
        return self._policy

    def get_config(self):
        config = super().get_config()
        config["factor_update_interval"] = self._policy.statistics_interval
        config["inverse_update_interval"] = self._policy.inverse_interval
        return config

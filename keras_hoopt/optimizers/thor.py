"""THOR: trace-based refresh decisions and block-split inverses."""

import keras

from keras_hoopt.optimizers._validation import check, is_int, is_number
from keras_hoopt.optimizers.base import CurvatureOptimizer
from keras_hoopt.refresh import TraceRule


@keras.saving.register_keras_serializable(package="keras_hoopt")
class THOR(CurvatureOptimizer):
    """Trace-based Hardware-driven layer-ORiented natural gradient (Chen et al. 2021).

    Uses K-FAC's blocks and update (see :class:`keras_hoopt.KFAC`) with two
    savings:

    * **Trace rule.** Statistics are recomputed every ``frequency`` steps. Then,
      per layer, with ``delta = | |tr(F_k + l I)| - |tr(F_{k-1} + l I)| | /
      |tr(F_{k-1} + l I)|``: ``delta > omega1`` recomputes the layer's inverses,
      ``omega2 <= delta <= omega1`` reuses the old ones, and ``delta < omega2``
      stops refreshing that layer for good (``curvature_summary()`` shows
      ``stopped``). ``(0.01, 0)`` is THOR, ``(0.01, 0.001)`` THOR_stop,
      ``(0, 0)`` THOR_NT.
    * **Matrix splitting.** Each Kronecker factor is inverted as diagonal blocks
      of ``split_dim`` (``O(d split_dim^2)`` instead of ``O(d^3)``), exact
      for factors not larger than ``split_dim``, kept and applied as blocks
      (:mod:`keras_hoopt.blocks.split`: each step costs
      ``d_in d_out (s_A + s_G)`` instead of ``d_in d_out (d_in + d_out)``).
      ``split_dim=None`` disables it.

    THOR's damping schedule ``damping0 * decay^(epoch / 10)`` is
    :class:`keras_hoopt.schedules.EpochExponentialDecay`; pass it as ``damping``.

    Args:
        learning_rate: float or schedule; None (default): 1.0 with the
            quadratic model's step (it scales the model's minimiser), 0.01
            with the fixed step (:mod:`keras_hoopt.optimizers.step_control`).
        damping: ``lambda > 0`` (float or schedule); None (default): 1e-4,
            Levenberg-Marquardt's initial value, with the quadratic model,
            0.03 with the fixed step.
        frequency: steps between statistics refreshes (int >= 1). Default 100.
        omega1, omega2: trace-rule thresholds, ``omega1 >= omega2 >= 0``.
        split_dim: block size of the split inverses (int >= 1 or None). Default 128.
        factor_decay: default 0 (each refresh uses its own batch, as THOR).
        momentum, nesterov, kl_clip, fisher, seed, model, **kwargs: as KFAC.
    """

    FIXED_STEP_DEFAULTS = {"damping": 0.03}

    def __init__(
        self,
        learning_rate=None,
        damping=None,
        momentum=0.9,
        nesterov=False,
        factor_decay=0.0,
        kl_clip="auto",
        fisher="auto",
        frequency=100,
        omega1=0.01,
        omega2=0.0,
        split_dim=128,
        seed=None,
        model=None,
        name="thor",
        **kwargs,
    ):
        check("frequency", frequency, is_int(frequency, 1), "an int >= 1")
        check("omega1", omega1, is_number(omega1) and omega1 >= 0, "a float >= 0")
        check("omega2", omega2, is_number(omega2) and 0 <= omega2 <= omega1, "a float in [0, omega1]")
        check("split_dim", split_dim, split_dim is None or is_int(split_dim, 1), "None or an int >= 1")
        if kwargs.get("preconditioner") in ("eigenbasis", "low_rank") and split_dim is not None:
            raise ValueError(
                f"preconditioner={kwargs['preconditioner']!r} has no split inverses: THOR needs "
                f"split_dim=None (got {split_dim!r})."
            )
        policy = TraceRule(frequency, omega1, omega2)
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
        self._split_dim = split_dim

    @property
    def refresh_policy(self):
        return self._policy

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "frequency": self._policy.frequency,
                "omega1": self._policy.omega1,
                "omega2": self._policy.omega2,
                "split_dim": self._split_dim,
            }
        )
        return config

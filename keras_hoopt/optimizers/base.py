"""Shared machinery of the curvature (natural-gradient) optimizers.

:class:`CurvatureOptimizer` is a ``keras.optimizers.Optimizer`` that

1. attaches to its model (at ``model.compile`` or via ``model=``) and installs
   capture of layer inputs and output gradients (:mod:`keras_hoopt.capture`);
2. in ``build`` maps the trainable variables to curvature blocks
   (:mod:`keras_hoopt.blocks`) and creates every state variable (statistics,
   inverses, counters, momenta) in a fixed order, so ``.keras`` files and
   checkpoints restore it;
3. runs each update step as the named stages of
   :class:`keras_hoopt.optimizers.step.CurvatureStep` (capture, batch
   statistics, reduce, fold, decide, refresh preconditioners, share,
   precondition, clip, apply).

This module is the Keras optimizer face: arguments, attachment, variables,
inspection and config. Blocks declare their preconditioner state
(:meth:`~keras_hoopt.blocks.CurvatureBlock.preconditioner_layout`);
model-parallel placement lives in :mod:`keras_hoopt.communication.sharing`.
Subclasses choose the refresh policy (:mod:`keras_hoopt.refresh`) and may
rescale the momentum (:meth:`CurvatureOptimizer._momentum_coefficient`).
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_hoopt import _compile_hook, _keras_compat
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.forms import FormOptions, in_form, preconditioner_forms
from keras_hoopt.communication import CHOICES as COMMUNICATION_CHOICES
from keras_hoopt.communication import make_communicator
from keras_hoopt.communication.placement import MODEL_PARALLEL_MODES, resolve_mode
from keras_hoopt.communication.sharing import Placement
from keras_hoopt.capture import CaptureSession, replica_id
from keras_hoopt.fisher import FISHER_TYPES, auto_output_sampler, make_output_sampler
from keras_hoopt.optimizers._validation import (
    FALLBACKS,
    check,
    check_keras_arguments,
    check_learning_rate,
    check_momentum,
    check_on_nonfinite,
    check_one_model,
    damping_config,
    damping_value,
    is_int,
    is_number,
)
from keras_hoopt.optimizers import step_control
from keras_hoopt.optimizers.quadratic_model import MAX_DAMPING, PRODUCTS as QM_PRODUCTS
from keras_hoopt.optimizers.step_control import AUTO, DAMPING_CONTROLS, STEP_SIZES
from keras_hoopt.optimizers.step import CurvatureStep
from keras_hoopt.refresh import BlockView
from keras_hoopt.refresh.base import (  # noqa: F401  (the counter layout, re-exported)
    FAILED_INVERSIONS,
    INVERSIONS,
    LAST_REFRESH,
    NONFINITE_SKIPS,
    NUM_COUNTERS,
    REFRESHES,
)


def _identity_initializer(shape, dtype=None):
    """The identity of a ``[..., n, n]`` statistic; ones for a diagonal ``(n,)`` one."""
    if len(shape) == 1:
        return tf.ones(shape, dtype=dtype or "float32")
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or "float32")


def _block_path(block):
    """The block's layer path in the model (Keras 3 layers have ``path``), else its name."""
    return getattr(block.layer, "path", None) or block.name


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
        self.placement = None  # keras_hoopt.communication.sharing.Placement, made in build

    # What the placement decided, for inspection.
    communicator = property(lambda self: self.placement.communicator if self.placement else None)
    mode = property(lambda self: self.placement.mode if self.placement else "off")
    owners = property(lambda self: self.placement.owners if self.placement else [])
    local_inversions = property(lambda self: self.placement.local_inversions if self.placement else None)
    bytes_sent = property(lambda self: self.placement.bytes_sent if self.placement else None)


class CurvatureOptimizer(keras.optimizers.Optimizer):
    """Base class: momentum SGD on Fisher-preconditioned gradients.

    Args:
        learning_rate: float or ``keras.optimizers.schedules.LearningRateSchedule``;
            None (default): 1.0 with the quadratic model's step (it scales the
            minimiser), the class's fixed-step value (0.01) otherwise
            (:mod:`keras_hoopt.optimizers.step_control`).
        damping: Tikhonov damping ``lambda`` (> 0), float or a schedule of the
            step (any ``LearningRateSchedule``); None (default): 1e-4 (the
            initial Levenberg-Marquardt ``lambda``) with the quadratic model,
            the class's fixed-step value (1e-3; THOR 0.03) otherwise.
        momentum: momentum ``mu`` in ``[0, 1)`` applied to the preconditioned
            gradient: ``v <- mu v - lr * p``, ``w <- w + v``.
        nesterov: Nesterov momentum.
        factor_decay: moving-average decay of the statistics in ``[0, 1)``:
            ``F <- decay * F + (1 - decay) * F_batch`` (0: this batch only; the
            first refresh takes the batch value).
        kl_clip: KL-clipping constant ``c > 0`` (Ba et al. 2017), ``None`` or
            ``"auto"`` (default: 1e-3 with ``step_size="fixed"``, None with
            ``"quadratic_model"``). With ``"fixed"`` the preconditioned
            gradients are scaled by ``min(1, sqrt(c / (lr^2 * sum_l <p_l, grad_l>)))``;
            with ``"quadratic_model"`` the chosen step by
            ``min(1, sqrt(c / delta^T C delta))`` (the exact Fisher ``C``).
        fisher: which output gradients build the factors: ``"empirical"``
            (training labels), ``"mc"`` (one label per example sampled from
            the model's predictive distribution) or ``"auto"`` (default:
            ``"mc"`` where the loss has a sampler and the model's one output
            is ``[batch, K]``, else ``"empirical"``; :mod:`keras_hoopt.fisher`).
            ``optimizer.fisher`` shows the one in use from the first step on.
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
        fallback: the update of trainable variables no curvature block
            preconditions (a layer type without a block): ``"adam"`` (default;
            Adam with Keras's defaults ``beta_1=0.9``, ``beta_2=0.999``,
            ``epsilon=1e-7``, as Keras's Muon treats what it does not
            orthogonalise) or ``"momentum"`` (the same momentum SGD as the
            preconditioned variables, on the raw gradient).
        fallback_lr_ratio: the fallback Adam's learning rate as a fraction of
            ``learning_rate`` (a float > 0, default 0.01: a curvature learning
            rate of 0.1-0.3 gives Adam 1e-3-3e-3); a schedule on
            ``learning_rate`` moves both together. Ignored by ``"momentum"``.
        on_nonfinite: what a step whose gradients or preconditioned update
            hold NaN/Inf does. It never applies anything: weights, momenta,
            statistics, inverses and counters keep their last good values
            (one fused finiteness check, the same decision on every worker),
            and ``skipped_steps`` counts it. ``"skip"`` (default) logs a
            rate-limited warning and trains on; ``"raise"`` raises
            ``FloatingPointError`` after the step (in ``fit`` /
            ``train_on_batch``), with the model still at its last good state.
        step_size: ``"auto"`` (default), ``"fixed"`` or ``"quadratic_model"``.
            ``"fixed"``: ``learning_rate``, ``momentum`` and ``kl_clip`` as
            given. ``"quadratic_model"``: every step the learning rate and
            momentum of the preconditioned variables are the minimiser of the
            damped quadratic model of the loss in the span of the
            preconditioned gradient and the previous update, from exact
            curvature-vector products on the step's batch (Martens & Grosse
            2015, sec. 7; kfac-jax's adaptive learning rate and momentum;
            :mod:`keras_hoopt.optimizers.quadratic_model`); ``learning_rate``
            then scales that minimiser (1.0: take it; a schedule still
            applies); ``momentum`` only needs to be > 0 to keep the previous
            update. Costs two forward-mode passes over the batch per step.
            Needs a loss whose output Hessian is known (the cross-entropies,
            mean squared error) on a single-output model. ``"auto"``: the
            quadratic model where the loss allows it and ``nesterov`` is
            False, else the fixed step, decided at ``compile``/``attach``
            (:mod:`keras_hoopt.optimizers.step_control`).
        damping_control: ``"auto"`` (default), None or ``"lm"``. ``"lm"``:
            ``damping`` is the initial ``lambda``, adapted every
            ``damping_control_interval`` steps by the Levenberg-Marquardt rule
            on ``rho`` = actual / predicted loss change of the step's batch
            (needs the quadratic model and a float ``damping``). ``"auto"``:
            ``"lm"`` with the quadratic model and a float damping, else None;
            in a custom training loop without ``train_step`` (no batch to
            re-evaluate) the damping then stays as given.
        damping_control_interval: steps between Levenberg-Marquardt
            adaptations (int >= 1, default 5, as kfac-jax).
        min_damping: the floor of the adapted ``lambda`` (float > 0, default
            1e-4). Below it, directions that the factors barely see (the
            inputs of dead ReLU units) get near-infinite preconditioned steps
            that the batch's quadratic model does not penalise, and training
            diverges (docs/choosing.md).
        quadratic_model_batch_fraction: the share of each step's batch (its
            leading examples) the quadratic model's curvature products are
            computed on: float in ``(0, 1]``, default 1.0. Their cost is
            proportional to it; the gradient, and the Levenberg-Marquardt
            losses, use the whole batch.
        quadratic_model_products: how the quadratic model's curvature-vector
            products ``J u`` are formed: ``"auto"`` (default:
            ``"one_sided_differences"`` where every layer computes in float32,
            else ``"forward_mode"``), ``"one_sided_differences"`` (one forward
            pass per direction against the training pass's own output, error
            ``O(e)``; one more pass where a layer draws random numbers),
            ``"finite_differences"`` (central differences of two forward
            passes per direction, error ``O(e^2)``) or ``"forward_mode"``
            (``tf.autodiff.ForwardAccumulator``: exact; on the deep
            autoencoder the stage costs 1.6x the central differences;
            :mod:`keras_hoopt.optimizers.quadratic_model`).
        quadratic_model_interval: steps between two measurements of the
            quadratic model's curvature products (int >= 1, default 4; 1:
            every step). In between, each step solves the model with the last
            measured curvature per unit length, ``u_i^T C u_j / (|u_i| |u_j|)``,
            at its own lengths, gradient and Gram matrix, so the step skips
            the products' forward passes; the first
            :data:`~keras_hoopt.optimizers.quadratic_model.MEASURED_FIRST_STEPS`
            steps always measure. On the benchmark suite 4 took the same
            epochs to Adam's best loss as 1 (46 against 46 over four
            workloads and two seeds) and cut the quadratic model's op time
            by 2-3x (docs/benchmarks.md). Where several workers communicate
            without conditional collectives the products are still computed
            every step (and used only on the measuring ones).
        preconditioner: the form of each Kronecker-factored block's
            preconditioner. ``"auto"`` (default): ``"low_rank"`` on the
            layers with a factor at least 4x and the other at least 2x
            ``preconditioner_rank`` wide (where the exact form's
            ``d_in d_out (d_in + d_out)`` per step is largest: the deep
            autoencoder's 784/1000 and 1000/500 layers; only the factors of
            at least 4x take it), ``"kronecker"`` elsewhere and
            wherever THOR's ``split_dim`` is set
            (:mod:`keras_hoopt.blocks.low_rank`; measured in
            docs/benchmarks.md). ``"kronecker"``: the damped inverses
            ``(A + pi sqrt(l) I)^-1 dW (G + sqrt(l)/pi I)^-1`` everywhere.
            ``"eigenbasis"`` (EKFAC: the factors' eigenbases with the
            per-example second moment of the gradients in them as the
            diagonal, ``Q_A [(Q_A^T dW Q_G) / (S + l)] Q_G^T``;
            :mod:`keras_hoopt.blocks.eigenbasis`). Blocks that are not
            Kronecker-factored (normalization, embeddings, depthwise,
            recurrent) keep their own form. The eigenbasis has no split
            inverses (THOR's ``split_dim`` must be None) and no
            ``model_parallel="gradients"`` (``"auto"`` then runs ``"off"``).
            ``"low_rank"``: each factor of size at least 4x
            ``preconditioner_rank`` keeps its top eigenpairs plus a scaled
            identity (the mean of the other eigenvalues), so that applying it
            costs ``2 k d_in d_out`` instead of ``d^2 d_out``
            (:mod:`keras_hoopt.blocks.low_rank`); smaller factors keep their
            damped inverse. No split inverses either.
        preconditioner_rank: the rank ``k`` of the low-rank form
            (``preconditioner="low_rank"`` or ``"auto"``; an int >= 1, default
            128; ignored by the other forms). At 64
            the MNIST MLP took 6 epochs to Adam's best loss against full
            rank's 5; at 128, 5 (docs/benchmarks.md).
        **kwargs: ``keras.optimizers.Optimizer`` arguments (``weight_decay``,
            ``clipnorm``, ``global_clipnorm``, ``loss_scale_factor``, ...).
    """

    #: ``learning_rate=None`` / ``damping=None`` with the fixed step, where a class differs from
    #: :data:`keras_hoopt.optimizers.step_control.FIXED_STEP_DEFAULTS`.
    FIXED_STEP_DEFAULTS = {}

    def __init__(
        self,
        learning_rate=None,
        damping=None,
        momentum=0.9,
        nesterov=False,
        factor_decay=0.95,
        kl_clip="auto",
        fisher="auto",
        seed=None,
        model=None,
        communication="auto",
        model_parallel="auto",
        on_nonfinite="skip",
        fallback="adam",
        fallback_lr_ratio=0.01,
        step_size="auto",
        damping_control="auto",
        damping_control_interval=5,
        min_damping=1e-4,
        quadratic_model_batch_fraction=1.0,
        quadratic_model_products="auto",
        quadratic_model_interval=4,
        preconditioner="auto",
        preconditioner_rank=128,
        name="curvature_optimizer",
        **kwargs,
    ):
        if learning_rate is not None:
            check_learning_rate(learning_rate)
        check_keras_arguments(kwargs)
        fixed_defaults = dict(step_control.FIXED_STEP_DEFAULTS, **self.FIXED_STEP_DEFAULTS)
        placeholder = fixed_defaults["learning_rate"] if learning_rate is None else learning_rate
        super().__init__(learning_rate=placeholder, name=name, **kwargs)
        damping = None if damping is None else damping_value(damping)
        check_momentum(momentum, nesterov)
        check("factor_decay", factor_decay, is_number(factor_decay) and 0 <= factor_decay < 1, "a float in [0, 1)")
        check("kl_clip", kl_clip, kl_clip is None or kl_clip == AUTO or (is_number(kl_clip) and kl_clip > 0),
              "None, 'auto' or a finite float > 0")
        check("fisher", fisher, fisher in FISHER_TYPES, " or ".join(repr(f) for f in FISHER_TYPES))
        check("seed", seed, seed is None or isinstance(seed, (int, np.integer)), "None or an int")
        check("communication", communication, communication in COMMUNICATION_CHOICES,
              " or ".join(repr(c) for c in COMMUNICATION_CHOICES))
        check("model_parallel", model_parallel, model_parallel in MODEL_PARALLEL_MODES,
              " or ".join(repr(m) for m in MODEL_PARALLEL_MODES))
        check_on_nonfinite(on_nonfinite)
        check("fallback", fallback, fallback in FALLBACKS, " or ".join(repr(f) for f in FALLBACKS))
        check("fallback_lr_ratio", fallback_lr_ratio, is_number(fallback_lr_ratio) and fallback_lr_ratio > 0,
              "a finite float > 0")
        check("step_size", step_size, step_size in STEP_SIZES, " or ".join(repr(c) for c in STEP_SIZES))
        check("damping_control", damping_control, damping_control in DAMPING_CONTROLS,
              " or ".join(repr(c) for c in DAMPING_CONTROLS))
        check("damping_control_interval", damping_control_interval, is_int(damping_control_interval, 1),
              "an int >= 1")
        if damping_control == "lm" and step_size == "fixed":
            raise ValueError(
                "damping_control='lm' adapts lambda from the quadratic model's predicted loss change: "
                f"use it with step_size='quadratic_model' or 'auto' (got step_size={step_size!r})."
            )
        if damping_control == "lm" and callable(damping):
            raise ValueError(
                "damping_control='lm' adapts lambda from its initial value: damping must be a float "
                "(a schedule was given)."
            )
        check("min_damping", min_damping, is_number(min_damping) and 0 < min_damping <= MAX_DAMPING,
              f"a float in (0, {MAX_DAMPING:g}]")
        check("quadratic_model_batch_fraction", quadratic_model_batch_fraction,
              is_number(quadratic_model_batch_fraction) and 0 < quadratic_model_batch_fraction <= 1,
              "a float in (0, 1]")
        check("quadratic_model_products", quadratic_model_products, quadratic_model_products in QM_PRODUCTS,
              " or ".join(repr(p) for p in QM_PRODUCTS))
        check("quadratic_model_interval", quadratic_model_interval, is_int(quadratic_model_interval, 1),
              "an int >= 1")
        check("preconditioner", preconditioner, preconditioner in preconditioner_forms(),
              " or ".join(repr(f) for f in preconditioner_forms()))
        check("preconditioner_rank", preconditioner_rank, is_int(preconditioner_rank, 1), "an int >= 1")
        if nesterov and (step_size == "quadratic_model" or damping_control == "lm"):
            raise ValueError("step_size='quadratic_model' chooses the momentum itself: nesterov must be False.")
        # What was asked (get_config); the values in use are resolved against the loss at attach.
        self._requested_step_control = {
            "step_size": step_size, "damping_control": damping_control, "learning_rate": learning_rate,
            "damping": damping, "kl_clip": kl_clip,
        }
        self._fixed_step_defaults = fixed_defaults
        self.damping_control_interval = int(damping_control_interval)
        self.min_damping = float(min_damping)
        self.quadratic_model_batch_fraction = float(quadratic_model_batch_fraction)
        self.quadratic_model_products = quadratic_model_products
        self.quadratic_model_interval = int(quadratic_model_interval)
        self.preconditioner = preconditioner
        self.preconditioner_rank = int(preconditioner_rank)
        self.fallback = fallback
        self.fallback_lr_ratio = float(fallback_lr_ratio)
        self.communication = communication
        self.model_parallel = model_parallel
        self.on_nonfinite = on_nonfinite
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.factor_decay = float(factor_decay)
        self._loss_identity = None
        self._resolve_step_control(attached=False)
        self._requested_fisher = fisher
        self.fisher = fisher  # "auto" resolves in _resolve_fisher
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

    def _resolve_fisher(self, sampler_exists=None, record=None):
        """``self.fisher`` for ``fisher="auto"`` (the one place it resolves; others stay as given).

        At attach (``sampler_exists``): ``"empirical"`` where the loss has no
        sampler, else still ``"auto"``. At each trace of the step (``record``,
        the training pass's :class:`~keras_hoopt.capture.ForwardRecord`):
        ``"mc"`` where the sampler took the model's output, ``"empirical"``
        where it declined it (an output that is not one ``[batch, K]`` tensor).
        """
        if self._requested_fisher != AUTO:
            return
        if record is not None:
            self.fisher = "mc" if record.sampled_loss is not None else "empirical"
        elif sampler_exists is not None:
            self.fisher = AUTO if sampler_exists else "empirical"

    def _attach(self, model, loss, loss_scaler):
        att = self._attachment
        check_one_model(self, att.model, model)
        if loss is None and att.model is model:
            loss = att.loss
        sampler = None
        if self._requested_fisher == "mc" and loss is not None:
            sampler = make_output_sampler(loss)  # raises for unsupported losses
        elif self._requested_fisher == AUTO:
            sampler = auto_output_sampler(loss)
            self._resolve_fisher(sampler_exists=sampler is not None)
        self._loss_identity = step_control.quadratic_model_loss(
            model, loss, self._requested_step_control["step_size"] == AUTO, self.quadratic_model_products
        )
        self._resolve_step_control(attached=True, loss=loss)
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

    def _resolve_step_control(self, attached, loss=None):
        """Set ``step_size``, ``damping_control``, ``damping``, ``kl_clip`` and the learning rate in
        use from what was asked and the loss (:func:`keras_hoopt.optimizers.step_control.resolve`)."""
        requested = self._requested_step_control
        resolved = step_control.resolve(
            requested, self._loss_identity is not None, self.nesterov, self._fixed_step_defaults, attached, loss
        )
        self.step_size, self.damping_control = resolved["step_size"], resolved["damping_control"]
        self.kl_clip = resolved["kl_clip"]
        damping = resolved["damping"]
        self.damping = damping if callable(damping) else float(damping)
        if requested["learning_rate"] is None and not self.built:
            self.learning_rate = resolved["learning_rate"]

    def _fall_back_to_fixed_step(self, error, learning_rate):
        """``step_size="auto"`` met a model whose call cannot be re-run (or traced in forward mode) for
        the quadratic model's curvature products: the fixed step from now on.

        Returns the learning rate this step applies (the fixed step's default
        where ``learning_rate`` was left to the optimizer)."""
        warnings.warn(
            f"{type(self).__name__}: step_size='auto' could not build the quadratic model's "
            f"curvature products through this model ({type(error).__name__}: {str(error)[:300]}); "
            "training continues with the fixed step (step_size='fixed'). Pass step_size='fixed' "
            "explicitly to silence this.",
            stacklevel=2,
        )
        requested = self._requested_step_control
        self._loss_identity = None
        resolved = step_control.resolve(
            dict(requested, step_size="fixed", damping_control=None), False, self.nesterov,
            self._fixed_step_defaults, attached=True,
        )
        self.step_size, self.damping_control, self.kl_clip = "fixed", None, resolved["kl_clip"]
        if requested["learning_rate"] is None:
            with tf.init_scope():
                self._learning_rate.assign(resolved["learning_rate"])
            return tf.constant(resolved["learning_rate"], tf.float32)
        return learning_rate

    def _strategy(self):
        return getattr(self, "_distribution_strategy", None) or tf.distribute.get_strategy()

    def _make_communicator(self):
        return make_communicator(self.communication, self._strategy())

    def _sample_seed(self):
        step = tf.cast(tf.convert_to_tensor(self.iterations), tf.int32)
        # The seed lives in a variable once built, so that a run resumed from a checkpoint draws
        # the labels the uninterrupted run would have (seed=None draws one at construction).
        base = tf.convert_to_tensor(self._sampler_seed_variable) if self.built else tf.constant(self._sampler_seed)
        return tf.stack([tf.cast(base, tf.int32) + 7919 * replica_id(), step])

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
        candidates = self._blocks_for(var_list)
        options = FormOptions(self._split_dim, self.preconditioner_rank, type(self).__name__)
        candidates = [(first, in_form(block, self.preconditioner, options), indices) for first, block, indices in candidates]
        names = [block.name for _, block, _ in candidates]
        for _, block, _ in candidates:
            if names.count(block.name) > 1:
                block.label = _block_path(block).replace("/", "_")
        self._statistics, self._preconditioners, self._counters = [], [], []
        self._running = {}  # block index -> {part: variable} of its running state (the eigenbasis's diagonal)
        att.blocks = []
        for _, block, indices in candidates:
            if block.running_layout():
                self._running[len(att.blocks)] = self._add_preconditioner_state(
                    f"{block.label}_running", block.running_layout()
                )
            names = list(block.statistic_shapes())
            for name, shape in block.statistic_shapes().items():
                label = f"{block.label}_{name}"
                self._statistics.append(self.add_variable(shape, _identity_initializer, "float32", name=label))
                self._preconditioners.append(self._add_preconditioner_state(label, block.preconditioner_layout(name)))
                self._counters.append(self.add_variable((NUM_COUNTERS,), "zeros", "int64", name=f"{label}_counters"))
            att.blocks.append((block, indices, names))
        # Each factor's damped inverse, where the block keeps one (inspection, tests).
        self._inverses = [parts["inverse"] for parts in self._preconditioners if "inverse" in parts]
        self.refresh_policy.build(self, self._views(counters=None))
        communicator = self._make_communicator()
        att.placement = Placement(
            self, [block for block, _, _ in att.blocks], communicator, self._placement_mode(communicator),
            self._split_dim, len(self._statistics),
        )
        if self.step_size == "quadratic_model" and getattr(self, "_loss_identity", None) is None:
            raise ValueError(
                "step_size='quadratic_model' needs the model's loss (its output Hessian is the "
                "curvature): compile the model with this optimizer (model.compile(optimizer=..., loss=...))."
            )
        # The quadratic model's last choice: [learning rate, momentum] applied, and the last rho.
        self._step_coefficients = self.add_variable((2,), "zeros", "float32", name="step_coefficients")
        self._reduction_ratio = self.add_variable((), "zeros", "float32", name="reduction_ratio")
        # The last measured curvature products per unit length, u_i^T C u_j / (|u_i| |u_j|): the model of
        # the steps between two measurements (quadratic_model_interval > 1).
        self._unit_curvature = self.add_variable((2, 2), "zeros", "float32", name="unit_curvature")
        # Steps whose quadratic model could not be solved (they took the given learning rate and momentum).
        self._quadratic_model_failures = self.add_variable((), "zeros", "int64", name="quadratic_model_failures")
        # Levenberg-Marquardt's lambda (the given damping until adapted).
        self._adapted_damping = self.add_variable(
            (), keras.initializers.Constant(max(self.damping, self.min_damping) if not callable(self.damping) else 0.0),
            "float32",
            name="adapted_damping",
        )
        # The KL-clip coefficient nu of the last step (1: not clipped), for monitoring.
        self._kl_clip_coefficient = self.add_variable((), "ones", "float32", name="kl_clip_coefficient")
        self._skipped_steps = self.add_variable((), "zeros", "int64", name="skipped_steps")
        self._sampler_seed_variable = self.add_variable(
            (), keras.initializers.Constant(self._sampler_seed), "int64", name="sampler_seed"
        )
        covered = {i for _, indices, _ in att.blocks for i in indices}
        # Variable index -> (first, second) Adam moments of the variables no block preconditions.
        self._fallback_moments = {}
        if self.fallback == "adam":
            for i, variable in enumerate(var_list):
                if i not in covered:
                    self._fallback_moments[i] = (
                        self.add_variable_from_reference(variable, "fallback_m"),
                        self.add_variable_from_reference(variable, "fallback_v"),
                    )
        self._momentums = {}  # variable index -> velocity
        if self.momentum > 0:
            for i, variable in enumerate(var_list):
                if i not in self._fallback_moments:
                    self._momentums[i] = self.add_variable_from_reference(variable, "momentum")
        uncovered = sorted({v.path.rsplit("/", 1)[0] for i, v in enumerate(var_list) if i not in covered})
        if uncovered and not att.warned_uncovered:
            att.warned_uncovered = True
            update = (
                f"Adam at {self.fallback_lr_ratio:g} x the learning rate" if self.fallback == "adam"
                else "the first-order momentum SGD"
            )
            warnings.warn(
                f"{type(self).__name__}: no curvature block for {', '.join(uncovered)}; "
                f"these layers get {update} (fallback={self.fallback!r}).",
                stacklevel=2,
            )

    def _placement_mode(self, communicator):
        """``model_parallel`` as asked, except that running state needs every block's state on
        every worker: ``"auto"`` then runs ``"off"`` where it would pick ``"gradients"``."""
        if not self._running:
            return self.model_parallel
        mode = resolve_mode(self.model_parallel, communicator.num_workers, communicator.conditional_collectives)
        if mode != "gradients":
            return self.model_parallel
        if self.model_parallel == "gradients":
            raise ValueError(
                "model_parallel='gradients' keeps each block's preconditioner on its owner only; "
                f"preconditioner={self.preconditioner!r} folds its diagonal on every worker. Use "
                "model_parallel='off', 'inverses' or 'auto'."
            )
        return "off"

    def _blocks_for(self, var_list):
        """``[(first var index, block, var indices)]`` of the attached model's blocks, in variable order.

        A block is kept only if every variable it preconditions is in
        ``var_list`` (trainable) and no earlier block claimed one of them.
        """
        att = self._attachment
        index_of = {self._var_key(v): i for i, v in enumerate(var_list)}
        candidates, claimed = [], set()
        for layer in att.model._flatten_layers(include_self=False, recursive=True):
            block_type = att.session.block_types.get(id(layer))
            if block_type is None:
                continue
            block = block_type(layer)
            keys = [self._var_key(v) for v in block.variables]
            if block.variables and all(k in index_of for k in keys) and not claimed.intersection(keys):
                claimed.update(keys)
                candidates.append((min(index_of[k] for k in keys), block, [index_of[k] for k in keys]))
        return sorted(candidates, key=lambda c: c[0])

    def _add_preconditioner_state(self, label, layout):
        """One variable per part of a statistic's preconditioner state (``{part: variable}``)."""
        state = {}
        for part, (shape, initializer) in layout.items():
            init = _identity_initializer if initializer == "identity" else initializer
            state[part] = self.add_variable(shape, init, "float32", name=f"{label}_{part}")
        return state

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
        if self.damping_control == "lm" and self.built:
            return tf.convert_to_tensor(self._adapted_damping)
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

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        CurvatureStep(self, grads, trainable_variables, learning_rate).run()

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

    def _momentum_coefficient(self, learning_rate):
        """``(mu for this step, state assignments)``; SP-NGD rescales it."""
        return tf.constant(self.momentum, tf.float32), []

    def _apply_weight_decay(self, variables):
        """Nothing here: decoupled weight decay is applied with the update (the ``apply`` stage),
        so that a skipped (non-finite) step leaves the weights exactly as they were."""



    def update_step(self, gradient, variable, learning_rate):  # pragma: no cover
        raise NotImplementedError(
            "Curvature optimizers update all variables together in _backend_update_step."
        )

    # ------------------------------------------------------------ inspection
    def curvature_summary(self):
        """One dict per preconditioned layer: the documented way to inspect curvature.

        Keys: ``layer`` (name), ``path`` (the layer's path in the model:
        unique where names are not, as in attention layers), ``kind`` (``"dense"``, ``"conv2d"``,
        ``"batchnorm"``...), ``variables`` (the ``variable.path`` of every
        variable the block preconditions), ``factor_shapes`` (``{statistic: shape}``),
        ``refreshes`` (times its statistics were recomputed),
        ``steps_since_refresh``, ``inversions`` (successful inverse
        recomputations), ``nonfinite_skips`` (refreshes skipped because the
        batch statistic was NaN/Inf), ``failed_inversions`` (inversions that
        failed even with extra damping; the last good inverse was kept), and
        ``statistics`` with these counters per statistic (and its ``form``:
        with ``preconditioner="low_rank"`` only the wide factors are
        ``"low_rank"``), and ``form`` (``"kronecker"``, ``"eigenbasis"``,
        ``"low_rank"``: the block's preconditioner form; blocks that are not
        Kronecker-factored report ``"kronecker"``).
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
                    "form": block.factor_form(name),
                }
            stats = per_stat.values()
            summary.append(
                {
                    "layer": block.name,
                    "path": _block_path(block),
                    "kind": block.kind,
                    "form": block.form,
                    "variables": [v.path for v in block.variables],
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

    def coverage_summary(self):
        """How much of the model the curvature blocks precondition: the documented way to check coverage.

        Returns a dict: ``parameters`` (trainable parameters of the model),
        ``preconditioned`` (those a curvature block preconditions),
        ``share`` (their fraction), ``by_kind`` (``{block kind: parameters}``)
        and ``uncovered`` (``{variable path: parameters}`` of the trainable
        variables left to the ``fallback`` update). Needs the model: call it
        after ``model.compile(optimizer=...)`` (the model built) or after training.
        """
        model = self._attachment.model
        if model is None:
            raise ValueError(f"{type(self).__name__}.coverage_summary() needs the model: compile it first.")
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError("coverage_summary(): the model has no trainable variables yet (build it first).")
        if self.built:
            blocks = [(block, indices) for block, indices, _ in self._attachment.blocks]
            variables = list(self._trainable_variables)
        else:
            blocks = [(block, indices) for _, block, indices in self._blocks_for(variables)]
        sizes = [int(np.prod(v.shape)) for v in variables]
        by_kind, covered = {}, set()
        for block, indices in blocks:
            by_kind[block.kind] = by_kind.get(block.kind, 0) + sum(sizes[i] for i in indices)
            covered.update(indices)
        total = sum(sizes)
        preconditioned = sum(sizes[i] for i in covered)
        return {
            "parameters": total,
            "preconditioned": preconditioned,
            "share": preconditioned / total if total else 0.0,
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "uncovered": {v.path: sizes[i] for i, v in enumerate(variables) if i not in covered},
        }

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
        damping; the last good inverse was kept), ``quadratic_model_failures``
        (see :meth:`step_summary`) and ``on_nonfinite``.
        """
        rows = self.curvature_summary()
        return {
            "steps": int(self.iterations.numpy()),
            "skipped_steps": self.skipped_steps,
            "nonfinite_statistics": sum(r["nonfinite_skips"] for r in rows),
            "failed_inversions": sum(r["failed_inversions"] for r in rows),
            "quadratic_model_failures": int(self._quadratic_model_failures.numpy()) if self.built else 0,
            "on_nonfinite": self.on_nonfinite,
        }

    def step_summary(self):
        """What the last step's step-size and damping control chose: the documented way to inspect them.

        Keys: ``step_size``, ``damping_control``, ``learning_rate`` and
        ``momentum`` (the values applied to the preconditioned variables in
        the last step: chosen by the quadratic model, or the given ones),
        ``damping`` (the ``lambda`` of the next step), ``reduction_ratio``
        (the last Levenberg-Marquardt ``rho``; 0 before the first),
        ``quadratic_model_failures`` (steps whose model had a non-finite or
        non-positive curvature: the preconditioned variables did not move and
        their velocity restarted; a ``rho`` that is not finite counts as 0,
        which raises the damping) and ``kl_clip_coefficient``.
        """
        if not self.built:
            return {}
        lr, mu = (float(x) for x in self._step_coefficients.numpy())
        return {
            "step_size": self.step_size,
            "damping_control": self.damping_control,
            "learning_rate": lr,
            "momentum": mu,
            "damping": self.current_damping(),
            "reduction_ratio": float(self._reduction_ratio.numpy()),
            "quadratic_model_failures": int(self._quadratic_model_failures.numpy()),
            "kl_clip_coefficient": self.kl_clip_coefficient,
        }

    @property
    def kl_clip_coefficient(self):
        """The KL-clip scale ``nu`` applied in the last step (1.0: not clipped; None before build)."""
        return float(self._kl_clip_coefficient.numpy()) if self.built else None

    def statistic(self, layer_name, name):
        """Current value (numpy) of statistic ``name`` (e.g. ``"A"``) of a layer."""
        self._require_built()
        return self._slot_value(self._statistics, layer_name, name)

    def inverse(self, layer_name, name):
        """Current damped inverse (numpy) of statistic ``name`` of a layer, as its preconditioner form
        stands for it (a low-rank factor's formed from its parts), or None where the form keeps none
        (the eigenbasis, a recurrent layer's per-gate pieces)."""
        self._require_built()
        block, slot = self._find_slot(layer_name, name)
        inverse = block.dense_inverse(name, self._preconditioners[slot])
        return None if inverse is None else tf.convert_to_tensor(inverse).numpy()

    def _require_built(self):
        if not self.built:
            raise ValueError(
                f"{type(self).__name__} has no statistics yet: it is built at the model's first "
                "training step (or at compile when the model already has its weights). Call "
                "`model.fit` / `train_on_batch` first."
            )

    def _slot_value(self, variables, layer_name, name):
        """Statistic ``name`` of the layer named (or at path) ``layer_name``."""
        return variables[self._find_slot(layer_name, name)[1]].numpy()

    def _find_slot(self, layer_name, name):
        """``(block, slot index)`` of statistic ``name`` of the layer named (or at path) ``layer_name``."""
        found = [(block, slots) for block, _, slots in self._slot_indices() if _block_path(block) == layer_name]
        if not found:
            found = [(block, slots) for block, _, slots in self._slot_indices() if block.name == layer_name]
        if len(found) > 1:
            paths = ", ".join(repr(_block_path(block)) for block, _ in found)
            raise KeyError(f"Several layers are named {layer_name!r}; pass one of their paths: {paths}.")
        for block, slots in found:
            for stat, slot in slots:
                if stat == name:
                    return block, slot
        raise KeyError(f"No statistic {name!r} for layer {layer_name!r}.")

    # ------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        if self._requested_step_control["learning_rate"] is None:
            config["learning_rate"] = None  # resolved again against the loss when re-attached
        config.update(
            {
                "damping": damping_config(self._requested_step_control["damping"]),
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "factor_decay": self.factor_decay,
                "kl_clip": self._requested_step_control["kl_clip"],
                "fisher": self._requested_fisher,
                "seed": self.seed,
                "communication": self.communication,
                "model_parallel": self.model_parallel,
                "on_nonfinite": self.on_nonfinite,
                "fallback": self.fallback,
                "fallback_lr_ratio": self.fallback_lr_ratio,
                "step_size": self._requested_step_control["step_size"],
                "damping_control": self._requested_step_control["damping_control"],
                "damping_control_interval": self.damping_control_interval,
                "min_damping": self.min_damping,
                "quadratic_model_batch_fraction": self.quadratic_model_batch_fraction,
                "quadratic_model_products": self.quadratic_model_products,
                "quadratic_model_interval": self.quadratic_model_interval,
                "preconditioner": self.preconditioner,
                "preconditioner_rank": self.preconditioner_rank,
            }
        )
        return config


_compile_hook.install()
_keras_compat.install()

"""What ``step_size``, ``damping_control``, ``learning_rate``, ``damping`` and ``kl_clip`` become.

The curvature optimizers' defaults are "auto" (or None) and resolve when the
optimizer meets its model and loss (``model.compile`` or ``attach``):

| argument | the loss's curvature is known, no Nesterov | otherwise (another loss, several outputs, ``attach(model)`` alone) |
|---|---|---|
| ``step_size="auto"`` | ``"quadratic_model"`` | ``"fixed"`` |
| ``damping_control="auto"`` | ``"lm"`` (with a float damping) | None |
| ``learning_rate=None`` | 1.0 (take the model's minimiser) | the class's fixed step (0.01) |
| ``damping=None`` | 1e-4 (the initial lambda) | the class's (1e-3; THOR 0.03) |
| ``kl_clip="auto"`` | None (the model sets the length) | 1e-3 |

Explicit values are kept (an explicit ``"quadratic_model"`` or ``"lm"`` with
a loss it cannot use is an error). The defaults were chosen on the whole
benchmark suite at once (docs/benchmarks.md): the quadratic model's step with
Levenberg-Marquardt damping reached Adam's best training loss in 2-4x fewer
epochs on every workload, where the fixed step plateaued above it.
"""

import keras

from keras_hoopt.fisher import loss_identity
from keras_hoopt.optimizers.quadratic_model import resolve_products

AUTO = "auto"
#: Accepted values of ``step_size``.
STEP_SIZES = (AUTO, "fixed", "quadratic_model")
#: Accepted values of ``damping_control``.
DAMPING_CONTROLS = (AUTO, None, "lm")
#: ``learning_rate=None`` and ``damping=None`` with the quadratic model.
#: The initial lambda 1e-4 (the floor ``min_damping``; Levenberg-Marquardt raises it where the model
#: overpredicts) was chosen on the four benchmark workloads together, against 1e-2 and 1e-3
#: (docs/benchmarks.md, "The initial damping").
QUADRATIC_MODEL_DEFAULTS = {"learning_rate": 1.0, "damping": 1e-4}
#: ``learning_rate=None`` and ``damping=None`` with the fixed step (a class may override).
FIXED_STEP_DEFAULTS = {"learning_rate": 0.01, "damping": 1e-3}
#: ``kl_clip="auto"`` with the fixed step (kfac-pytorch's default).
DEFAULT_KL_CLIP = 1e-3


def quadratic_model_loss(model, loss, automatic, products="auto"):
    """``(family, from_logits)`` of the single loss the quadratic model can use on ``model``, else None.

    None for no loss, several losses, or a loss whose output Hessian is not
    known; with ``automatic`` (``step_size="auto"``) also for a model holding
    a Keras RNN layer where the curvature products would be formed in forward
    mode (``products``, resolved as :func:`~keras_hoopt.optimizers.quadratic_model.resolve_products`:
    explicitly, or a layer computing in float16/bfloat16): TensorFlow's forward
    mode cannot go through the RNN's ``while_loop`` over TensorLists.
    Differences only re-run it, so a float32 RNN gets the quadratic model.
    """
    if loss is None:
        return None
    if isinstance(loss, (list, tuple, dict)):
        if len(loss) != 1:
            return None
        loss = list(loss.values())[0] if isinstance(loss, dict) else loss[0]
    layers = model._flatten_layers(include_self=True)
    if automatic and any(isinstance(layer, keras.layers.RNN) for layer in layers):
        if resolve_products(products, layers, model.trainable_variables) == "forward_mode":
            return None
    return loss_identity(loss)


def resolve(requested, loss_supported, nesterov, fixed_defaults, attached, loss=None):
    """The step control in use: ``{step_size, damping_control, learning_rate, damping, kl_clip}``.

    Args:
        requested: the constructor's values of those five arguments.
        loss_supported: whether the loss's curvature is known (the quadratic
            model can be built on it).
        nesterov: the optimizer's ``nesterov`` (the quadratic model chooses
            the momentum itself, so "auto" falls back to the fixed step).
        fixed_defaults: ``{learning_rate, damping}`` of the class's fixed step.
        attached: whether the model and loss are known yet; before, "auto"
            stays "auto" and None values take the fixed step's (placeholders).
        loss: the loss, for the error message.

    Raises:
        ValueError: an explicit ``"quadratic_model"`` or ``"lm"`` that the
            loss (once attached) or ``nesterov`` rules out.
    """
    step = requested["step_size"]
    control = requested["damping_control"]
    if step == AUTO and attached:
        if control == "lm":  # asked for explicitly: it needs the quadratic model
            step = "quadratic_model"
        else:
            step = "quadratic_model" if loss_supported and not nesterov else "fixed"
    if step == "quadratic_model" and attached and not loss_supported and loss is None:
        raise ValueError(
            "step_size='quadratic_model' needs the model's loss (its output Hessian is the curvature): "
            "compile the model with this optimizer (model.compile(optimizer=..., loss=...)) or pass "
            "loss= to attach()."
        )
    if step == "quadratic_model" and attached and not loss_supported:
        raise ValueError(
            f"step_size='quadratic_model' (and damping_control='lm') does not support the loss {loss!r}: "
            "it needs one whose curvature (output Hessian) is known, sparse_categorical_crossentropy, categorical_crossentropy, binary_crossentropy or "
            "mean_squared_error, on a single-output model. Use step_size='fixed' for other losses."
        )
    damping = requested["damping"]
    if control == AUTO:
        control = "lm" if step == "quadratic_model" and not callable(damping) else None
    defaults = QUADRATIC_MODEL_DEFAULTS if step == "quadratic_model" else fixed_defaults
    learning_rate = requested["learning_rate"]
    kl_clip = requested["kl_clip"]
    if kl_clip == AUTO:
        kl_clip = None if step == "quadratic_model" else DEFAULT_KL_CLIP
    return {
        "step_size": step,
        "damping_control": control,
        "learning_rate": defaults["learning_rate"] if learning_rate is None else learning_rate,
        "damping": defaults["damping"] if damping is None else damping,
        "kl_clip": None if kl_clip is None else float(kl_clip),
    }

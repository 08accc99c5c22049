"""Preconditioner forms: how a Kronecker-factored block keeps and applies its factors' inverses.

A form is a function ``(block, options) -> block`` registered under the name
the optimizers' ``preconditioner=`` argument takes. It returns the block in
that form (a new block of the same layer, usually a mixin placed before the
block's type that overrides :meth:`~keras_hoopt.blocks.CurvatureBlock.preconditioner_layout`,
``compute_preconditioner`` and ``apply_preconditioner``), or the block itself
where the form does not apply (blocks that are not Kronecker-factored keep
their own). ``options`` is a :class:`FormOptions`. Adding a form is one module
that calls :func:`register_form` and is imported by :mod:`keras_hoopt.blocks`.
"""

import dataclasses

_FORMS = {}


@dataclasses.dataclass(frozen=True)
class FormOptions:
    """What a form may read from the optimizer.

    Attributes:
        split_dim: THOR's block-split size (None: full factors).
        rank: ``preconditioner_rank`` (the low-rank form's rank).
        optimizer_name: the optimizer's class name, for error messages.
    """

    split_dim: object = None
    rank: int = 64
    optimizer_name: str = "the optimizer"


def register_form(name):
    """Decorator: register ``function(block, options)`` as the preconditioner form ``name``."""

    def decorate(function):
        _FORMS[name] = function
        return function

    return decorate


def preconditioner_forms():
    """The accepted ``preconditioner=`` values, the default (``"kronecker"``) first."""
    return tuple(_FORMS)


def in_form(block, form, options):
    """``block`` in the preconditioner form ``form``."""
    return _FORMS[form](block, options)


@register_form("kronecker")
def _kronecker(block, options):
    """The default: each factor's damped inverse (:class:`~keras_hoopt.blocks.KroneckerBlock`)."""
    return block

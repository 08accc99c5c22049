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
import functools

from keras_hoopt.blocks.base import KroneckerBlock

_FORMS = {}


@dataclasses.dataclass(frozen=True)
class FormOptions:
    """What a form may read from the optimizer.

    Attributes:
        split_dim: THOR's block-split size (None: full factors).
        rank: ``preconditioner_rank`` (the low-rank form's rank).
        optimizer_name: the optimizer's class name, for error messages.
    """

    split_dim: object
    rank: int
    optimizer_name: str


def register_form(name):
    """Decorator: register ``function(block, options)`` as the preconditioner form ``name``."""

    def decorate(function):
        _FORMS[name] = function
        return function

    return decorate


def preconditioner_forms():
    """The accepted ``preconditioner=`` values (in registration order; the optimizers' default is ``"auto"``)."""
    return tuple(_FORMS)


def in_form(block, form, options):
    """``block`` in the preconditioner form ``form``."""
    return _FORMS[form](block, options)


def kronecker_factored(block):
    """Whether ``block`` is a Kronecker block with exactly the factors ``A`` and ``G`` (what the forms here take)."""
    return isinstance(block, KroneckerBlock) and set(block.statistic_shapes()) == {"A", "G"}


@functools.lru_cache(maxsize=None)
def form_type(mixin, block_type, prefix):
    """The block type ``block_type`` with the form's ``mixin`` placed first (one type per pair)."""
    return type(f"{prefix}{block_type.__name__}", (mixin, block_type), {})


def precondition_by_factors(block, grads, state, multiply_left, multiply_right, marker):
    """``A^-1 dW G^-1`` of a Kronecker block whose factors' states are a form's (holding the part
    ``marker``: ``multiply_left(parts, dW)``, ``multiply_right(dW, parts)``) or a damped inverse."""
    matrix = block.gradient_matrix(grads)
    a, g = state["A"], state["G"]
    matrix = multiply_left(a, matrix) if marker in a else a["inverse"] @ matrix
    matrix = multiply_right(matrix, g) if marker in g else matrix @ g["inverse"]
    return block.gradients_from_matrix(matrix)


def require_full_factors(form, options):
    """A form without split inverses refuses THOR's ``split_dim`` by name."""
    if options.split_dim is not None:
        raise ValueError(
            f"preconditioner={form!r} has no split inverses: {options.optimizer_name} needs "
            f"split_dim=None (got {options.split_dim})."
        )


@register_form("kronecker")
def _kronecker(block, options):
    """Each factor's damped inverse (:class:`~keras_hoopt.blocks.KroneckerBlock`); with THOR's
    ``split_dim``, the wide factors' diagonal blocks (:mod:`keras_hoopt.blocks.split`)."""
    from keras_hoopt.blocks.split import with_split  # the split form builds on this module

    return with_split(block, options.split_dim)

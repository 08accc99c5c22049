"""THOR's split form: each wide Kronecker factor kept and applied as its diagonal blocks.

THOR (Chen et al. 2021) inverts a factor of size ``d > split_dim`` as its
diagonal blocks of ``split_dim`` (and one smaller tail block), dropping the
off-diagonal ones: ``O(d split_dim^2)`` instead of ``O(d^3)``. Kept as the
dense ``[d, d]`` block-diagonal matrix, that saving stops at the refresh:
every step still multiplies the gradient by a ``d x d`` matrix that is mostly
zeros, and the refresh writes all of it. Here the state is the blocks
themselves, ``[d // s, s, s]`` plus the ``[d % s, d % s]`` tail, and the
gradient matrix ``dW`` (``[d_in, d_out]``) is preconditioned block by block::

    A^-1 dW   = concat_k (A_k^-1 dW[rows k])          (one batched matmul, and the tail)
    dW G^-1   = concat_k (dW[:, columns k] G_k^-1)

which costs ``d_in d_out (s_A + s_G)`` instead of ``d_in d_out (d_in + d_out)``.
Factors not larger than ``split_dim`` keep their whole damped inverse. The blocks' inverses are
:func:`keras_hoopt.linalg.split_damped_inverse`.
"""

import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.forms import form_type, kronecker_factored, precondition_by_factors


def multiply_left(parts, matrix):
    """``blockdiag(parts)^-1 @ matrix`` for a ``[d, m]`` matrix, block by block."""
    blocks = parts["blocks"]
    full, s = int(blocks.shape[0]), int(blocks.shape[-1])
    head = tf.reshape(blocks @ tf.reshape(matrix[: full * s], (full, s, -1)), (full * s, -1))
    if "tail" not in parts:
        return head
    return tf.concat([head, parts["tail"] @ matrix[full * s:]], axis=0)


def multiply_right(matrix, parts):
    """``matrix @ blockdiag(parts)^-1`` for a ``[m, d]`` matrix, block by block."""
    blocks = parts["blocks"]
    full, s = int(blocks.shape[0]), int(blocks.shape[-1])
    # [m, full, s] -> [full, m, s] @ [full, s, s] -> [m, full * s]
    columns = tf.transpose(tf.reshape(matrix[:, : full * s], (-1, full, s)), (1, 0, 2))
    head = tf.reshape(tf.transpose(columns @ blocks, (1, 0, 2)), (-1, full * s))
    if "tail" not in parts:
        return head
    return tf.concat([head, matrix[:, full * s:] @ parts["tail"]], axis=1)


class SplitForm:
    """Mixin that gives a :class:`~keras_hoopt.blocks.base.KroneckerBlock` THOR's split form.

    Placed before the block type in the bases (:func:`with_split`); the
    instance's ``split_dim`` is THOR's, set there.
    """

    form = "split"
    split_dim = None

    def is_split(self, name):
        """Whether factor ``name`` is wider than ``split_dim`` (else it keeps its whole inverse)."""
        return self.statistic_shapes()[name][0] > self.split_dim

    def factor_form(self, name):
        return "split" if self.is_split(name) else "kronecker"

    def preconditioner_layout(self, name):
        if not self.is_split(name):
            return super().preconditioner_layout(name)
        full, rest = divmod(self.statistic_shapes()[name][0], self.split_dim)
        layout = {"blocks": ((full, self.split_dim, self.split_dim), "identity")}
        if rest:
            layout["tail"] = ((rest, rest), "identity")
        return layout

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        if not self.is_split(name):
            return super().compute_preconditioner(name, statistics, damping, None)
        damping = self.factor_damping(name, statistics, damping)
        return linalg.split_damped_inverse(statistics[name], damping, self.split_dim)

    def dense_inverse(self, name, parts):
        return linalg.block_diagonal(parts) if self.is_split(name) else super().dense_inverse(name, parts)

    def apply_preconditioner(self, grads, state):
        return precondition_by_factors(self, grads, state, multiply_left, multiply_right, "blocks")


def with_split(block, split_dim):
    """``block`` in the split form (a new block of the same layer), or ``block`` itself where the form
    does not apply (not Kronecker-factored) or no factor is wider than ``split_dim``."""
    if split_dim is None or not kronecker_factored(block) or isinstance(block, SplitForm):
        return block
    if max(shape[0] for shape in block.statistic_shapes().values()) <= split_dim:
        return block
    new = form_type(SplitForm, type(block), "Split")(block.layer)
    new.label, new.split_dim = block.label, int(split_dim)
    return new

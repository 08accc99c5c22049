"""The eigenbasis preconditioner form of a Kronecker block: EKFAC (George et al. 2018).

With the eigendecompositions ``A = Q_A diag(a) Q_A^T`` and
``G = Q_G diag(g) Q_G^T``, K-FAC's Fisher block is

    A (x) G = (Q_A (x) Q_G) diag(a (x) g) (Q_A (x) Q_G)^T.

EKFAC keeps the Kronecker-factored basis and replaces the diagonal
``a (x) g`` by the second moment of the per-example gradients in that basis,
the diagonal that is closest to the Fisher in Frobenius norm in this basis::

    S_ij = E_n[ (Q_A^T a_n)_i^2 (Q_G^T g_n)_j^2 ]

(``a_n``, ``g_n`` a row of the layer input and of the output gradient, as the
block's factors use them; with several rows per example, as a convolution
has, every row counts as one, the per-location approximation:
``S = sum_rows (Q_A^T a)^2 (Q_G^T g)^2^T / examples``, which has the
expectation ``a (x) g`` where inputs and gradients are independent). The
preconditioned gradient of the ``[d_in, d_out]`` gradient matrix ``dW`` is

    P = Q_A [ (Q_A^T dW Q_G) / (S + lambda) ] Q_G^T     (element-wise division)

so with ``S = (a + pi sqrt(lambda)) (x) (g + sqrt(lambda) / pi) - lambda`` it
is K-FAC's step with factored damping exactly.

State. The bases and eigenvalues are the preconditioner state of ``A`` and
``G`` (``{"basis", "eigenvalues"}``), recomputed when the refresh policy says
so, like K-FAC's inverses (SP-NGD's adaptive intervals apply unchanged). The
diagonal ``S`` is *running* state (:meth:`CurvatureBlock.running_layout`),
folded in the step's ``running_state`` stage: where the block's statistics are
due, ``S <- decay S + (1 - decay) S_batch`` with ``S_batch`` computed in the
current basis; where a basis was just recomputed, the old diagonal belongs to
the old basis and the fold starts from K-FAC's diagonal ``a (x) g`` in the new
one. The step then costs two more ``[d, d]`` products per layer than K-FAC's
(rotating into and out of the basis), and each due statistic step rotates the
rows once.

Reference: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent.
Fast approximate natural gradient descent in a Kronecker-factored eigenbasis.
NeurIPS 2018 (arXiv 1806.03884).
"""

import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.forms import form_type, kronecker_factored, register_form, require_full_factors


def eigenbasis_precondition(matrix, basis_a, basis_g, diagonal, damping):
    """``Q_A [(Q_A^T M Q_G) / (S + damping)] Q_G^T`` for a ``[d_in, d_out]`` matrix ``M``."""
    rotated = tf.matmul(basis_a, matrix, transpose_a=True) @ basis_g
    return basis_a @ tf.matmul(rotated / (diagonal + damping), basis_g, transpose_b=True)


def kronecker_diagonal(eigenvalues_a, eigenvalues_g):
    """K-FAC's diagonal in its own eigenbasis: ``S_ij = a_i g_j``."""
    return eigenvalues_a[:, None] * eigenvalues_g[None, :]


def rotated_second_moment(a_rows, g_rows, basis_a, basis_g, examples):
    """``sum_rows (Q_A^T a)^2 (Q_G^T g)^2^T / examples``: the batch's ``S`` (``[d_in, d_out]``)."""
    a = tf.square(a_rows @ basis_a)
    g = tf.square(g_rows @ basis_g)
    return tf.matmul(a, g, transpose_a=True) / examples


class EigenbasisForm:
    """Mixin that gives a :class:`~keras_hoopt.blocks.base.KroneckerBlock` the EKFAC form.

    Placed before the block type in the bases (:func:`with_eigenbasis`), it
    overrides the preconditioner state's layout, its computation and its use;
    the statistics (``A``, ``G``), the capture and the gradient layout stay the
    block's own.
    """

    form = "eigenbasis"

    def preconditioner_layout(self, name):
        size = self.statistic_shapes()[name][0]
        return {"basis": ((size, size), "identity"), "eigenvalues": ((size,), "ones")}

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        if split_dim is not None:
            raise ValueError("The eigenbasis form has no split inverses (split_dim must be None).")
        matrix = statistics[name]
        eigenvalues, basis = tf.linalg.eigh(0.5 * (matrix + tf.transpose(matrix)))
        ok = linalg.all_finite_together([eigenvalues, basis])
        return {"basis": basis, "eigenvalues": tf.maximum(eigenvalues, 0.0)}, ok

    def running_layout(self):
        return {"diagonal": ((self.input_dim, self.output_dim), "ones")}

    def running_batch_value(self, calls, output_grads, state):
        """This batch's ``S`` in the current bases (``state``: ``{"A": {...}, "G": {...}}``)."""
        a = tf.concat([self.input_rows(c) for c in calls], axis=0)
        g = tf.concat([self.output_rows(grad) for grad in output_grads()], axis=0)
        examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
        return {"diagonal": rotated_second_moment(a, g, state["A"]["basis"], state["G"]["basis"], examples)}

    def fold_running(self, running, batch, due, rebased, state, decay):
        """``S`` after this step: the fold of the batch value (where ``due``), from K-FAC's diagonal
        where the basis was just recomputed (``rebased``); a non-finite batch value is not folded."""
        prior = kronecker_diagonal(state["A"]["eigenvalues"], state["G"]["eigenvalues"])
        start = tf.where(rebased, prior, running["diagonal"])

        def folded():
            value = batch()["diagonal"]
            return tf.where(linalg.all_finite(value), decay * start + (1.0 - decay) * value, start)

        if due is True:
            return {"diagonal": folded()}
        if due is False:
            return {"diagonal": start}
        return {"diagonal": tf.cond(due, folded, lambda: start)}

    def apply_preconditioner(self, grads, state):
        matrix = eigenbasis_precondition(
            self.gradient_matrix(grads), state["A"]["basis"], state["G"]["basis"],
            state["running"]["diagonal"], state["running"]["damping"],
        )
        return self.gradients_from_matrix(matrix)


def with_eigenbasis(block):
    """``block`` in the eigenbasis form (a new block of the same layer), or ``block`` itself where
    the form does not apply (blocks that are not Kronecker-factored keep their own)."""
    if not kronecker_factored(block) or isinstance(block, EigenbasisForm):
        return block
    new = form_type(EigenbasisForm, type(block), "Eigenbasis")(block.layer)
    new.label = block.label
    return new


@register_form("eigenbasis")
def _eigenbasis_form(block, options):
    require_full_factors("eigenbasis", options)
    return with_eigenbasis(block)

"""Curvature block for ``keras.layers.ReversibleEmbedding`` (and keras_hub's subclass).

A tied reversible embedding uses one table ``W`` twice: as an embedding
(``W[x]``) and, with ``reverse=True``, as the output projection
(``logits = h @ W^T``). Each use has its own K-FAC approximation with a
diagonal vocabulary-side factor; the block preconditions with the exact
inverse of their (damped) sum, which a generalised eigendecomposition of the
two ``dim x dim`` factors makes as cheap as one Kronecker solve.
"""

import keras
import tensorflow as tf
from keras import ops
from keras.src.backend import get_keras_mask, set_keras_mask

from keras_hoopt import linalg
from keras_hoopt.blocks.base import CurvatureBlock
from keras_hoopt.blocks.embedding import diagonal_pi_damping, is_dense_tensor, row_counts, scale_rows, token_ids
from keras_hoopt.blocks.registry import register_block

_EMBEDDING, _REVERSE = 0, 1  # the two uses, in the order of the "M" statistic


def _generalized_eigh(m1, m2):
    """``(P, s)`` with ``P^T m1 P = I`` and ``P^T m2 P = diag(s)`` for SPD ``[..., n, n]`` pairs.

    ``m1 = L L^T`` (Cholesky), ``L^-1 m2 L^-T = U diag(s) U^T`` (eigh),
    ``P = L^-T U``. Non-finite values (never an exception) when ``m1`` is not
    positive definite.
    """
    chol = tf.linalg.cholesky(m1)
    eye = tf.eye(int(m1.shape[-1]), batch_shape=m1.shape[:-2], dtype=m1.dtype)
    chol_inv = tf.linalg.triangular_solve(chol, eye, lower=True)
    whitened = linalg.symmetrize(chol_inv @ m2 @ tf.linalg.matrix_transpose(chol_inv))
    # eigh raises on non-finite input (on CPU) where Cholesky returns NaN: hand it the
    # identity instead and keep the NaN in the basis, so the caller sees the failure.
    whitened = tf.where(linalg.all_finite(whitened), whitened, eye)
    eigenvalues, vectors = tf.linalg.eigh(whitened)
    return tf.linalg.matrix_transpose(chol_inv) @ vectors, eigenvalues


def _block_generalized_eigh(m1, m2, split_dim):
    """:func:`_generalized_eigh` of the diagonal ``split_dim`` blocks of ``(m1, m2)`` (THOR's split).

    Returns the block-diagonal ``[n, n]`` basis and the ``[n]`` eigenvalues in
    the order of the blocks; exact when ``n <= split_dim`` or ``split_dim`` is None.
    """
    size = int(m1.shape[-1])
    if split_dim is None or size <= split_dim:
        return _generalized_eigh(m1, m2)
    full, rest = divmod(size, split_dim)
    bounds = [(i * split_dim, (i + 1) * split_dim) for i in range(full)]
    basis, values = _generalized_eigh(
        tf.stack([m1[a:b, a:b] for a, b in bounds]), tf.stack([m2[a:b, a:b] for a, b in bounds])
    )
    pieces, eigenvalues = [basis[i] for i in range(full)], [tf.reshape(values, [-1])]
    if rest:
        tail_basis, tail_values = _generalized_eigh(m1[full * split_dim:, full * split_dim:],
                                                    m2[full * split_dim:, full * split_dim:])
        pieces.append(tail_basis)
        eigenvalues.append(tail_values)
    operator = tf.linalg.LinearOperatorBlockDiag([tf.linalg.LinearOperatorFullMatrix(p) for p in pieces])
    return operator.to_dense(), tf.concat(eigenvalues, axis=0)


def damped_generalized_eigh(m1, m2, damping1, damping2, split_dim=None):
    """``(basis, eigenvalues, ok)`` of the pair ``(m1 + damping1 I, m2 + damping2 I)``.

    Retries with both dampings 10x, 100x, 1000x larger (as
    :func:`keras_hoopt.linalg.damped_inverse`) when a factorisation yields
    non-finite values or a non-positive eigenvalue; ``ok`` is False when every
    attempt failed.
    """
    eye = tf.eye(int(m1.shape[-1]), dtype=m1.dtype)

    def body(k, basis, eigenvalues, ok):
        growth = tf.pow(tf.cast(linalg.RETRY_GROWTH, m1.dtype), tf.cast(k, m1.dtype))
        basis, eigenvalues = _block_generalized_eigh(
            m1 + damping1 * growth * eye, m2 + damping2 * growth * eye, split_dim
        )
        ok = tf.logical_and(linalg.all_finite_together([basis, eigenvalues]), tf.reduce_all(eigenvalues > 0.0))
        return k + 1, basis, eigenvalues, ok

    def cond(k, basis, eigenvalues, ok):
        return tf.logical_and(k < linalg.MAX_ATTEMPTS, tf.logical_not(ok))

    _, basis, eigenvalues, ok = tf.while_loop(
        cond, body, (tf.constant(0), tf.zeros_like(m1), tf.zeros_like(m1[0]), tf.constant(False))
    )
    return basis, eigenvalues, ok


def _examples(call):
    return tf.cast(tf.shape(call.inputs)[0], tf.float32)


@register_block
class ReversibleEmbeddingBlock(CurvatureBlock):
    """Curvature of a ReversibleEmbedding: the exact solve of the sum of its two K-FAC terms.

    With the ``[vocab, dim]`` table ``W`` (vectorised row-major), each use of
    ``W`` has a K-FAC(-expand) approximation of its Fisher with a diagonal
    vocabulary-side factor:

    * **embedding** (``W[x]``; ``g``: per-example gradient of the loss w.r.t.
      the looked-up vectors): ``D1 (x) M1`` with ``D1 = diag(counts) / N``
      and ``M1 = E_n[(1/|T|) sum_t g g^T]``, exactly
      :class:`~keras_hoopt.blocks.embedding.EmbeddingBlock`;
    * **reverse** (``logits = h W^T``; ``h``: the inputs, ``delta``: the
      per-example gradient w.r.t. the logits, before ``logit_soft_cap``):
      the Dense factors of the kernel ``W^T`` are ``M2 = E_n[sum_t h h^T]``
      (input side) and ``E_n[(1/|T|) sum_t delta delta^T]`` (vocab x vocab);
      only that factor's diagonal ``D2`` is kept (and computed: the full
      matrix is never formed), giving ``D2 (x) M2``.

    Each term is damped as K-FAC damps one layer (factored Tikhonov, with
    ``pi_i = sqrt(mean(d_i) / (tr M_i / dim))``), and the preconditioned
    gradient solves the sum exactly::

        (D1' (x) M1' + D2' (x) M2') vec(dW_pre) = vec(dW)
        D_i' = D_i + pi_i sqrt(l) I,   M_i' = M_i + sqrt(l)/pi_i I

    Both vocabulary factors are diagonal, so row ``v`` of ``dW`` solves with
    ``F_v = c1_v M1' + c2_v M2'`` (``c_i = diag(D_i')``). With the generalised
    eigendecomposition ``P^T M1' P = I``, ``P^T M2' P = diag(s)`` (Cholesky of
    ``M1'``, then ``eigh`` of ``L^-1 M2' L^-T``; the device Martens & Grosse
    2015 describe for inverting ``A (x) B + C (x) D``), every ``F_v`` is
    diagonal in the basis ``P``: ``F_v^-1 = P diag(1 / (c1_v + c2_v s)) P^T``,
    so the whole solve is two ``[vocab, dim] x [dim, dim]`` products and an
    elementwise divide::

        dW_pre = (dW P / S) P^T,   S[v, j] = c1_v + c2_v s_j

    This treats the two uses of the tied weight as independent (their
    cross term ``E[dW_1 dW_2^T]`` is dropped), as K-FAC-expand treats the
    positions of a weight-shared layer (Eschenhagen et al. 2023,
    "Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures"); it is closest to K-FAC-expand, except that the two
    per-use Kronecker products are not merged into one Kronecker product but
    solved exactly as a sum.

    Preconditioner state (the diagonals stay statistics): statistic ``"M"``
    (``[2, dim, dim]``, ``M1`` and ``M2``) keeps ``"basis"`` ``P`` and
    ``"eigenvalues"`` ``s``; ``"D_embedding"`` and ``"D_reverse"`` keep their
    ``"damped"`` diagonals ``c1``, ``c2``. A refresh policy that re-inverts one
    statistic alone (SP-NGD) leaves the others as last computed: the update is
    then the exact solve with those (slightly stale) damped factors.

    A use that has no statistics (the layer was only called one way: its
    ``D`` and ``M`` are zero) drops out (``c = 0``): a layer only used as an
    embedding is preconditioned exactly as an ``Embedding``
    (``diag(1/c1) dW M1'^-1``), one only used in reverse as a Dense kernel
    with a diagonal output factor (``diag(1/c2) dW M2'^-1``).

    With ``tie_weights=False`` the reverse kernel ``K`` (``[dim, vocab]``) is
    a separate variable with the Dense-like treatment ``M2'^-1 dK diag(1/c2)``
    and the table gets ``diag(1/c1) dW M1'^-1``; both inverses come from the
    same state (``M1'^-1 = P P^T``, ``M2'^-1 = P diag(1/s) P^T``).

    THOR's ``split_dim`` splits ``M1`` and ``M2`` into their diagonal blocks
    (one generalised eigendecomposition per block pair).

    Supports ``mask_zero`` (masked ids are counted: they still look up their
    row), ``reverse_dtype``, ``logit_soft_cap`` (the logits before the cap
    are the pre-activation), ``embeddings_constraint``, inputs of any rank.
    Rejects LoRA, quantized layers and subclasses that override ``call``; a
    call whose ``reverse`` is not a Python bool, or whose ids are sparse or
    ragged, runs but is not recorded (the layer keeps its last preconditioner
    in such steps).
    """

    kind = "reversible_embedding"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.ReversibleEmbedding)
            and type(layer).call is keras.layers.ReversibleEmbedding.call
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    @staticmethod
    def layer_variables(layer):
        return [layer.embeddings] + ([] if layer.tie_weights else [layer.reverse_embeddings])

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, reverse=False):
        if not isinstance(reverse, bool) or not is_dense_tensor(inputs):
            return original_call(inputs, reverse=reverse)  # not recorded: the call stays incomplete
        record.extras["reverse"] = reverse
        if not reverse:
            outputs = original_call(inputs, reverse=False)
            mask = get_keras_mask(outputs)
            record.inputs = inputs
            outputs = record.tap(outputs)
            if mask is not None:
                set_keras_mask(outputs, mask)
            return outputs
        # ReversibleEmbedding.call(reverse=True), with the logits tapped before the soft cap.
        kernel = ops.transpose(layer.embeddings) if layer.tie_weights else layer.reverse_embeddings
        if layer.reverse_dtype is not None:
            inputs = ops.cast(inputs, layer.reverse_dtype)
            kernel = ops.cast(kernel, layer.reverse_dtype)
        record.inputs = inputs
        logits = record.tap(ops.matmul(inputs, kernel))
        if layer.logit_soft_cap is not None:
            soft_cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, soft_cap)), soft_cap)
        return logits

    @property
    def tied(self):
        return len(self.variables) == 1

    @property
    def vocabulary_size(self):
        return int(self.variables[0].shape[0])

    @property
    def embedding_dim(self):
        return int(self.variables[0].shape[1])

    def statistic_shapes(self):
        vocab, dim = self.vocabulary_size, self.embedding_dim
        return {"D_embedding": (vocab,), "D_reverse": (vocab,), "M": (2, dim, dim)}

    def needs_output_grads(self, name):
        return name != "D_embedding"

    # -- statistics -----------------------------------------------------------
    def compute_statistic(self, name, calls, output_grads):
        vocab, dim = self.vocabulary_size, self.embedding_dim
        embedding = [i for i, c in enumerate(calls) if not c.extras["reverse"]]
        reverse = [i for i, c in enumerate(calls) if c.extras["reverse"]]
        if name == "D_embedding":
            if not embedding:
                return tf.zeros((vocab,))
            ids = tf.concat([token_ids(calls[i].inputs, vocab) for i in embedding], axis=0)
            return row_counts(ids, vocab) / _examples(calls[embedding[0]])
        if name == "D_reverse":
            if not reverse:
                return tf.zeros((vocab,))
            grads = output_grads()
            delta = tf.concat([tf.reshape(grads[i], (-1, vocab)) for i in reverse], axis=0)
            return tf.reduce_sum(tf.square(delta), axis=0) / tf.cast(tf.shape(delta)[0], tf.float32)
        factors = [tf.zeros((dim, dim)), tf.zeros((dim, dim))]
        if embedding:
            grads = output_grads()
            g = tf.concat([tf.reshape(grads[i], (-1, dim)) for i in embedding], axis=0)
            factors[_EMBEDDING] = tf.matmul(g, g, transpose_a=True) / tf.cast(tf.shape(g)[0], tf.float32)
        if reverse:
            h = tf.concat([tf.reshape(tf.cast(calls[i].inputs, tf.float32), (-1, dim)) for i in reverse], axis=0)
            factors[_REVERSE] = tf.matmul(h, h, transpose_a=True) / _examples(calls[reverse[0]])
        return tf.stack(factors)

    # -- preconditioner -------------------------------------------------------
    def _dampings(self, statistics, damping):
        """``[(vocab-side damping, dim-side damping, used)]`` of the two uses."""
        root = tf.sqrt(tf.cast(damping, tf.float32))
        out = []
        for diagonal, factor in ((statistics["D_embedding"], statistics["M"][_EMBEDDING]),
                                 (statistics["D_reverse"], statistics["M"][_REVERSE])):
            pi = diagonal_pi_damping(diagonal, factor)
            used = tf.logical_or(tf.reduce_sum(diagonal) > 0.0, tf.linalg.trace(factor) > 0.0)
            out.append((pi * root, root / pi, used))
        return out

    def preconditioner_layout(self, name):
        dim, vocab = self.embedding_dim, self.vocabulary_size
        if name == "M":
            return {"basis": ((dim, dim), "identity"), "eigenvalues": ((dim,), "ones")}
        # Before the first refresh a tied layer's solve is then the identity.
        initial = "zeros" if name == "D_reverse" and self.tied else "ones"
        return {"damped": ((vocab,), initial)}

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        dampings = self._dampings(statistics, damping)
        if name == "M":
            basis, eigenvalues, ok = damped_generalized_eigh(
                statistics["M"][_EMBEDDING], statistics["M"][_REVERSE], dampings[_EMBEDDING][1],
                dampings[_REVERSE][1], split_dim,
            )
            return {"basis": basis, "eigenvalues": eigenvalues}, ok
        use = _EMBEDDING if name == "D_embedding" else _REVERSE
        vocab_damping, _, used = dampings[use]
        damped = statistics[name] + vocab_damping
        if self.tied:  # an unused term drops out of the sum
            damped = tf.where(used, damped, tf.zeros_like(damped))
        ok = tf.logical_and(linalg.all_finite(damped), tf.reduce_all(damped >= 0.0))
        if not self.tied:
            ok = tf.logical_and(ok, tf.reduce_all(damped > 0.0))
        return {"damped": damped}, ok

    def apply_preconditioner(self, grads, state):
        basis, eigenvalues = state["M"]["basis"], state["M"]["eigenvalues"]
        c1, c2 = state["D_embedding"]["damped"], state["D_reverse"]["damped"]
        vocab = self.vocabulary_size
        if self.tied:

            def solve(rows, ids):
                scale = tf.gather(c1, ids)[:, None] + tf.gather(c2, ids)[:, None] * eigenvalues[None, :]
                return tf.matmul((rows @ basis) / scale, basis, transpose_b=True)

            return [scale_rows(grads[0], vocab, solve)]

        def embedding_solve(rows, ids):  # diag(1/c1) dW M1'^-1, M1'^-1 = P P^T
            return tf.matmul(rows @ basis, basis, transpose_b=True) / tf.gather(c1, ids)[:, None]

        kernel = tf.cast(grads[1], tf.float32)  # [dim, vocab]: M2'^-1 dK diag(1/c2), M2'^-1 = P diag(1/s) P^T
        reverse = basis @ (tf.matmul(basis, kernel, transpose_a=True) / eigenvalues[:, None]) / c2[None, :]
        return [scale_rows(grads[0], vocab, embedding_solve), reverse]

    def damped_fisher_trace(self, statistics, damping):
        # tr(D1 (x) M1 + D2 (x) M2 + l I) over the block's parameters
        size = float(self.vocabulary_size * self.embedding_dim * len(self.variables))
        terms = [tf.reduce_sum(statistics[d]) * tf.linalg.trace(statistics["M"][use])
                 for d, use in (("D_embedding", _EMBEDDING), ("D_reverse", _REVERSE))]
        return terms[0] + terms[1] + damping * size

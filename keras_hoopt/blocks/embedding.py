"""Curvature block for ``keras.layers.Embedding`` (K-FAC with a diagonal input factor)."""

import keras
import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.base import CurvatureBlock
from keras_hoopt.blocks.registry import register_block


def diagonal_pi_damping(diagonal, matrix):
    """Factored-Tikhonov ``pi = sqrt(mean(diagonal) / (tr(matrix) / dim))``.

    Martens & Grosse's ratio (:func:`keras_hoopt.linalg.pi_damping`) for a
    Kronecker pair whose first factor is kept as its diagonal ``(n,)``: the
    diagonal's mean is that factor's mean eigenvalue. Falls back to 1 when
    either mean is non-positive or not finite.
    """
    ratio = tf.reduce_mean(diagonal) / linalg.mean_eigenvalue(matrix)
    usable = tf.logical_and(tf.math.is_finite(ratio), ratio > 0.0)
    return tf.where(usable, tf.sqrt(tf.where(usable, ratio, 1.0)), tf.ones_like(ratio))


def token_ids(inputs, vocabulary_size):
    """Flat ``[rows]`` ids exactly as ``Embedding.call`` looks them up.

    Non-integer ids are cast to int32 (as the layer does) and negative ids
    count from the end of the table (``ops.take``'s ``"fill"`` convention on
    the TensorFlow backend).
    """
    ids = tf.reshape(inputs, [-1])
    if ids.dtype not in (tf.int32, tf.int64):
        ids = tf.cast(ids, tf.int32)
    return tf.where(ids < 0, ids + tf.cast(vocabulary_size, ids.dtype), ids)


def row_counts(ids, vocabulary_size):
    """``(vocab,)`` float32 number of times each row is looked up (no one-hot is formed)."""
    return tf.math.unsorted_segment_sum(tf.ones_like(ids, tf.float32), ids, vocabulary_size)


def scale_rows(grad, rows, transform):
    """``transform(row_values, row_ids)`` applied to the non-zero rows of ``grad``, as a dense tensor.

    ``transform`` must act on each row separately and linearly (a row-wise
    preconditioner), so a sparse gradient (``IndexedSlices``, what
    ``tf.gather`` gives) is transformed on the rows it holds only and its
    duplicate rows may be summed after the transform.
    """
    if isinstance(grad, tf.IndexedSlices):
        values = transform(tf.cast(grad.values, tf.float32), grad.indices)
        return tf.math.unsorted_segment_sum(values, grad.indices, rows)
    return transform(tf.cast(grad, tf.float32), tf.range(rows))


def is_dense_tensor(x):
    """A plain tensor (not sparse, not ragged)."""
    return tf.is_tensor(x) and not isinstance(x, (tf.SparseTensor, tf.RaggedTensor))


@register_block
class EmbeddingBlock(CurvatureBlock):
    """K-FAC block of an Embedding layer: a Dense layer on one-hot inputs.

    With ``W`` the ``[vocab, dim]`` table, ``output[n, t] = W[x_{n,t}]`` is
    ``W^T e_{x_{n,t}}`` for the one-hot ``e``. The per-example gradient is
    ``dW_n = sum_t e_{x_{n,t}} g_{n,t}^T`` (``g`` the per-example gradient of
    the loss w.r.t. the looked-up vector), and K-FAC's factors (the
    ``A``/``G`` convention of :class:`~keras_hoopt.blocks.base.KroneckerBlock`,
    i.e. K-FAC-expand over the positions ``t``) are::

        A = E_n[ sum_t e_{x_{n,t}} e_{x_{n,t}}^T ] = diag(counts) / N   (vocab,)
        G = E_n[ (1/|T|) sum_t g_{n,t} g_{n,t}^T ]                      (dim x dim)

    ``A`` is exactly diagonal, so it is kept as its diagonal: the number of
    times each row was looked up in the batch over the number of examples
    (computed with a segment sum: no one-hot is formed). The Fisher block of
    ``W`` (row-major) is ``diag(a) (x) G`` and the preconditioned gradient,
    with factored Tikhonov damping and ``pi = sqrt(mean(a) / (tr G / dim))``,
    is::

        dW_pre = diag(1 / (a + pi sqrt(l))) dW (G + sqrt(l)/pi I)^-1

    Rows that no example looked up have ``a = 0`` and a zero gradient, so they
    stay zero. THOR's ``split_dim`` splits ``G`` only (the diagonal is already
    split). A sparse gradient (``IndexedSlices``) is preconditioned on its
    rows only.

    Supports inputs of any rank (every position is a location ``t``), int32,
    int64 or float ids (cast as the layer does), negative ids (counted from the
    end, as ``ops.take``), ``mask_zero`` (a masked id still looks up its row:
    it is counted, and its gradient is whatever the loss gave it) and
    ``embeddings_constraint`` (Keras applies it after the update). Rejects
    LoRA and quantized layers and subclasses that override ``call``; sparse or
    ragged id tensors are looked up but not recorded (the layer keeps its last
    preconditioner in such steps).

    References:
        Martens & Grosse 2015 (K-FAC, factored Tikhonov damping);
        Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for
        Modern Neural Network Architectures" (K-FAC-expand).
    """

    kind = "embedding"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.Embedding)
            and type(layer).call is keras.layers.Embedding.call
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    @staticmethod
    def layer_variables(layer):
        return [layer.embeddings]

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        outputs = original_call(inputs)
        if not is_dense_tensor(inputs):
            return outputs  # not recorded: the call stays incomplete
        record.inputs = inputs
        return record.tap(outputs)

    @property
    def vocabulary_size(self):
        return int(self.variables[0].shape[0])

    @property
    def embedding_dim(self):
        return int(self.variables[0].shape[1])

    def statistic_shapes(self):
        return {"A": (self.vocabulary_size,), "G": (self.embedding_dim, self.embedding_dim)}

    def needs_output_grads(self, name):
        return name != "A"

    def looked_up_ids(self, call):
        """Flat ``[rows]`` ids of one call."""
        return token_ids(call.inputs, self.vocabulary_size)

    def compute_statistic(self, name, calls, output_grads):
        if name == "A":
            ids = tf.concat([self.looked_up_ids(c) for c in calls], axis=0)
            examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
            return row_counts(ids, self.vocabulary_size) / examples
        g = tf.concat([tf.reshape(grad, (-1, self.embedding_dim)) for grad in output_grads()], axis=0)
        return tf.matmul(g, g, transpose_a=True) / tf.cast(tf.shape(g)[0], tf.float32)

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        pi = diagonal_pi_damping(statistics["A"], statistics["G"])
        root = tf.sqrt(tf.cast(damping, tf.float32))
        if name == "A":
            damped = statistics["A"] + pi * root
            inverse = tf.math.reciprocal(damped)
            return inverse, tf.logical_and(linalg.all_finite(inverse), tf.reduce_all(damped > 0.0))
        return linalg.block_diagonal_damped_inverse(statistics["G"], root / pi, split_dim)

    def damped_fisher_trace(self, statistics, damping):
        # tr(diag(a) (x) G + l I) = sum(a) tr(G) + l vocab dim
        size = float(self.vocabulary_size * self.embedding_dim)
        return tf.reduce_sum(statistics["A"]) * tf.linalg.trace(statistics["G"]) + damping * size

    def precondition(self, grads, inverses):
        inverse_a, inverse_g = inverses["A"], inverses["G"]

        def transform(rows, ids):
            return (rows * tf.gather(inverse_a, ids)[:, None]) @ inverse_g

        return [scale_rows(grads[0], self.vocabulary_size, transform)]

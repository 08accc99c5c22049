"""Curvature block for keras_hub's ``PositionEmbedding`` (an Embedding looked up by position)."""

import sys

import tensorflow as tf

from keras_hoopt.blocks.embedding import EmbeddingBlock, is_dense_tensor
from keras_hoopt.blocks.registry import register_block


def _position_embedding_class():
    """keras_hub's ``PositionEmbedding``, or None when keras_hub was not imported.

    A layer of that class can only exist once keras_hub is imported, so this
    never imports it (keras_hub is not a dependency of keras_hoopt).
    """
    keras_hub = sys.modules.get("keras_hub")
    layers = getattr(keras_hub, "layers", None)
    return getattr(layers, "PositionEmbedding", None)


@register_block
class PositionEmbeddingBlock(EmbeddingBlock):
    """K-FAC block of ``keras_hub.layers.PositionEmbedding``: an Embedding of the positions.

    The layer returns ``W[p_t]`` (``W``: ``[sequence_length, dim]``) broadcast
    to the input's shape, with positions ``p_t = start_index + t`` or the
    ``positions`` argument; a model adds it to the token embeddings. It is an
    Embedding whose ids are the positions, so the factors are those of
    :class:`~keras_hoopt.blocks.embedding.EmbeddingBlock`:
    ``A = diag(counts) / N`` (with contiguous positions every example looks
    each of its ``T`` positions up once: ``A`` is 1 on the first ``T`` rows
    and 0 elsewhere, or more for inputs of rank > 3, where every leading
    position counts) and ``G = E_n[(1/|T|) sum_t g g^T]`` from the gradient
    w.r.t. the layer output, preconditioned with
    ``diag(1/(a + pi sqrt(l))) dW (G + sqrt(l)/pi I)^-1``.

    Matches keras_hub's ``PositionEmbedding`` (and subclasses keeping its
    ``call``) once keras_hub is imported. Positions supplied by a vLLM serving
    context are not seen (there is no training there).
    """

    kind = "position_embedding"

    @classmethod
    def matches(cls, layer):
        layer_class = _position_embedding_class()
        return layer_class is not None and isinstance(layer, layer_class) and type(layer).call is layer_class.call

    @staticmethod
    def layer_variables(layer):
        return [layer.position_embeddings]

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, start_index=0, positions=None):
        outputs = original_call(inputs, start_index=start_index, positions=positions)
        if not is_dense_tensor(inputs):
            return outputs  # not recorded: the call stays incomplete
        shape = tf.shape(inputs)
        if positions is None:
            ids = tf.range(shape[-2]) + tf.cast(start_index, tf.int32)
        else:
            ids = tf.convert_to_tensor(positions)
            ids = ids if ids.shape.rank > 1 else ids[None]
        record.extras["positions"] = tf.broadcast_to(ids, shape[:-1])
        record.inputs = inputs
        return record.tap(outputs)

    def looked_up_ids(self, call):
        ids = tf.reshape(call.extras["positions"], [-1])
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        return tf.where(ids < 0, ids + tf.cast(self.vocabulary_size, ids.dtype), ids)

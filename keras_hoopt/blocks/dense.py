"""Curvature block for ``keras.layers.Dense`` (bias folded into the kernel)."""

import keras
import tensorflow as tf
from keras import ops

from keras_hoopt.blocks.base import KroneckerBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class DenseBlock(KroneckerBlock):
    """K-FAC block of a Dense layer.

    Inputs of rank > 2 (``[batch, ..., d_in]``, e.g. a Dense applied to every
    time step) count every leading position as a location ``t`` (see
    :class:`~keras_hoopt.blocks.base.KroneckerBlock`).
    """

    kind = "dense"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.Dense)
            and type(layer).call is keras.layers.Dense.call
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, training=None):
        record.inputs = inputs
        outputs = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            outputs = ops.add(outputs, layer.bias)
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    def input_rows(self, call):
        rows = tf.reshape(tf.cast(call.inputs, tf.float32), (-1, self.input_dim - int(self.has_bias)))
        return self._append_bias_column(rows)

    def output_rows(self, grad):
        return tf.reshape(grad, (-1, self.output_dim))

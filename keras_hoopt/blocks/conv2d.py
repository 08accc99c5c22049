"""Curvature block for ``keras.layers.Conv2D`` (KFC, Grosse & Martens 2016)."""

import keras
import tensorflow as tf
from keras import ops
from keras.src.layers.convolutional.base_conv import BaseConv

from keras_hoopt.blocks.base import KroneckerBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class Conv2DBlock(KroneckerBlock):
    """K-FAC block of a Conv2D layer (any kernel size, strides, padding, dilation).

    ``a_{n,t}`` is the im2col patch (``kh * kw * C_in``, ordered like the
    kernel's first three axes, plus 1 for the bias) feeding output location
    ``t``; ``g_{n,t}`` the per-example gradient at that location. Grouped
    convolutions (``groups > 1``) are not handled by this block.
    """

    kind = "conv2d"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.Conv2D)
            and type(layer).call is BaseConv.call
            and getattr(layer, "groups", 1) == 1
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        record.inputs = inputs
        outputs = layer.convolution_op(inputs, layer.kernel)
        if layer.use_bias:
            if layer.data_format == "channels_last":
                bias_shape = (1, 1, 1, layer.filters)
            else:
                bias_shape = (1, layer.filters, 1, 1)
            outputs = ops.add(outputs, ops.reshape(layer.bias, bias_shape))
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    def _channels_last(self, x):
        if self.layer.data_format == "channels_first":
            return tf.transpose(x, (0, 2, 3, 1))
        return x

    def input_rows(self, call):
        layer = self.layer
        x = self._channels_last(tf.cast(call.inputs, tf.float32))
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        patches = tf.image.extract_patches(
            x,
            sizes=[1, kh, kw, 1],
            strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1],
            padding=layer.padding.upper(),
        )
        rows = tf.reshape(patches, (-1, self.input_dim - int(self.has_bias)))
        return self._append_bias_column(rows)

    def output_rows(self, grad):
        return tf.reshape(self._channels_last(grad), (-1, self.output_dim))

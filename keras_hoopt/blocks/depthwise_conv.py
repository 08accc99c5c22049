"""Curvature blocks for ``keras.layers.DepthwiseConv1D`` and ``DepthwiseConv2D`` (per-channel KFC)."""

import keras
import tensorflow as tf
from keras import ops
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

from keras_hoopt.blocks import _depthwise
from keras_hoopt.blocks.base import CurvatureBlock
from keras_hoopt.blocks.registry import register_block


class _DepthwiseConvBlock(CurvatureBlock):
    """K-FAC block of a depthwise convolution: one Kronecker factor pair per input channel.

    Input channel ``c`` is its own small convolution (kernel ``w[..., c, :]``,
    ``K = prod(kernel_size)`` inputs, ``depth_multiplier = m`` outputs, and
    the bias of those ``m`` outputs folded in as a trailing input 1), so the
    Fisher is approximated block-diagonally over channels, each block by KFC
    (Grosse & Martens 2016)::

        A_c = E_n[ sum_t a_{n,t,c} a_{n,t,c}^T ]          [C, K (+1), K (+1)]
        G_c = E_n[ (1/|T|) sum_t g_{n,t,c} g_{n,t,c}^T ]  [C, m, m]

    (``t`` the output locations, ``a`` the channel's window, ``g`` the
    per-example gradients of its ``m`` pre-activation outputs), inverted with
    factored Tikhonov damping of each channel's own ``pi_c`` (see
    :mod:`keras_hoopt.blocks._depthwise`). Statistics ``"A"`` and ``"G"``.

    Supports any kernel size, strides, dilation rate (also strides and
    dilation together), ``"valid"``/``"same"`` padding, both data formats and
    any depth multiplier. Rejected (first-order update): subclasses that
    override ``call``, quantized layers, and a ``channels_first`` layer whose
    last output axis is as long as its channel count (Keras's TensorFlow
    backend adds that layer's bias along the wrong axis; see
    :func:`~keras_hoopt.blocks._depthwise.bias_add_misbroadcasts`).
    """

    layer_class = None
    rank = None

    @classmethod
    def matches(cls, layer):
        if not (
            isinstance(layer, cls.layer_class)
            and type(layer).call is BaseDepthwiseConv.call
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and _depthwise.supported_geometry(layer, cls.rank)
        ):
            return False
        kernel = getattr(layer, "kernel", None)
        channels = None if kernel is None else int(kernel.shape[-2]) * int(kernel.shape[-1])
        return channels is None or not _depthwise.bias_add_misbroadcasts(layer, channels)

    @staticmethod
    def layer_variables(layer):
        return [layer.kernel] + ([layer.bias] if layer.bias is not None else [])

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        # BaseDepthwiseConv.call, with the pre-activation tapped.
        record.inputs = inputs
        outputs = ops.depthwise_conv(
            inputs,
            layer.kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            outputs = ops.add(outputs, ops.reshape(layer.bias, _depthwise.bias_shape(layer, int(layer.bias.shape[0]))))
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    def __init__(self, layer):
        super().__init__(layer)
        self.factors = _depthwise.PerChannelKronecker(layer, layer.kernel, layer.bias is not None)

    def statistic_shapes(self):
        a_shape, g_shape = self.factors.shapes()
        return {"A": a_shape, "G": g_shape}

    def compute_statistic(self, name, calls, output_grads):
        if name == "A":
            examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
            return self.factors.input_factor([c.inputs for c in calls], examples)
        return self.factors.output_factor(output_grads())

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        return self.factors.damped_inverse(statistics["A"], statistics["G"], name, damping, split_dim)

    def damped_fisher_trace(self, statistics, damping):
        return self.factors.damped_fisher_trace(statistics["A"], statistics["G"], damping)

    def precondition(self, grads, inverses):
        bias_grad = grads[1] if self.factors.has_bias else None
        return self.factors.precondition(grads[0], bias_grad, inverses["A"], inverses["G"])


@register_block
class DepthwiseConv1DBlock(_DepthwiseConvBlock):
    __doc__ = _DepthwiseConvBlock.__doc__
    kind = "depthwise_conv1d"
    layer_class = keras.layers.DepthwiseConv1D
    rank = 1


@register_block
class DepthwiseConv2DBlock(_DepthwiseConvBlock):
    __doc__ = _DepthwiseConvBlock.__doc__
    kind = "depthwise_conv2d"
    layer_class = keras.layers.DepthwiseConv2D
    rank = 2

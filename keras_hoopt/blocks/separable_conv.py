"""Curvature blocks for ``keras.layers.SeparableConv1D`` and ``SeparableConv2D``."""

import keras
import tensorflow as tf
from keras import ops
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

from keras_hoopt import linalg
from keras_hoopt.blocks import _depthwise
from keras_hoopt.blocks.base import CurvatureBlock
from keras_hoopt.blocks.registry import register_block

DEPTHWISE = "depthwise"  # the tap of the depthwise result (the pointwise part's input)


class _SeparableConvBlock(CurvatureBlock):
    """K-FAC block of a separable convolution: a depthwise and a pointwise Kronecker part.

    The layer computes ``u = depthwise(x; w_d)`` (``C * m`` channels, no bias),
    then ``s = pointwise(u; W_p) + b`` (a ``1 x 1`` convolution to ``F``
    filters). Its Fisher is approximated block-diagonally over the two parts
    (and, within the depthwise part, over input channels):

    * depthwise kernel: per input channel ``c`` the KFC factors ``A_c``, ``G_c``
      of :mod:`keras_hoopt.blocks._depthwise`, with ``g`` the per-example
      gradient of the depthwise output ``u`` (statistics ``"depthwise_A"``
      ``[C, K, K]`` and ``"depthwise_G"`` ``[C, m, m]``);
    * pointwise kernel and bias: a Conv2D-style Kronecker block with input
      ``[u_{n,t}; 1]`` and the gradient of the pre-activation ``s``::

          pointwise_A = E_n[ sum_t [u;1][u;1]^T ]      (C m (+1) square)
          pointwise_G = E_n[ (1/|T|) sum_t g g^T ]     (F x F)

    Each part has its own factored Tikhonov damping (``pi`` per input channel
    in the depthwise part, one ``pi`` for the pointwise part); see Grosse &
    Martens (2016) for KFC. ``capture_call`` runs the two convolutions
    separately (in ``channels_last``, as Keras's TensorFlow backend does on
    CPU) and taps ``u`` (tap ``"depthwise"``) and ``s`` (tap ``"output"``).

    Variables, in :meth:`precondition` order: ``depthwise_kernel``,
    ``pointwise_kernel`` and ``bias`` (if any). Supports any kernel size,
    strides, dilation rate, ``"valid"``/``"same"`` padding, both data
    formats and any depth multiplier. Rejected (first-order update):
    subclasses that override ``call``, and a ``channels_first`` layer whose
    last output axis is as long as ``filters`` (Keras adds its bias along the
    wrong axis, see :func:`~keras_hoopt.blocks._depthwise.bias_add_misbroadcasts`).
    """

    layer_class = None
    rank = None

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, cls.layer_class)
            and type(layer).call is BaseSeparableConv.call
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and _depthwise.supported_geometry(layer, cls.rank)
            and not _depthwise.bias_add_misbroadcasts(layer, layer.filters)
        )

    @staticmethod
    def layer_variables(layer):
        return [layer.depthwise_kernel, layer.pointwise_kernel] + ([layer.bias] if layer.bias is not None else [])

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        # BaseSeparableConv.call with ops.separable_conv split in two (what
        # tf.nn.separable_conv2d does: depthwise_conv2d, then a 1x1 conv2d).
        # TensorFlow's CPU Conv2D has no NCHW kernel, so a channels_first
        # layer runs both in channels_last, like the backend on CPU.
        record.inputs = inputs
        channels_first = layer.data_format == _depthwise.CHANNELS_FIRST
        x = _depthwise.to_channels_last(inputs, layer.data_format)
        depthwise = ops.depthwise_conv(
            x,
            layer.depthwise_kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=_depthwise.CHANNELS_LAST,
        )
        depthwise = record.tap(depthwise, name=DEPTHWISE)
        outputs = ops.conv(
            depthwise, layer.pointwise_kernel, strides=1, padding="valid", data_format=_depthwise.CHANNELS_LAST
        )
        if channels_first:
            outputs = _depthwise.to_channels_first(outputs)
        if layer.use_bias:
            outputs = ops.add(outputs, ops.reshape(layer.bias, _depthwise.bias_shape(layer, layer.filters)))
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    def __init__(self, layer):
        super().__init__(layer)
        self.has_bias = layer.bias is not None
        self.depthwise = _depthwise.PerChannelKronecker(layer, layer.depthwise_kernel, has_bias=False)
        self.pointwise_shape = tuple(int(d) for d in layer.pointwise_kernel.shape)
        self.pointwise_input_dim = self.pointwise_shape[-2] + int(self.has_bias)
        self.filters = self.pointwise_shape[-1]

    def statistic_shapes(self):
        a_shape, g_shape = self.depthwise.shapes()
        return {
            "depthwise_A": a_shape,
            "depthwise_G": g_shape,
            "pointwise_A": (self.pointwise_input_dim, self.pointwise_input_dim),
            "pointwise_G": (self.filters, self.filters),
        }

    # -- statistics ---------------------------------------------------------
    def _pointwise_input_rows(self, call):
        """``[rows, C m (+1)]``: the depthwise output (channels_last) at every location."""
        u = tf.cast(call.outputs[DEPTHWISE], tf.float32)
        rows = tf.reshape(u, (-1, self.pointwise_shape[-2]))
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
        return rows

    def _pointwise_output_rows(self, grad):
        g = _depthwise.to_channels_last(tf.cast(grad, tf.float32), self.layer.data_format)
        return tf.reshape(g, (-1, self.filters))

    def compute_statistic(self, name, calls, output_grads):
        examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
        if name == "depthwise_A":
            return self.depthwise.input_factor([c.inputs for c in calls], examples)
        if name == "depthwise_G":
            # The depthwise tap is channels_last whatever the layer's data_format.
            return self.depthwise.output_factor(output_grads(DEPTHWISE), _depthwise.CHANNELS_LAST)
        if name == "pointwise_A":
            rows = tf.concat([self._pointwise_input_rows(c) for c in calls], axis=0)
            return tf.matmul(rows, rows, transpose_a=True) / examples
        rows = tf.concat([self._pointwise_output_rows(g) for g in output_grads()], axis=0)
        return tf.matmul(rows, rows, transpose_a=True) / tf.cast(tf.shape(rows)[0], tf.float32)

    # -- inverses -----------------------------------------------------------
    def compute_inverse(self, name, statistics, damping, split_dim=None):
        part, which = name.split("_")
        a_factor, g_factor = statistics[f"{part}_A"], statistics[f"{part}_G"]
        if part == "depthwise":
            return self.depthwise.damped_inverse(a_factor, g_factor, which, damping, split_dim)
        pi = linalg.pi_damping(a_factor, g_factor)
        root = tf.sqrt(tf.cast(damping, tf.float32))
        factor_damping = pi * root if which == "A" else root / pi
        return linalg.block_diagonal_damped_inverse(statistics[name], factor_damping, split_dim)

    def damped_fisher_trace(self, statistics, damping):
        depthwise = self.depthwise.damped_fisher_trace(statistics["depthwise_A"], statistics["depthwise_G"], damping)
        size = float(self.pointwise_input_dim * self.filters)
        pointwise = tf.linalg.trace(statistics["pointwise_A"]) * tf.linalg.trace(statistics["pointwise_G"])
        return depthwise + pointwise + damping * size

    def precondition(self, grads, inverses):
        [depthwise] = self.depthwise.precondition(grads[0], None, inverses["depthwise_A"], inverses["depthwise_G"])
        matrix = tf.reshape(tf.cast(grads[1], tf.float32), (-1, self.filters))
        if self.has_bias:
            matrix = tf.concat([matrix, tf.cast(grads[2], tf.float32)[None, :]], axis=0)
        matrix = inverses["pointwise_A"] @ matrix @ inverses["pointwise_G"]
        if not self.has_bias:
            return [depthwise, tf.reshape(matrix, self.pointwise_shape)]
        return [depthwise, tf.reshape(matrix[:-1], self.pointwise_shape), matrix[-1]]


@register_block
class SeparableConv1DBlock(_SeparableConvBlock):
    __doc__ = _SeparableConvBlock.__doc__
    kind = "separable_conv1d"
    layer_class = keras.layers.SeparableConv1D
    rank = 1


@register_block
class SeparableConv2DBlock(_SeparableConvBlock):
    __doc__ = _SeparableConvBlock.__doc__
    kind = "separable_conv2d"
    layer_class = keras.layers.SeparableConv2D
    rank = 2

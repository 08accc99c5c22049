"""Curvature block for ``keras.layers.RMSNormalization`` (unit-wise Fisher)."""

import keras
import tensorflow as tf

from keras_hoopt.blocks._unitwise import UnitwiseNormalizationBlock, _epsilon, _positive_axes
from keras_hoopt.blocks.registry import register_block


@register_block
class RMSNormBlock(UnitwiseNormalizationBlock):
    """Unit-wise Fisher of an RMSNormalization layer (1x1 per unit).

    Keras computes, in float32 (or wider) whatever the input dtype::

        xhat = x / sqrt(mean_axis(x^2) + epsilon)
        y    = scale * xhat

    with ``scale`` broadcast onto the *trailing* axes of the input (numpy
    broadcasting: the layer multiplies without reshaping; for the usual
    trailing ``axis`` these are the normalised axes). Each element of
    ``scale`` is a unit ``c``, every other non-batch axis a location, and::

        F_c = E_n[g_c^2],   g_c = sum_locations xhat * delta

    a 1x1 block per unit (there is no offset), damped and inverted in closed
    form; see :class:`~keras_hoopt.blocks._unitwise.UnitwiseNormalizationBlock`.

    Reference:
        Zhang & Sennrich, "Root Mean Square Layer Normalization",
        arXiv:1910.07467; Osawa et al., arXiv:2002.06015 (unit-wise Fisher).
    """

    kind = "rmsnorm"

    @classmethod
    def matches(cls, layer):
        return isinstance(layer, keras.layers.RMSNormalization) and (
            type(layer).call is keras.layers.RMSNormalization.call
        )

    @staticmethod
    def _scale_variable(layer):
        return layer.scale

    @staticmethod
    def _offset_variable(layer):
        return None

    def _parameter_axes(self, rank):
        # `outputs * scale` broadcasts scale against the last len(scale.shape) axes.
        return list(range(rank - len(self.variables[0].shape), rank))

    def _normalized(self, call):
        layer = self.layer
        x = tf.cast(call.inputs, tf.float32)
        axes = _positive_axes(layer.axis, x.shape.rank)
        mean_square = tf.reduce_mean(tf.square(x), axis=axes, keepdims=True)
        return x * tf.math.rsqrt(mean_square + _epsilon(layer))

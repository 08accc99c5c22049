"""Curvature block for ``keras.layers.GroupNormalization`` (unit-wise Fisher)."""

import keras
import tensorflow as tf

from keras_hoopt.blocks._unitwise import UnitwiseNormalizationBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class GroupNormBlock(UnitwiseNormalizationBlock):
    """Unit-wise Fisher of a GroupNormalization layer (Osawa et al., SP-NGD).

    The ``C`` channels of axis ``axis`` are split into ``G`` contiguous groups
    of ``C / G``; per example and group, Keras normalises over the group's
    channels and every other non-batch axis, in float32 (or wider) whatever
    the input dtype::

        xhat = (x - mean_group(x)) / sqrt(var_group(x) + epsilon)
        y    = gamma_c * xhat + beta_c

    (``groups=-1``: one channel per group, instance normalisation). Each
    channel ``c`` is a unit and every other non-batch axis a location::

        F_c = E_n [[g_gamma^2, g_gamma g_beta], [g_gamma g_beta, g_beta^2]]

    with ``g_gamma = sum_locations xhat * delta``, ``g_beta = sum_locations
    delta`` (1x1 with only ``gamma`` or only ``beta``); see
    :class:`~keras_hoopt.blocks._unitwise.UnitwiseNormalizationBlock`.

    Reference:
        Wu & He, "Group Normalization", arXiv:1803.08494;
        Osawa et al., arXiv:2002.06015 (unit-wise Fisher).
    """

    kind = "groupnorm"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.GroupNormalization)
            and type(layer).call is keras.layers.GroupNormalization.call
            and isinstance(layer.axis, int)
            and bool(layer.scale or layer.center)
        )

    @staticmethod
    def _scale_variable(layer):
        return layer.gamma

    @staticmethod
    def _offset_variable(layer):
        return layer.beta

    def _parameter_axes(self, rank):
        return [self.layer.axis % rank]

    def _normalized(self, call):
        layer = self.layer
        x = tf.cast(call.inputs, tf.float32)
        rank = x.shape.rank
        axis = layer.axis % rank
        groups = int(layer.groups)
        channels = self.units
        shape = tf.shape(x)
        # [..., C, ...] -> [..., G, C / G, ...]; statistics over all but batch and G.
        grouped_shape = tf.concat([shape[:axis], [groups, channels // groups], shape[axis + 1:]], axis=0)
        grouped = tf.reshape(x, grouped_shape)
        reduce_axes = [i for i in range(1, rank + 1) if i != axis]
        mean, variance = tf.nn.moments(grouped, axes=reduce_axes, keepdims=True)
        xhat = (grouped - mean) * tf.math.rsqrt(variance + layer.epsilon)
        return tf.reshape(xhat, shape)

"""Curvature block for ``keras.layers.LayerNormalization`` (unit-wise Fisher)."""

import keras
import tensorflow as tf

from keras_hoopt.blocks._unitwise import UnitwiseNormalizationBlock, _epsilon, _positive_axes
from keras_hoopt.blocks.registry import register_block


@register_block
class LayerNormBlock(UnitwiseNormalizationBlock):
    """Unit-wise Fisher of a LayerNormalization layer (Osawa et al., SP-NGD).

    Per example and location, Keras normalises over the layer's ``axis`` (one
    axis or several, not necessarily contiguous), in float32 (or wider)
    whatever the input dtype::

        xhat = (x - mean_axis(x)) / sqrt(var_axis(x) + epsilon)
        y    = gamma * xhat + beta

    and with the deprecated ``rms_scaling=True`` (Keras's exact formula: the
    input is *not* centred, but divided by the root of its variance; there is
    no ``beta``, and ``gamma`` exists even with ``scale=False``)::

        xhat = x / sqrt(var_axis(x) + epsilon)
        y    = gamma * xhat

    ``gamma`` and ``beta`` span the ``axis`` dimensions; each of their
    elements is one unit ``c``, and every other non-batch axis is a location.
    Keras reshapes the parameters onto the input in the input's axis order
    (for ``axis=[-1, 1]`` the variable's shape is ``(d_last, d_1)`` but its
    flat layout is that of the ``(d_1, d_last)`` block it multiplies), and so
    does this block. Per unit::

        F_c = E_n [[g_gamma^2, g_gamma g_beta], [g_gamma g_beta, g_beta^2]]

    with ``g_gamma = sum_locations xhat * delta``, ``g_beta = sum_locations
    delta`` (1x1 with only ``gamma`` or only ``beta``); see
    :class:`~keras_hoopt.blocks._unitwise.UnitwiseNormalizationBlock`.

    Handles every ``axis``/``center``/``scale``/``rms_scaling`` combination
    with at least one parameter; subclasses that override ``call`` are left
    to the first-order fallback.

    Reference:
        Ba et al., "Layer Normalization", arXiv:1607.06450;
        Osawa et al., arXiv:2002.06015 (unit-wise Fisher).
    """

    kind = "layernorm"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.LayerNormalization)
            and type(layer).call is keras.layers.LayerNormalization.call
            and bool(layer.scale or layer.center or layer.rms_scaling)
        )

    @staticmethod
    def _scale_variable(layer):
        return layer.gamma

    @staticmethod
    def _offset_variable(layer):
        return layer.beta

    def _parameter_axes(self, rank):
        return _positive_axes(self.layer.axis, rank)

    def _normalized(self, call):
        layer = self.layer
        x = tf.cast(call.inputs, tf.float32)
        axes = self._parameter_axes(x.shape.rank)
        epsilon = _epsilon(layer)
        if layer.rms_scaling:
            variance = tf.math.reduce_variance(x, axis=axes, keepdims=True)
            return x * tf.math.rsqrt(variance + epsilon)
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + epsilon)

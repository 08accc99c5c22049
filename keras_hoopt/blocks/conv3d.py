"""Curvature block for ``keras.layers.Conv3D`` (KFC, Grosse & Martens 2016)."""

import keras

from keras_hoopt.blocks._convolution import ConvolutionBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class Conv3DBlock(ConvolutionBlock):
    """K-FAC block of a Conv3D layer (strides, dilation, ``"valid"``/``"same"``).

    ``a_{n,t}`` is the ``kd * kh * kw * C_in`` patch (plus 1 for the bias)
    feeding output location ``t``, extracted by strided slices (one per
    kernel tap: ``tf.extract_volume_patches`` has neither dilation nor an XLA
    kernel). See :class:`~keras_hoopt.blocks._convolution.ConvolutionBlock`
    for the factors; ``groups > 1`` is not handled.
    """

    kind = "conv3d"
    layer_class = keras.layers.Conv3D

"""Curvature block for ``keras.layers.Conv2D`` (KFC, Grosse & Martens 2016)."""

import keras

from keras_hoopt.blocks._convolution import ConvolutionBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class Conv2DBlock(ConvolutionBlock):
    """K-FAC block of a Conv2D layer (any kernel size, strides, padding, dilation).

    ``a_{n,t}`` is the im2col patch (``kh * kw * C_in``, ordered like the
    kernel's first three axes, plus 1 for the bias) feeding output location
    ``t``; ``g_{n,t}`` the per-example gradient at that location (see
    :class:`~keras_hoopt.blocks._convolution.ConvolutionBlock`). Grouped
    convolutions (``groups > 1``) are not handled by this block.
    """

    kind = "conv2d"
    layer_class = keras.layers.Conv2D

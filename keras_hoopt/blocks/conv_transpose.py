"""Curvature blocks for ``keras.layers.Conv{1,2,3}DTranspose`` (KFC over input locations).

The kernel gradient of a transposed convolution is, at every input location
``t``, the outer product of the output-gradient patch that ``x_t`` feeds
(``prod(k) * C_out``) with ``x_t`` (``C_in``): see
:class:`~keras_hoopt.blocks._convolution.ConvolutionTransposeBlock`. The bias is
not preconditioned (first-order update).
"""

import keras

from keras_hoopt.blocks._convolution import ConvolutionTransposeBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class Conv1DTransposeBlock(ConvolutionTransposeBlock):
    """K-FAC block of a Conv1DTranspose layer: ``A`` is ``C_in^2``, ``G`` is ``(k C_out)^2``."""

    kind = "conv1d_transpose"
    layer_class = keras.layers.Conv1DTranspose


@register_block
class Conv2DTransposeBlock(ConvolutionTransposeBlock):
    """K-FAC block of a Conv2DTranspose layer: ``A`` is ``C_in^2``, ``G`` is ``(kh kw C_out)^2``."""

    kind = "conv2d_transpose"
    layer_class = keras.layers.Conv2DTranspose


@register_block
class Conv3DTransposeBlock(ConvolutionTransposeBlock):
    """K-FAC block of a Conv3DTranspose layer: ``A`` is ``C_in^2``, ``G`` is ``(kd kh kw C_out)^2``."""

    kind = "conv3d_transpose"
    layer_class = keras.layers.Conv3DTranspose

"""Curvature block for ``keras.layers.Conv1D`` (KFC, Grosse & Martens 2016)."""

import keras

from keras_hoopt.blocks._convolution import ConvolutionBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class Conv1DBlock(ConvolutionBlock):
    """K-FAC block of a Conv1D layer (strides, dilation, ``"valid"``/``"same"``/``"causal"``).

    ``a_{n,t}`` is the patch of ``k * C_in`` input values (ordered like the
    kernel's first two axes, plus 1 for the bias) feeding output step ``t``;
    ``"causal"`` padding is a left padding by ``dilation * (k - 1)`` followed by
    a ``"valid"`` convolution, as in ``Conv1D.call``. See
    :class:`~keras_hoopt.blocks._convolution.ConvolutionBlock` for the factors;
    ``groups > 1`` is not handled.
    """

    kind = "conv1d"
    layer_class = keras.layers.Conv1D

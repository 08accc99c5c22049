"""Per-layer-type curvature blocks, one module each (see :mod:`keras_hoopt.blocks.base`)."""

from keras_hoopt.blocks.base import CurvatureBlock, KroneckerBlock
from keras_hoopt.blocks.registry import block_type_for, register_block
from keras_hoopt.blocks.batchnorm import BatchNormBlock
from keras_hoopt.blocks.conv1d import Conv1DBlock
from keras_hoopt.blocks.conv2d import Conv2DBlock
from keras_hoopt.blocks.conv3d import Conv3DBlock
from keras_hoopt.blocks.conv_transpose import Conv1DTransposeBlock, Conv2DTransposeBlock, Conv3DTransposeBlock
from keras_hoopt.blocks.dense import DenseBlock
from keras_hoopt.blocks.depthwise_conv import DepthwiseConv1DBlock, DepthwiseConv2DBlock
from keras_hoopt.blocks.einsum_dense import EinsumDenseBlock
from keras_hoopt.blocks.embedding import EmbeddingBlock
from keras_hoopt.blocks.position_embedding import PositionEmbeddingBlock
from keras_hoopt.blocks.reversible_embedding import ReversibleEmbeddingBlock
from keras_hoopt.blocks.group_norm import GroupNormBlock
from keras_hoopt.blocks.gru import GRUBlock
from keras_hoopt.blocks.layer_norm import LayerNormBlock
from keras_hoopt.blocks.lstm import LSTMBlock
from keras_hoopt.blocks.rms_norm import RMSNormBlock
from keras_hoopt.blocks.separable_conv import SeparableConv1DBlock, SeparableConv2DBlock
from keras_hoopt.blocks.simple_rnn import SimpleRNNBlock
# Preconditioner forms register themselves on import (keras_hoopt.blocks.forms).
from keras_hoopt.blocks import eigenbasis, low_rank  # noqa: F401
from keras_hoopt.blocks.forms import preconditioner_forms

__all__ = [
    "CurvatureBlock",
    "KroneckerBlock",
    "DenseBlock",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "PositionEmbeddingBlock",
    "ReversibleEmbeddingBlock",
    "Conv1DBlock",
    "Conv2DBlock",
    "Conv3DBlock",
    "Conv1DTransposeBlock",
    "Conv2DTransposeBlock",
    "Conv3DTransposeBlock",
    "DepthwiseConv1DBlock",
    "DepthwiseConv2DBlock",
    "SeparableConv1DBlock",
    "SeparableConv2DBlock",
    "BatchNormBlock",
    "LayerNormBlock",
    "RMSNormBlock",
    "GroupNormBlock",
    "SimpleRNNBlock",
    "LSTMBlock",
    "GRUBlock",
    "register_block",
    "preconditioner_forms",
    "block_type_for",
]

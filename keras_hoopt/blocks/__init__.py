"""Per-layer-type curvature blocks (Dense, Conv2D, BatchNormalization)."""

from keras_hoopt.blocks.base import CurvatureBlock, KroneckerBlock
from keras_hoopt.blocks.registry import block_type_for, register_block
from keras_hoopt.blocks.batchnorm import BatchNormBlock
from keras_hoopt.blocks.conv2d import Conv2DBlock
from keras_hoopt.blocks.dense import DenseBlock

__all__ = [
    "CurvatureBlock",
    "KroneckerBlock",
    "DenseBlock",
    "Conv2DBlock",
    "BatchNormBlock",
    "register_block",
    "block_type_for",
]

"""THOR's split form (keras_hoopt.blocks.split) against a dense numpy block-diagonal inverse."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import linalg
from keras_hoopt.blocks import split


def _spd(size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3 * size, size))
    return (x.T @ x / (3 * size) + 0.1 * np.eye(size)).astype(np.float32)


def _block_diagonal_inverse(matrix, damping, split_dim):
    """numpy: the inverse of ``matrix``'s diagonal ``split_dim`` blocks (and tail), each damped."""
    size = matrix.shape[0]
    out = np.zeros((size, size))
    for start in range(0, size, split_dim):
        end = min(start + split_dim, size)
        block = matrix[start:end, start:end].astype(np.float64)
        out[start:end, start:end] = np.linalg.inv(block + damping * np.eye(end - start))
    return out


@pytest.mark.parametrize("size,split_dim", [(10, 4), (8, 4), (9, 3), (7, 2)])
def test_split_state_applies_the_block_diagonal_inverse(size, split_dim):
    matrix, damping = _spd(size, size), 0.05
    parts, ok = linalg.split_damped_inverse(tf.constant(matrix), damping, split_dim)
    assert bool(ok)
    assert parts["blocks"].shape == (size // split_dim, split_dim, split_dim)
    assert ("tail" in parts) == bool(size % split_dim)
    expected = _block_diagonal_inverse(matrix, damping, split_dim)
    np.testing.assert_allclose(linalg.block_diagonal(parts), expected, rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(1)
    right = rng.normal(size=(size, 5)).astype(np.float32)
    left = rng.normal(size=(6, size)).astype(np.float32)
    np.testing.assert_allclose(split.multiply_left(parts, tf.constant(right)), expected @ right, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(split.multiply_right(tf.constant(left), parts), left @ expected, rtol=1e-4, atol=1e-5)


def test_thor_keeps_and_applies_only_the_diagonal_blocks():
    """One THOR step on a Dense layer with A of 10 (blocks 4, 4, 2) and G of 6 (blocks 4, 2): the
    weights move by ``-lr blockdiag(A)^-1 dW blockdiag(G)^-1`` in numpy, with pi-damping."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((9,)), keras.layers.Dense(6, name="d")])
    lr, damping = 0.1, 1e-2
    optimizer = keras_hoopt.THOR(
        learning_rate=lr, damping=damping, momentum=0.0, step_size="fixed", kl_clip=None, split_dim=4,
    )
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 9)).astype(np.float32), rng.normal(size=(32, 6)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    kernel_grad, bias_grad = (g.numpy() for g in tape.gradient(loss, model.trainable_variables))
    before = [v.numpy() for v in model.trainable_variables]
    model.train_on_batch(x, y)
    block = optimizer._attachment.blocks[0][0]
    assert isinstance(block, split.SplitForm) and block.factor_form("A") == block.factor_form("G") == "split"
    a, g = (optimizer.statistic("d", n).astype(np.float64) for n in ("A", "G"))
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    a_inverse = _block_diagonal_inverse(a, pi * np.sqrt(damping), 4)
    g_inverse = _block_diagonal_inverse(g, np.sqrt(damping) / pi, 4)
    np.testing.assert_allclose(optimizer.inverse("d", "A"), a_inverse, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(optimizer.inverse("d", "G"), g_inverse, rtol=1e-3, atol=1e-5)
    gradient = np.concatenate([kernel_grad, bias_grad[None, :]], axis=0)
    step = -lr * a_inverse @ gradient @ g_inverse
    np.testing.assert_allclose(model.trainable_variables[0].numpy() - before[0], step[:-1], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(model.trainable_variables[1].numpy() - before[1], step[-1], rtol=1e-3, atol=1e-6)
    # The state is the blocks, not a dense [10, 10] matrix.
    names = sorted(v.name for v in optimizer.variables if v.name.startswith("d_A_"))
    assert any(name.endswith("blocks") for name in names) and not any(name.endswith("inverse") for name in names)

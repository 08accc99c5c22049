"""Embedding, tied ReversibleEmbedding and PositionEmbedding curvature blocks against numpy.

References are independent of the blocks: per-example gradients from ``tf.GradientTape`` on
each example's own loss, row counts with ``np.bincount``, factors with numpy, and the
preconditioned step as a dense ``np.linalg.solve`` of the (sum of) damped Kronecker products
formed with ``np.kron``. Conventions (``docs/math.md``): ``A``/``D`` = sum over positions / examples,
``G``/``M1``/``D2`` = sum over rows / rows, ``M2`` = sum over rows / examples; weights vectorised
row-major (``[vocab, dim]``: index ``v * dim + j``).
"""

import numpy as np
import pytest
import tensorflow as tf
import keras
import keras_hub

import keras_hoopt
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.embedding import EmbeddingBlock
from keras_hoopt.blocks.position_embedding import PositionEmbeddingBlock
from keras_hoopt.blocks.reversible_embedding import ReversibleEmbeddingBlock
from keras_hoopt.capture import ForwardRecord

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _kfac(**kwargs):
    defaults = dict(learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=1e-3,
                    inverse_update_interval=1, step_size="fixed", fisher="empirical")
    defaults.update(kwargs)
    return keras_hoopt.KFAC(**defaults)


def _per_example_losses(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


def _dense(grad):
    return tf.convert_to_tensor(grad).numpy().astype(np.float64)


def _onehot_gradients(ids, g, vocab):
    """``[N, vocab, dim]``: ``sum_t onehot(x_{n,t}) g_{n,t}^T`` with explicit loops."""
    n, dim = ids.shape[0], g.shape[-1]
    ids, g = ids.reshape(n, -1), g.reshape(n, -1, dim)
    out = np.zeros((n, vocab, dim))
    for i in range(n):
        for t in range(ids.shape[1]):
            out[i, ids[i, t] % vocab] += g[i, t]
    return out


def _damped(diagonal, matrix, damping):
    """``(diag(d) + pi sqrt(l), M + sqrt(l)/pi I)`` as dense numpy matrices."""
    pi = np.sqrt(diagonal.mean() / (np.trace(matrix) / matrix.shape[0]))
    root = np.sqrt(damping)
    return np.diag(diagonal + pi * root), matrix + root / pi * np.eye(matrix.shape[0])


# ---------------------------------------------------------------------------------------
# Embedding, one-way ReversibleEmbedding, PositionEmbedding: one model, one traced step


def _embedding_zoo(vocab, dim, length):
    """Three branches on one Dense head (one trace covers four blocks).

    * ``emb``: rank-2 int32 ids with ``mask_zero`` and a masked average (masked positions get
      no gradient, but their id 0 is still looked up);
    * ``one_way`` + ``pos``: a ReversibleEmbedding never called in reverse, plus keras_hub's
      PositionEmbedding added to it;
    * ``emb3``: rank-3 int64 ids, negative ids counted from the end.
    """
    ids2 = keras.Input((5,), dtype="int32", name="ids2")
    ids3 = keras.Input((2, 3), dtype="int64", name="ids3")
    layers = {
        "emb": keras.layers.Embedding(vocab, dim, mask_zero=True, name="emb"),
        "one_way": keras.layers.ReversibleEmbedding(vocab, dim, embeddings_initializer="glorot_uniform",
                                                    name="one_way"),
        "pos": keras_hub.layers.PositionEmbedding(length, name="pos"),
        "emb3": keras.layers.Embedding(vocab, dim, name="emb3"),
        "out": keras.layers.Dense(3, name="out"),
    }
    tokens = layers["one_way"](ids2)
    branches = [
        keras.layers.GlobalAveragePooling1D()(layers["emb"](ids2)),
        keras.layers.Flatten()(keras.layers.Add()([tokens, layers["pos"](tokens)])),
        keras.layers.Flatten()(layers["emb3"](ids3)),
    ]
    return keras.Model([ids2, ids3], layers["out"](keras.layers.Concatenate()(branches))), layers


def _zoo_reference(layers, x2, x3, y):
    """Per-example gradients ``g`` w.r.t. each layer's output and per-example table gradients."""
    tables = {name: layers[name].trainable_variables[0].value for name in ("emb", "one_way", "pos", "emb3")}
    batch, vocab = x2.shape[0], tables["emb"].shape[0]
    with tf.GradientTape(persistent=True) as tape:
        out = {
            "emb": tf.gather(tables["emb"], x2),
            "one_way": tf.gather(tables["one_way"], x2),
            "pos": tf.broadcast_to(tables["pos"][: x2.shape[1]], x2.shape + (tables["pos"].shape[1],)),
            "emb3": tf.gather(tables["emb3"], np.where(x3 < 0, x3 + vocab, x3)),
        }
        for value in out.values():
            tape.watch(value)
        mean = keras.layers.GlobalAveragePooling1D()(out["emb"], mask=tf.not_equal(x2, 0))
        flat = [tf.reshape(out["one_way"] + out["pos"], (batch, -1)), tf.reshape(out["emb3"], (batch, -1))]
        losses = _per_example_losses(y, layers["out"](tf.concat([mean] + flat, axis=1)))
        each = [losses[i] for i in range(batch)]
        total = tf.reduce_sum(losses)
    g = {name: tape.gradient(total, value).numpy().astype(np.float64) for name, value in out.items()}
    per_example = {
        name: np.stack([_dense(tape.gradient(loss, tables[name])) for loss in each]) for name in tables
    }
    return g, per_example


def test_embedding_factors_and_step_equal_dense_kronecker_solve():
    rng = np.random.default_rng(0)
    batch, vocab, dim, length, damping = 8, 7, 3, 8, 0.05
    model, layers = _embedding_zoo(vocab, dim, length)
    optimizer = _kfac(damping=damping)
    model.compile(optimizer=optimizer, loss=SCE, jit_compile=False)
    x2 = rng.integers(1, vocab, size=(batch, 5)).astype("int32")
    x2[:, -2:] = 0  # padding (and row 0 of the tables)
    x3 = rng.integers(-vocab, vocab, size=(batch, 2, 3)).astype("int64")
    y = rng.integers(0, 3, size=batch).astype("int32")
    g, per_example = _zoo_reference(layers, x2, x3, y)
    tables = {name: layers[name].trainable_variables[0] for name in per_example}
    before = {name: v.numpy().astype(np.float64) for name, v in tables.items()}
    model.train_on_batch({"ids2": x2, "ids3": x3}, y)

    kinds = {row["layer"]: row["kind"] for row in optimizer.curvature_summary()}
    assert kinds == {"emb": "embedding", "one_way": "reversible_embedding", "pos": "position_embedding",
                     "emb3": "embedding", "out": "dense"}
    assert np.all(g["emb"][:, -2:] == 0.0)  # the mask reached the pooling through the captured call
    ids = {"emb": x2, "one_way": x2, "emb3": x3 % vocab,
           "pos": np.broadcast_to(np.arange(5), (batch, 5))}  # positions are the ids of `pos`
    for name, rows_of in ids.items():
        size = length if name == "pos" else vocab
        # The per-example table gradient is sum_t onehot(x_{n,t}) g_{n,t}^T: what the factors describe.
        np.testing.assert_allclose(_onehot_gradients(rows_of, g[name], size), per_example[name],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
        a = np.bincount(rows_of.ravel(), minlength=size) / batch
        rows = g[name].reshape(-1, dim)
        g_factor = rows.T @ rows / rows.shape[0]
        a_name, g_name = ("D_embedding", "M") if name == "one_way" else ("A", "G")
        np.testing.assert_allclose(optimizer.statistic(name, a_name), a, rtol=1e-6, err_msg=name)
        g_stat = optimizer.statistic(name, g_name)
        _assert_close(g_stat[0] if name == "one_way" else g_stat, g_factor, 1e-5, f"{name} G")
        a_damped, g_damped = _damped(a, g_factor, damping)
        grad = per_example[name].mean(axis=0)  # gradient of the mean loss
        expected = -np.linalg.solve(np.kron(a_damped, g_damped), grad.reshape(-1)).reshape(size, dim)
        moved = tables[name].numpy().astype(np.float64) - before[name]
        _assert_close(moved, expected, 1e-4, f"{name} step")
        assert np.all(moved[a == 0] == 0.0), name  # rows nobody looked up do not move
    # Never called in reverse: that use has no statistics and drops out (the Embedding form above).
    np.testing.assert_array_equal(optimizer.statistic("one_way", "D_reverse"), np.zeros(vocab))
    np.testing.assert_array_equal(optimizer.statistic("one_way", "M")[1], np.zeros((dim, dim)))


def test_embedding_split_inverse_and_damped_trace():
    layer = keras.layers.Embedding(6, 5)
    layer.build()
    block = EmbeddingBlock(layer)
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 2, size=6).astype("float32")
    root = rng.normal(size=(5, 5))
    g = (root @ root.T).astype("float32")
    statistics = {"A": tf.constant(a), "G": tf.constant(g)}
    damping = 0.1
    a_damped, g_damped = _damped(a.astype(np.float64), g.astype(np.float64), damping)
    inverse_a, ok = block.compute_inverse("A", statistics, damping)
    assert bool(ok)
    np.testing.assert_allclose(inverse_a, 1.0 / np.diag(a_damped), rtol=1e-5)
    # THOR's split applies to G only: blocks of 2, 2 and 1.
    inverse_g, ok = block.compute_inverse("G", statistics, damping, split_dim=2)
    assert bool(ok)
    expected = np.zeros((5, 5))
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        expected[lo:hi, lo:hi] = np.linalg.inv(g_damped[lo:hi, lo:hi])
    _assert_close(inverse_g, expected, 1e-4, "split G inverse")
    trace = block.damped_fisher_trace(statistics, damping)
    np.testing.assert_allclose(float(trace), np.trace(np.kron(np.diag(a), g)) + damping * 30, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Tied (and untied) ReversibleEmbedding


def _tied_model(vocab, dim, tie_weights=True):
    """ids -> ReversibleEmbedding -> Dense(tanh) -> the same layer in reverse (soft-capped logits)."""
    inputs = keras.Input((4,), dtype="int32")
    token = keras_hub.layers.ReversibleEmbedding(vocab, dim, tie_weights=tie_weights, logit_soft_cap=3.0,
                                                 embeddings_initializer="glorot_uniform", name="tok")
    mixer = keras.layers.Dense(dim, activation="tanh", name="mixer")
    return keras.Model(inputs, token(mixer(token(inputs)), reverse=True)), token, mixer


def _tied_reference(token, mixer, x, y):
    """Per-example embedding grads g, reverse inputs h, logit grads delta and the mean-loss gradients."""
    variables = [v.value for v in token.trainable_variables]
    table = variables[0]
    with tf.GradientTape(persistent=True) as tape:
        kernel = tf.transpose(table) if token.tie_weights else variables[1]
        s = tf.gather(table, x)
        tape.watch(s)
        h = mixer(s)
        logits = h @ kernel
        tape.watch(logits)
        capped = tf.tanh(logits / 3.0) * 3.0
        # Keras's loss is the mean over every position: an example's loss is its mean over t.
        per_token = keras.losses.sparse_categorical_crossentropy(y, capped, from_logits=True)
        total = tf.reduce_sum(tf.reduce_mean(per_token, axis=1))
        mean = total / x.shape[0]
    g, delta = (t.numpy().astype(np.float64) for t in tape.gradient(total, [s, logits]))
    grads = [_dense(t) for t in tape.gradient(mean, variables)]
    return g, h.numpy().astype(np.float64), delta, grads


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_factors_and_step_equal_dense_solve(tie_weights):
    rng = np.random.default_rng(3)
    batch, vocab, dim, damping = 8, 6, 3, 0.05
    model, token, mixer = _tied_model(vocab, dim, tie_weights)
    optimizer = _kfac(damping=damping)
    model.compile(optimizer=optimizer, loss=SCE, jit_compile=False)
    x = rng.integers(0, vocab, size=(batch, 4)).astype("int32")
    y = rng.integers(0, vocab, size=(batch, 4)).astype("int32")
    g, h, delta, grads = _tied_reference(token, mixer, x, y)
    before = [v.numpy().astype(np.float64) for v in token.trainable_variables]
    model.train_on_batch(x, y)
    moved = [v.numpy().astype(np.float64) - b for v, b in zip(token.trainable_variables, before)]

    rows = batch * 4
    g_rows, h_rows, delta_rows = g.reshape(rows, dim), h.reshape(rows, dim), delta.reshape(rows, vocab)
    d1 = np.bincount(x.ravel(), minlength=vocab) / batch
    m1 = g_rows.T @ g_rows / rows
    d2 = np.diag(delta_rows.T @ delta_rows) / rows  # diagonal of the vocab x vocab output factor
    m2 = h_rows.T @ h_rows / batch
    # The mean-loss gradient is the sum of the two uses' gradients (tied), or one per variable.
    embedding_use = _onehot_gradients(x, g, vocab).sum(axis=0) / batch
    reverse_use = delta_rows.T @ h_rows / batch  # d loss / d W^T, transposed: [vocab, dim]
    if tie_weights:
        np.testing.assert_allclose(grads[0], embedding_use + reverse_use, rtol=1e-4, atol=1e-7)
    else:
        np.testing.assert_allclose(grads[0], embedding_use, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grads[1], reverse_use.T, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(optimizer.statistic("tok", "D_embedding"), d1, rtol=1e-6)
    _assert_close(optimizer.statistic("tok", "D_reverse"), d2, 1e-5, "D2")
    _assert_close(optimizer.statistic("tok", "M")[0], m1, 1e-5, "M1")
    _assert_close(optimizer.statistic("tok", "M")[1], m2, 1e-5, "M2")

    (d1_damped, m1_damped), (d2_damped, m2_damped) = _damped(d1, m1, damping), _damped(d2, m2, damping)
    if tie_weights:
        fisher = np.kron(d1_damped, m1_damped) + np.kron(d2_damped, m2_damped)
        expected = -np.linalg.solve(fisher, grads[0].reshape(-1)).reshape(vocab, dim)
        _assert_close(moved[0], expected, 1e-4, "tied step")
    else:
        expected = -np.linalg.solve(np.kron(d1_damped, m1_damped), grads[0].reshape(-1)).reshape(vocab, dim)
        _assert_close(moved[0], expected, 1e-4, "untied embedding step")
        # Reverse kernel [dim, vocab] (row-major): a Dense kernel with factors M2 (inputs) and diag(D2).
        expected = -np.linalg.solve(np.kron(m2_damped, d2_damped), grads[1].reshape(-1)).reshape(dim, vocab)
        _assert_close(moved[1], expected, 1e-4, "untied reverse step")


def test_generalized_eigh_split_and_retry():
    from keras_hoopt.blocks.reversible_embedding import damped_generalized_eigh

    rng = np.random.default_rng(5)
    dim = 5
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, 2))
    m1, m2 = a @ a.T, b @ b.T  # m2 singular: only the damping makes the pair SPD
    basis, values, ok = damped_generalized_eigh(tf.constant(m1, tf.float32), tf.constant(m2, tf.float32), 0.1, 0.2)
    assert bool(ok)
    p = basis.numpy().astype(np.float64)
    _assert_close(p.T @ (m1 + 0.1 * np.eye(dim)) @ p, np.eye(dim), 1e-4, "P^T M1' P")
    _assert_close(p.T @ (m2 + 0.2 * np.eye(dim)) @ p, np.diag(values.numpy()), 1e-4, "P^T M2' P")
    basis, values, ok = damped_generalized_eigh(tf.constant(m1, tf.float32), tf.constant(m2, tf.float32), 0.1, 0.2,
                                                split_dim=2)
    p = basis.numpy().astype(np.float64)
    assert bool(ok) and np.all(p[:2, 2:] == 0) and np.all(p[4:, :4] == 0)  # block-diagonal basis
    blocks = np.zeros((dim, dim))
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        blocks[lo:hi, lo:hi] = m2[lo:hi, lo:hi]
    _assert_close(p.T @ (blocks + 0.2 * np.eye(dim)) @ p, np.diag(values.numpy()), 1e-4, "split pair")
    # An indefinite M1 fails at every damping tried: ok is False, nothing raises.
    _, _, ok = damped_generalized_eigh(tf.constant(-np.eye(dim) * 1e6, tf.float32), tf.constant(m2, tf.float32),
                                       1e-3, 1e-3)
    assert not bool(ok)


# ---------------------------------------------------------------------------------------
# Capture, matching


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_capture_call_reproduces_the_layer(policy):
    keras.mixed_precision.set_global_policy(policy)
    x = np.array([[1, 0, 3, 5], [0, 2, 2, 4]], "int32")
    h = np.random.default_rng(6).normal(size=(2, 4, 3)).astype("float32")
    layers = [
        (keras.layers.Embedding(6, 3, mask_zero=True), EmbeddingBlock, x, {}),
        (keras.layers.ReversibleEmbedding(6, 3, mask_zero=True), ReversibleEmbeddingBlock, x, {}),
        (keras.layers.ReversibleEmbedding(6, 3, logit_soft_cap=2.0), ReversibleEmbeddingBlock, h,
         {"reverse": True}),
        (keras.layers.ReversibleEmbedding(6, 3, tie_weights=False, reverse_dtype="float32"),
         ReversibleEmbeddingBlock, h, {"reverse": True}),
        (keras_hub.layers.PositionEmbedding(6), PositionEmbeddingBlock, h, {"start_index": 1}),
    ]
    for layer, block_type, inputs, kwargs in layers:
        layer.build(x.shape if block_type is not PositionEmbeddingBlock else h.shape)
        inputs = tf.constant(inputs, tf.float16 if inputs.dtype == np.float32 and policy != "float32" else None)
        expected = layer.call(inputs, **kwargs)
        call = ForwardRecord().new_call(layer)
        actual = block_type.capture_call(layer, layer.call, call, inputs, **kwargs)
        assert actual.dtype == expected.dtype, (layer.name, actual.dtype, expected.dtype)
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
        assert call.inputs is not None and "output" in call.outputs
        if isinstance(layer, keras.layers.ReversibleEmbedding) and not kwargs:
            np.testing.assert_array_equal(actual._keras_mask, x != 0)  # the mask survives the tap


def test_matches_accepts_subclasses_and_rejects_what_it_cannot_handle():
    class MyEmbedding(keras.layers.Embedding):
        pass

    class Overridden(keras.layers.Embedding):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    assert block_type_for(MyEmbedding(5, 2)) is EmbeddingBlock
    assert block_type_for(Overridden(5, 2)) is None
    assert block_type_for(keras.layers.Embedding(5, 2, embeddings_constraint="non_neg")) is EmbeddingBlock
    lora = keras.layers.Embedding(5, 2)
    lora.build()
    lora.enable_lora(1)
    assert block_type_for(lora) is None
    quantized = keras.layers.Embedding(5, 2)
    quantized.build()
    quantized.quantize("int8")
    assert block_type_for(quantized) is None
    assert block_type_for(keras_hub.layers.ReversibleEmbedding(5, 2)) is ReversibleEmbeddingBlock
    assert block_type_for(keras.layers.ReversibleEmbedding(5, 2, tie_weights=False)) is ReversibleEmbeddingBlock
    reversible_lora = keras.layers.ReversibleEmbedding(5, 2)
    reversible_lora.build()
    reversible_lora.enable_lora(1)
    assert block_type_for(reversible_lora) is None
    assert block_type_for(keras_hub.layers.PositionEmbedding(4)) is PositionEmbeddingBlock

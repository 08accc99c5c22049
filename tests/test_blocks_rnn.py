"""SimpleRNN / LSTM / GRU curvature blocks (KFAC-expand over time steps).

The references are independent of the blocks' statistic and preconditioning code. The per-example,
per-time-step quantities the capture records (step inputs ``x_t``, the states ``h_{t-1}`` that
multiply the recurrent kernel, GRU's reset gate, the gradient ``dz_t`` of the input projection) are
first checked against the truth: ``sum_t outer(a_t, g_t)`` must equal each example's own gradient of
every kernel part, from ``tf.GradientTape`` on that example's loss through the layer's original call
(a wrong ``h`` shift, time order or gate layout breaks this). From those quantities, numpy einsums
give the expected factors, and a dense ``np.kron`` solve of the same Kronecker approximation the
expected K-FAC step."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.blocks import block_type_for
from keras_hoopt.blocks.gru import GRUBlock
from keras_hoopt.blocks.lstm import LSTMBlock
from keras_hoopt.blocks.simple_rnn import SimpleRNNBlock
from keras_hoopt.capture import CaptureSession, ForwardRecord

BATCH, STEPS, FEATURES, UNITS, CLASSES = 6, 5, 3, 4, 3


def _assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


def _with_ones(rows):
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def _sce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _kron_step(a_factor, g_factor, m, damping):
    """``-(kron(A + pi sqrt(l) I, G + sqrt(l)/pi I))^-1 vec(M)`` in the ``(d_in, d_out)`` layout."""
    d_in, d_out = m.shape
    pi = np.sqrt((np.trace(a_factor) / d_in) / (np.trace(g_factor) / d_out))
    root = np.sqrt(damping)
    big = np.kron(a_factor + pi * root * np.eye(d_in), g_factor + root / pi * np.eye(d_out))
    return -np.linalg.solve(big, m.reshape(-1)).reshape(d_in, d_out)


# ---------------------------------------------------------------------------------------
# 1. Per-example, per-time-step quantities reproduce the true per-example gradients;
#    the optimizer's factors and one K-FAC step match numpy.

NUMERIC_CONFIGS = {
    "simple_rnn": lambda: keras.layers.SimpleRNN(UNITS, return_sequences=True, name="rnn"),
    "lstm_masked_backwards": lambda: keras.layers.LSTM(UNITS, go_backwards=True, name="rnn"),
    "gru_reset_after": lambda: keras.layers.GRU(UNITS, return_sequences=True, name="rnn"),
    "gru_reset_before_masked": lambda: keras.layers.GRU(UNITS, reset_after=False, name="rnn"),
}


def _numeric_setup(config):
    rng = np.random.default_rng(sorted(NUMERIC_CONFIGS).index(config))
    masked = "masked" in config
    layers = [keras.Input((STEPS, FEATURES))]
    if masked:
        layers.append(keras.layers.Masking(0.0))
    layers += [NUMERIC_CONFIGS[config](), keras.layers.Flatten(), keras.layers.Dense(CLASSES, name="head")]
    model = keras.Sequential(layers)
    rnn = model.get_layer("rnn")
    for v in rnn.trainable_variables:  # non-zero biases, so the bias rows are tested
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype("float32"))
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
    mask = np.ones((BATCH, STEPS), bool)
    if masked:  # padding at the end, at the start and in the middle
        mask[0, 3:] = False
        mask[1, :2] = False
        mask[2, 2] = False
        x[~mask] = 0.0
    y = rng.integers(0, CLASSES, size=BATCH).astype("int32")
    return model, rnn, x, y, mask


def _capture_pass(model, rnn, x, y, mask):
    """The block's capture of one training pass on the summed per-example loss."""
    block_type = block_type_for(rnn)
    record = ForwardRecord()
    call = record.new_call(rnn)
    with tf.GradientTape() as tape:
        h = tf.constant(x)
        for layer in model.layers:
            if layer is rnn:
                h = block_type.capture_call(rnn, None, call, h, mask=mask, training=True)
            else:
                h = layer(h, training=True)
        total = tf.reduce_sum(_sce(tf.constant(y), h))
    tape.gradient(total, rnn.trainable_variables)  # runs the tap's gradient
    return block_type(rnn), call


def _per_example_gradients(model, rnn, x, y):
    """``[(dKernel, dRecurrent, dBias)]`` of each example's own loss (the layer's original call)."""
    out = []
    for n in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(_sce(tf.constant(y[n:n + 1]), model(x[n:n + 1], training=True)))
        out.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, rnn.trainable_variables)])
    return out


def _pieces_from_capture(rnn, call):
    """``{piece: (a rows [B, T, d_a], g rows [B, T, d_g])}``: what multiplies each kernel part, per step.

    Written out per layer type from the layer's equations (see the block docstrings), not from the
    block's piece tables.
    """
    x = call.inputs.numpy().astype(np.float64)
    dz = call.output_grads["output"].numpy().astype(np.float64)  # d(sum of losses)/dZ_in
    h_prev = call.extras["recurrent_inputs"].numpy().astype(np.float64)
    cell, u = rnn.cell, rnn.cell.units
    if isinstance(cell, keras.layers.GRUCell) and cell.reset_after:
        reset = call.extras["reset_gate"].numpy().astype(np.float64)
        d_recurrent = dz * np.concatenate([np.ones_like(reset), np.ones_like(reset), reset], axis=-1)
        return {"kernel": (_with_ones(x), dz), "recurrent": (_with_ones(h_prev), d_recurrent)}
    kernel = (_with_ones(x), dz)
    if isinstance(cell, keras.layers.GRUCell):
        reset_state = call.extras["reset_recurrent_inputs"].numpy().astype(np.float64)
        return {
            "kernel": kernel,
            "recurrent_gates": (h_prev, dz[..., : 2 * u]),
            "recurrent_candidate": (reset_state, dz[..., 2 * u:]),
        }
    return {"kernel": kernel, "recurrent": (h_prev, dz)}


def _true_piece_gradients(rnn, grads):
    """The same pieces of the true gradient ``(dKernel, dRecurrent, dBias)``."""
    kernel, recurrent, bias = grads
    u = rnn.cell.units
    if isinstance(rnn.cell, keras.layers.GRUCell) and rnn.cell.reset_after:
        return {"kernel": np.vstack([kernel, bias[0]]), "recurrent": np.vstack([recurrent, bias[1]])}
    out = {"kernel": np.vstack([kernel, bias])}
    if isinstance(rnn.cell, keras.layers.GRUCell):
        out.update(recurrent_gates=recurrent[:, : 2 * u], recurrent_candidate=recurrent[:, 2 * u:])
    else:
        out["recurrent"] = recurrent
    return out


def _statistic_names(rnn, piece):
    """``(A statistic, G statistic, rows/columns of G)`` of a piece (the blocks' documented names)."""
    u = rnn.cell.units
    if isinstance(rnn.cell, keras.layers.GRUCell) and rnn.cell.reset_after:
        return {"kernel": ("A_kernel", "G_kernel", None), "recurrent": ("A_recurrent", "G_recurrent", None)}[piece]
    return {
        "kernel": ("A_kernel", "G", None),
        "recurrent": ("A_recurrent", "G", None),
        "recurrent_gates": ("A_recurrent", "G", slice(0, 2 * u)),
        "recurrent_candidate": ("A_recurrent_candidate", "G", slice(2 * u, 3 * u)),
    }[piece]


@pytest.mark.parametrize("config", sorted(NUMERIC_CONFIGS))
def test_factors_and_step_match_per_example_references(config):
    damping = 1e-2
    model, rnn, x, y, mask = _numeric_setup(config)
    optimizer = keras_hoopt.KFAC(
        learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=damping, inverse_update_interval=1,
        step_size="fixed", fisher="empirical",
    )
    # Eager train step: tracing the K-FAC step costs ~12 s per model here; the traced and XLA paths
    # run the same block code and are covered by the model.fit tests below.
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    block, call = _capture_pass(model, rnn, x, y, tf.constant(mask) if "masked" in config else None)
    pieces = _pieces_from_capture(rnn, call)
    per_example = [_true_piece_gradients(rnn, g) for g in _per_example_gradients(model, rnn, x, y)]
    before = [v.numpy().astype(np.float64) for v in rnn.trainable_variables]

    # (a) sum_t outer(a_t, g_t) is each example's own gradient of every kernel piece (and bias row).
    for piece, (a, g) in pieces.items():
        expected = np.stack([e[piece] for e in per_example])
        _assert_close(np.einsum("nti,ntj->nij", a, g), expected, 1e-4, f"{config} per-example {piece}")
    assert sorted(pieces) == sorted(p.name for p in block.pieces)

    model.train_on_batch(x, y)
    after = [v.numpy().astype(np.float64) for v in rnn.trainable_variables]
    moved = _true_piece_gradients(rnn, [b - a for a, b in zip(before, after)])  # same slicing as gradients
    weights = mask[..., None].astype(np.float64)
    for piece, (a, g) in pieces.items():
        a_name, g_name, columns = _statistic_names(rnn, piece)
        # (b) factors: A sums over unmasked steps, G averages over them.
        expected_a = np.einsum("nti,ntj->ij", a * weights, a) / BATCH
        g_rows = (g * weights).reshape(-1, g.shape[-1])
        expected_g = g_rows.T @ g_rows / mask.sum()
        _assert_close(optimizer.statistic("rnn", a_name), expected_a, 1e-4, f"{config} {a_name}")
        g_statistic = optimizer.statistic("rnn", g_name)
        if columns is not None:
            g_statistic = g_statistic[columns, columns]
        _assert_close(g_statistic, expected_g, 1e-4, f"{config} {g_name} {piece}")
        # (c) one step: -(A (x) G + damping)^-1 vec(M), M the mean-loss gradient of the piece.
        gradient = np.mean([e[piece] for e in per_example], axis=0)
        _assert_close(moved[piece], _kron_step(expected_a, expected_g, gradient, damping), 2e-3,
                      f"{config} step {piece}")
    if "masked" in config:  # the states at masked steps are not zero: leaving them in A_recurrent would show
        h_prev = call.extras["recurrent_inputs"].numpy()
        assert np.abs(h_prev[~mask]).max() > 1e-3


# ---------------------------------------------------------------------------------------
# 2. The capture computes the layer's own output


OUTPUT_CONFIGS = {
    "simple_rnn_sequences": (lambda: keras.layers.SimpleRNN(UNITS, return_sequences=True), {}),
    "simple_rnn_state_backwards": (lambda: keras.layers.SimpleRNN(UNITS, return_state=True, go_backwards=True), {}),
    "simple_rnn_dropouts": (
        lambda: keras.layers.SimpleRNN(UNITS, return_sequences=True, dropout=0.3, recurrent_dropout=0.3, seed=1), {}
    ),
    "simple_rnn_unrolled_masked": (
        lambda: keras.layers.SimpleRNN(UNITS, return_sequences=True, unroll=True, zero_output_for_mask=True),
        {"mask": True},
    ),
    "lstm_state": (lambda: keras.layers.LSTM(UNITS, return_state=True, return_sequences=True), {}),
    "lstm_masked_backwards": (lambda: keras.layers.LSTM(UNITS, go_backwards=True), {"mask": True}),
    "lstm_dropout_initial_state": (
        lambda: keras.layers.LSTM(UNITS, return_sequences=True, dropout=0.4, seed=2), {"initial_state": 2}
    ),
    "lstm_implementation_1": (lambda: keras.layers.LSTM(UNITS, implementation=1, unit_forget_bias=False), {}),
    "rnn_of_lstm_cell_masked": (
        lambda: keras.layers.RNN(keras.layers.LSTMCell(UNITS), return_sequences=True), {"mask": True}
    ),
    "gru_state_masked": (lambda: keras.layers.GRU(UNITS, return_state=True), {"mask": True}),
    "gru_no_bias_backwards": (lambda: keras.layers.GRU(UNITS, use_bias=False, go_backwards=True), {}),
    "gru_reset_before_dropout": (
        lambda: keras.layers.GRU(UNITS, reset_after=False, return_sequences=True, dropout=0.3, seed=3),
        {"initial_state": 1},
    ),
    "gru_reset_before_unrolled_masked": (
        lambda: keras.layers.GRU(UNITS, reset_after=False, unroll=True, return_sequences=True), {"mask": True}
    ),
}


def _flat(outputs):
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


@pytest.mark.parametrize("config", sorted(OUTPUT_CONFIGS))
def test_capture_output_equals_layer_output(config):
    make, options = OUTPUT_CONFIGS[config]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32")
    layer = make()
    layer(x)
    for v in layer.trainable_variables:
        v.assign(v + rng.normal(scale=0.3, size=v.shape).astype("float32"))
    kwargs = {}
    if options.get("mask"):
        mask = np.ones((BATCH, STEPS), bool)
        mask[0, 3:] = False
        mask[1, :2] = False
        mask[2, 1:4] = False
        mask[3, :] = False  # a fully masked sequence
        kwargs["mask"] = tf.constant(mask)
    if options.get("initial_state"):
        kwargs["initial_state"] = [
            tf.constant(rng.normal(size=(BATCH, UNITS)).astype("float32")) for _ in range(options["initial_state"])
        ]
    seed_state = layer.cell.seed_generator.state.numpy()
    expected = _flat(layer(x, training=True, **kwargs))
    layer.cell.seed_generator.state.assign(seed_state)  # the same dropout masks
    block_type = block_type_for(layer)
    call = ForwardRecord().new_call(layer)
    actual = _flat(block_type.capture_call(layer, None, call, tf.constant(x), training=True, **kwargs))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=config)
    assert call.output.shape == (BATCH, STEPS, block_type.gates * UNITS)
    assert call.extras["recurrent_inputs"].shape == (BATCH, STEPS, UNITS)
    if layer.cell.dropout or layer.cell.recurrent_dropout:  # the dropout masks are really applied
        inference = _flat(layer(x, training=False, **kwargs))[0]
        assert np.abs(inference - expected[0]).max() > 1e-3


# ---------------------------------------------------------------------------------------
# 3. Text classifiers train with SP-NGD in model.fit (XLA; mixed_float16)


def _text_data(rng, vocab=20, steps=8, examples=96):
    x = rng.integers(1, vocab, size=(examples, steps))
    for i, length in enumerate(rng.integers(3, steps + 1, size=examples)):
        x[i, length:] = 0  # right padding, masked by the Embedding
    y = ((x == 3).sum(1) > (x == 5).sum(1)).astype("int32")
    return x.astype("int32"), y


def _loss(model, x, y):
    return float(np.mean(_sce(y, np.asarray(model(x), np.float32))))


def _fit_text_classifier(model, x, y, jit):
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    before = _loss(model, x, y)
    # One epoch: the XLA train step is compiled a second time at the start of a second epoch
    # (seen with Dense-only models too), which would double the cost of this test.
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"]
    after = _loss(model, x, y)
    assert np.all(np.isfinite(history)) and after < 0.97 * before, (before, after)
    return {r["layer"]: r for r in optimizer.curvature_summary()}, optimizer


def test_embedding_gru_classifier_trains_with_spngd_in_mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = _text_data(np.random.default_rng(6))
    model = keras.Sequential([
        keras.Input((x.shape[1],), dtype="int32"),
        keras.layers.Embedding(20, 6, mask_zero=True),
        keras.layers.SimpleRNN(8, return_sequences=True, name="simple"),  # passes the mask on
        keras.layers.GRU(8, name="gru"),
        keras.layers.Dense(2, dtype="float32", name="head"),
    ])
    gru = model.get_layer("gru")
    # The capture as the optimizer installs it (inside Layer.__call__, under its autocast scope).
    expected = model(x[:8], training=True)
    session = CaptureSession(model, {id(gru): GRUBlock})
    session.install()
    captured = model(x[:8], training=True)
    call = session.pop_record().calls[id(gru)][0]
    session.uninstall()
    assert call.output.dtype == "float16" and call.extras["reset_gate"].dtype == "float16"
    np.testing.assert_allclose(np.asarray(captured), np.asarray(expected), atol=2e-3)
    np.testing.assert_array_equal(call.extras["mask"].numpy(), x[:8] != 0)

    rows, optimizer = _fit_text_classifier(model, x, y, jit=False)
    assert rows["gru"]["kind"] == "gru" and rows["simple"]["kind"] == "simple_rnn"
    # reset_after=True: the recurrent bias row joins the recurrent kernel.
    assert rows["gru"]["factor_shapes"] == {
        "A_kernel": (9, 9), "A_recurrent": (9, 9), "G_kernel": (24, 24), "G_recurrent": (24, 24)
    }
    for name, statistic in [("simple", "A_recurrent"), ("simple", "G"), ("gru", "G_recurrent"), ("gru", "A_kernel")]:
        value = optimizer.statistic(name, statistic)
        assert np.all(np.isfinite(value)) and not np.allclose(value, np.eye(value.shape[0])), (name, statistic)


# ---------------------------------------------------------------------------------------
# 4. matches


def test_matches_accepts_subclasses_and_rejects_unsupported():
    class KeepsCall(keras.layers.LSTM):
        pass

    class OverridesCall(keras.layers.GRU):
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return super().call(sequences, initial_state, mask, training) * 2.0

    class OverridesCellStep(keras.layers.SimpleRNNCell):
        def call(self, sequence, states, training=False):
            output, new_states = super().call(sequence, states, training)
            return output * 2.0, [s * 2.0 for s in new_states]

    assert block_type_for(keras.layers.SimpleRNN(3)) is SimpleRNNBlock
    assert block_type_for(keras.layers.LSTM(3)) is LSTMBlock
    assert block_type_for(keras.layers.GRU(3)) is GRUBlock
    assert block_type_for(keras.layers.GRU(3, reset_after=False, use_bias=False)) is GRUBlock
    assert block_type_for(KeepsCall(3)) is LSTMBlock
    assert block_type_for(keras.layers.RNN(keras.layers.GRUCell(3))) is GRUBlock
    assert block_type_for(keras.layers.SimpleRNN(3, dropout=0.2, recurrent_dropout=0.2)) is SimpleRNNBlock
    assert block_type_for(keras.layers.LSTM(3, dropout=0.2)) is LSTMBlock
    assert block_type_for(keras.layers.LSTM(3, implementation=1)) is LSTMBlock

    assert block_type_for(OverridesCall(3)) is None
    assert block_type_for(keras.layers.RNN(OverridesCellStep(3))) is None
    assert block_type_for(keras.layers.RNN([keras.layers.LSTMCell(3), keras.layers.LSTMCell(3)])) is None
    assert block_type_for(keras.layers.SimpleRNN(3, stateful=True)) is None
    assert block_type_for(keras.layers.LSTM(3, recurrent_dropout=0.1)) is None  # one mask per gate
    assert block_type_for(keras.layers.GRU(3, recurrent_dropout=0.1)) is None
    assert block_type_for(keras.layers.LSTM(3, dropout=0.1, implementation=1)) is None
    assert block_type_for(keras.layers.GRU(3, dropout=0.1, implementation=1)) is None
    assert not SimpleRNNBlock.matches(keras.layers.LSTM(3))
    assert not LSTMBlock.matches(keras.layers.Dense(3))

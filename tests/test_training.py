"""keras_hoopt as a user calls it: model kinds, entry points, modes, saving, mixed precision,
bad inputs, robustness, tf.distribute, schedules, weight decay and switching optimizers."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import linalg

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- helpers
def _blobs(n=192, d=8, classes=3, seed=0):
    """Gaussian blobs: a simple learnable classification task."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.5, size=(classes, d))
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(size=(n, d))
    return x.astype("float32"), y.astype("int32")


def _images(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 4:].mean(axis=(1, 2, 3)) > 0)
    return x, y.astype("int32")


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )


def _cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="c"),
            # momentum 0.5: the moving statistics catch up within a few steps, so that
            # `evaluate` (inference mode) reflects the training progress of a short run.
            keras.layers.BatchNormalization(momentum=0.5, name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )


def _kfac(**kwargs):
    # The fixed step: these tests pin the machinery (modes, entry points, counters) to exact
    # trajectories; the default quadratic-model step has its own (test_quadratic_model.py).
    config = dict(learning_rate=0.05, damping=1e-2, kl_clip=1e-2, step_size="fixed", fisher="empirical")
    config.update(kwargs)
    return keras_hoopt.KFAC(**config)


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _assert_same_weights(a, b, atol=1e-5, rtol=1e-5):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=f"weight {i}")


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _counters(rows):
    """Summary rows without ``path``/``variables``: those carry the model's name (``sequential_1/...``),
    which differs between two models built in one process and after a reload."""
    return [{k: v for k, v in row.items() if k not in ("path", "variables")} for row in rows]


def _summary_by_layer(optimizer):
    return {row["layer"]: row for row in optimizer.curvature_summary()}


# --------------------------------------------------------------------------- 1. model kinds
class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.d1 = keras.layers.Dense(16, name="sub_d1")
        self.bn = keras.layers.BatchNormalization(momentum=0.5, name="sub_bn")
        self.d2 = keras.layers.Dense(3, name="sub_d2")

    def call(self, x, training=False):
        return self.d2(keras.ops.tanh(self.bn(self.d1(x), training=training)))


def _model_of_kind(kind):
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        return _cnn(), _images(), {"c": "conv2d", "bn": "batchnorm", "d1": "dense", "d2": "dense"}
    if kind == "functional":
        inputs = keras.Input((8,))
        a = keras.layers.Dense(8, activation="relu", name="branch_a")(inputs)
        b = keras.layers.Dense(8, activation="tanh", name="branch_b")(inputs)
        b = keras.layers.BatchNormalization(momentum=0.5, name="branch_bn")(b)
        merged = keras.layers.Concatenate()([a, b])
        outputs = keras.layers.Dense(3, name="head")(merged)
        model = keras.Model(inputs, outputs)
        return model, _blobs(), {"branch_a": "dense", "branch_b": "dense", "branch_bn": "batchnorm", "head": "dense"}
    if kind == "subclassed":
        model = _Subclassed()
        model(np.zeros((1, 8), "float32"))
        return model, _blobs(), {"sub_d1": "dense", "sub_bn": "batchnorm", "sub_d2": "dense"}
    assert kind == "nested"
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(12, activation="relu", name="inner_d"),
         keras.layers.BatchNormalization(momentum=0.5, name="inner_bn")],
        name="inner",
    )
    inputs = keras.Input((8,))
    hidden = inner(inputs)
    outputs = keras.layers.Dense(3, name="outer_d")(hidden)
    return keras.Model(inputs, outputs), _blobs(), {"inner_d": "dense", "inner_bn": "batchnorm", "outer_d": "dense"}


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed", "nested"])
def test_kfac_trains_every_model_kind_and_summarises_every_layer(kind):
    model, (x, y), expected = _model_of_kind(kind)
    optimizer = _kfac(learning_rate=0.1, inverse_update_interval=2)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    before = model.evaluate(x, y, verbose=0)
    steps = 12  # 2 epochs of 6 batches
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.8 * before, (kind, before, after)
    rows = _summary_by_layer(optimizer)
    assert {name: row["kind"] for name, row in rows.items()} == expected
    for name, row in rows.items():
        assert row["refreshes"] == steps, (name, row)
        assert row["inversions"] == steps // 2, (name, row)  # inverse_update_interval=2
        assert row["nonfinite_skips"] == 0 and row["failed_inversions"] == 0
        assert row["steps_since_refresh"] == 0
    assert int(optimizer.iterations.numpy()) == steps


# --------------------------------------------------------------------------- 2. entry points and modes
MODES = {
    "jit": dict(jit_compile=True),
    "graph": dict(jit_compile=False),
    "eager": dict(run_eagerly=True),
}


def test_fit_train_on_batch_and_evaluate_agree_in_graph_and_eager_mode():
    x, y = _images(seed=1)
    runs = {}
    for mode in ("graph", "eager"):
        model = _cnn(seed=3)
        optimizer = _kfac(inverse_update_interval=2)
        model.compile(optimizer=optimizer, loss=LOSS, **MODES[mode])
        initial = model.evaluate(x, y, verbose=0)
        model.fit(x[:128], y[:128], batch_size=32, epochs=1, shuffle=False, verbose=0)  # 4 steps
        for xb, yb in _batches(x[128:], y[128:], 32):  # 2 steps
            model.train_on_batch(xb, yb)
        rows = optimizer.curvature_summary()
        assert len(rows) == 4 and all(r["refreshes"] == 6 and r["inversions"] == 3 for r in rows), (mode, rows)
        # evaluate after training: the inference loss of the current weights; it records nothing.
        loss = model.evaluate(x, y, verbose=0)
        assert loss == pytest.approx(float(LOSS(y, model(x, training=False))), rel=1e-4)
        assert loss < initial, (mode, initial, loss)
        model.predict(x[:8], verbose=0)
        assert optimizer.curvature_summary() == rows
        assert int(optimizer.iterations.numpy()) == 6
        runs[mode] = _weights(model)
    assert not np.allclose(runs["graph"][0], _cnn(seed=3).weights[0].numpy())  # it moved
    _assert_same_weights(runs["eager"], runs["graph"], atol=1e-5, rtol=1e-4)


def _fit_mlp(mode, fisher, steps=4):
    model = _mlp(seed=3)
    x, y = _blobs(seed=1)
    optimizer = _kfac(fisher=fisher, seed=11, inverse_update_interval=2)
    model.compile(optimizer=optimizer, loss=LOSS, **MODES[mode])
    before = float(LOSS(y, model(x)))
    history = model.fit(x[: 32 * steps], y[: 32 * steps], batch_size=32, epochs=1, shuffle=False, verbose=0)
    after = float(LOSS(y, model(x)))
    rows = optimizer.curvature_summary()
    assert all(r["refreshes"] == steps and r["nonfinite_skips"] == 0 for r in rows), (mode, rows)
    assert np.isfinite(history.history["loss"]).all() and after < 0.9 * before, (mode, fisher, before, after)
    for row in rows:
        for name in row["statistics"]:
            assert np.isfinite(optimizer.statistic(row["layer"], name)).all()
    return _weights(model)


def test_jit_compile_gives_the_same_weights_as_graph_and_eager():
    weights = {mode: _fit_mlp(mode, "empirical") for mode in MODES}
    _assert_same_weights(weights["jit"], weights["graph"], atol=1e-5, rtol=1e-4)
    _assert_same_weights(weights["eager"], weights["graph"], atol=1e-5, rtol=1e-4)


def test_monte_carlo_fisher_trains_in_every_mode():
    weights = {mode: _fit_mlp(mode, "mc") for mode in MODES}
    # Sampling is stateless, seeded by (seed, step): same labels with and without tf.function.
    # (Under XLA, TF's stateless RNG may pick another bit generator, so jit only has to train.)
    _assert_same_weights(weights["eager"], weights["graph"], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- 3. explicit form, custom loop
_REFERENCE = {}


def _reference_trajectory(batches):
    """Weights and summary after ``train_on_batch`` on ``batches`` (computed once per module run)."""
    if "result" not in _REFERENCE:
        model = _mlp(seed=5)
        model.compile(optimizer=_kfac(inverse_update_interval=2), loss=LOSS, jit_compile=False)
        for xb, yb in batches:
            model.train_on_batch(xb, yb)
        _REFERENCE["result"] = (_weights(model), model.optimizer.curvature_summary())
        _REFERENCE["batches"] = batches
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(_REFERENCE["batches"], batches))
    return _REFERENCE["result"]


def test_model_argument_then_compile_matches_plain_compile():
    x, y = _blobs(seed=2)
    batches = _batches(x[:128], y[:128], 32)
    reference, reference_rows = _reference_trajectory(batches)
    model = _mlp(seed=5)
    optimizer = _kfac(model=model, inverse_update_interval=2)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    for xb, yb in batches:
        model.train_on_batch(xb, yb)
    _assert_same_weights(_weights(model), reference, atol=1e-6)
    assert _counters(optimizer.curvature_summary()) == _counters(reference_rows)


@pytest.mark.parametrize("form", ["attach_eager", "model_arg_tf_function"])
def test_custom_training_loop_with_gradient_tape(form):
    """Documented: ``model=`` or ``optimizer.attach(model)``, then ``apply_gradients``."""
    x, y = _blobs(seed=2)
    batches = _batches(x[:128], y[:128], 32)
    reference, reference_rows = _reference_trajectory(batches)
    model = _mlp(seed=5)
    if form == "attach_eager":
        optimizer = _kfac(inverse_update_interval=2)
        optimizer.attach(model)
    else:
        optimizer = _kfac(model=model, inverse_update_interval=2)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if form == "model_arg_tf_function":
        step = tf.function(step)
    for xb, yb in batches:
        assert np.isfinite(float(step(tf.constant(xb), tf.constant(yb))))
    _assert_same_weights(_weights(model), reference, atol=1e-5, rtol=1e-4)
    assert _counters(optimizer.curvature_summary()) == _counters(reference_rows)


def test_custom_loop_without_a_model_raises_a_clear_error():
    model = _mlp()
    optimizer = _kfac()
    x, y = _blobs(n=16)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    with pytest.raises(ValueError, match="needs its model"):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


# --------------------------------------------------------------------------- 4. uncovered layers
class _ChannelScale(keras.layers.Layer):
    """A layer no curvature block handles: ``y = x * s`` with a trainable ``s``."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="s")

    def call(self, x):
        return x * self.s


def _uncovered_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="d1"),
            keras.layers.PReLU(name="act"),
            _ChannelScale(name="scale"),
            keras.layers.Dense(3, name="d"),
        ]
    )


@pytest.mark.parametrize("fallback", ["adam", "momentum"])
def test_uncovered_layers_warn_once_and_get_the_fallback_update(fallback):
    keras.utils.set_random_seed(0)
    model = _uncovered_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    initial = {v.path: v.numpy().copy() for v in model.trainable_variables}
    uncovered = [v.path for v in model.trainable_variables if "/act/" in v.path or "/scale/" in v.path]
    assert len(uncovered) == 2
    optimizer = _kfac(learning_rate=0.1, fallback=fallback, fallback_lr_ratio=0.05)
    # The warning comes once: at compile when the model is built (the optimizer is built
    # there), else at the first step.
    with pytest.warns(UserWarning) as record:
        model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
        trajectory, grads = [], []
        for step in range(3):
            with tf.GradientTape() as tape:
                loss = LOSS(y[:32], model(x[:32], training=True))
            paths = [v.path for v in model.trainable_variables]
            g = dict(zip(paths, tape.gradient(loss, model.trainable_variables)))
            grads.append({p: tf.convert_to_tensor(g[p]).numpy() for p in uncovered})
            model.train_on_batch(x[:32], y[:32])
            trajectory.append({p: v.numpy().copy() for p, v in zip(paths, model.trainable_variables)})
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    ours = [str(w.message) for w in record if "no curvature block" in str(w.message)]
    assert len(ours) == 1, ours
    assert f"fallback={fallback!r}" in ours[0]
    listed = ours[0].split("no curvature block for ", 1)[1].split(";", 1)[0].split(", ")
    assert sorted(name.rsplit("/", 1)[-1] for name in listed) == ["act", "scale"], listed
    # The uncovered variables follow the fallback exactly (independent numpy recurrences).
    for path in uncovered:
        w = initial[path].astype(np.float64)
        m = np.zeros_like(w)
        v = np.zeros_like(w)
        for t in range(3):
            g = grads[t][path]
            if fallback == "adam":  # Keras's Adam at 0.05 * 0.1
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
                w = w - 0.005 * m_hat / (np.sqrt(v_hat) + 1e-7 / np.sqrt(1 - 0.999 ** (t + 1)))
            else:  # momentum SGD on the raw gradient (no preconditioning, no KL clip)
                m = 0.9 * m - 0.1 * g
                w = w + m
            np.testing.assert_allclose(trajectory[t][path], w, rtol=1e-4, atol=1e-6, err_msg=f"{path} step {t}")
    slots = [v.path for v in optimizer.variables]
    assert any(p.endswith("scale_s_fallback_m") for p in slots) == (fallback == "adam"), slots
    assert any(p.endswith("scale_s_momentum") for p in slots) == (fallback == "momentum"), slots
    rows = optimizer.curvature_summary()
    assert [(r["layer"], r["kind"]) for r in rows] == [("d1", "dense"), ("d", "dense")]
    assert float(LOSS(y, model(x))) < float(LOSS(y, _reload_initial(model, initial)(x)))


def _reload_initial(model, initial):
    clone = keras.models.clone_model(model)
    for variable, original in zip(clone.trainable_variables, model.trainable_variables):
        variable.assign(initial[original.path])
    return clone


def test_fallback_arguments_are_validated_and_configured():
    with pytest.raises(ValueError, match="fallback.*'adam' or 'momentum'"):
        keras_hoopt.SPNGD(fallback="sgd")
    for bad in (0, -1.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="fallback_lr_ratio"):
            keras_hoopt.KFAC(fallback_lr_ratio=bad)
    optimizer = keras_hoopt.THOR(fallback="momentum", fallback_lr_ratio=0.2)
    config = optimizer.get_config()
    assert (config["fallback"], config["fallback_lr_ratio"]) == ("momentum", 0.2)
    assert keras_hoopt.THOR.from_config(config).get_config() == config


# --------------------------------------------------------------------------- 5. save / load
def _make_optimizer(name):
    if name == "kfac":
        # Inverses refreshed every 3 steps: stale inverses must come back from the file.
        return _kfac(inverse_update_interval=3)
    # SP-NGD: adaptive intervals, statistic history and the previous learning rate are state.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.7)
    return keras_hoopt.SPNGD(learning_rate=schedule, damping=1e-2, kl_clip=1e-2, similarity_threshold=0.5)


def _state(optimizer):
    rows = optimizer.curvature_summary()
    values = {}
    for row in rows:
        for name in row["statistics"]:
            values[(row["layer"], name)] = (optimizer.statistic(row["layer"], name),
                                            optimizer.inverse(row["layer"], name))
    return rows, values, int(optimizer.iterations.numpy())


def _assert_same_state(a, b):
    assert _counters(a[0]) == _counters(b[0])
    assert a[2] == b[2]
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        np.testing.assert_array_equal(a[1][key][0], b[1][key][0], err_msg=str(key))
        np.testing.assert_array_equal(a[1][key][1], b[1][key][1], err_msg=str(key))


def _mlp_bn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="d1"),
            keras.layers.BatchNormalization(momentum=0.5, name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="d2"),
        ]
    )


@pytest.mark.parametrize("name", ["kfac", "spngd"])
def test_keras_file_and_tf_checkpoint_continue_the_same_trajectory(tmp_path, name):
    x, y = _blobs(seed=4)
    batches = _batches(x, y, 32)  # 6 batches
    schedule = (batches + batches)[:13]
    model = _mlp_bn(seed=6)
    optimizer = _make_optimizer(name)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    for xb, yb in schedule[:8]:
        model.train_on_batch(xb, yb)
    saved_state = _state(optimizer)
    if name == "spngd":  # the adaptive state is not trivial
        assert any(max(r["intervals"].values()) > 1 for r in saved_state[0]), saved_state[0]
    path = str(tmp_path / "m.keras")
    model.save(path)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt"))
    for xb, yb in schedule[8:]:
        model.train_on_batch(xb, yb)
    expected_weights, expected_state = _weights(model), _state(optimizer)
    keras.backend.clear_session()

    # 1. keras_hoopt.load_model: statistics, inverses, counters, intervals come back with the model.
    loaded = keras_hoopt.load_model(path)
    assert type(loaded.optimizer).__name__ == name.upper()
    _assert_same_state(_state(loaded.optimizer), saved_state)
    for xb, yb in schedule[8:]:
        loaded.train_on_batch(xb, yb)
    _assert_same_weights(_weights(loaded), expected_weights, atol=1e-6, rtol=1e-6)
    assert _counters(_state(loaded.optimizer)[0]) == _counters(expected_state[0])

    # 2. tf.train.Checkpoint into a fresh model (other initial weights) and a fresh, unbuilt optimizer.
    fresh = _mlp_bn(seed=99)
    fresh_optimizer = _make_optimizer(name)
    fresh.compile(optimizer=fresh_optimizer, loss=LOSS, jit_compile=False)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(checkpoint)
    for xb, yb in schedule[8:]:
        fresh.train_on_batch(xb, yb)
    _assert_same_weights(_weights(fresh), expected_weights, atol=1e-6, rtol=1e-6)
    _assert_same_state(_state(fresh_optimizer), expected_state)


# --------------------------------------------------------------------------- 6. mixed precision
def _mixed_mlp(seed=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="d1"),
            keras.layers.Dense(3, name="d2"),
            keras.layers.Activation("linear", dtype="float32", name="logits"),
        ]
    )


def test_mixed_float16_trains_and_divides_out_the_loss_scale():
    assert keras.mixed_precision.global_policy().name == "float32"  # conftest's reset
    x, y = _blobs(seed=7)
    # factor_decay=0: after one step every statistic is exactly that batch's statistic.
    reference = _mixed_mlp()
    initial = _weights(reference)
    reference_optimizer = _kfac(factor_decay=0.0)
    reference.compile(optimizer=reference_optimizer, loss=LOSS, jit_compile=False)
    reference.train_on_batch(x[:64], y[:64])

    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _mixed_mlp()
    assert model.get_layer("d1").compute_dtype == "float16"
    model.set_weights(initial)
    optimizer = _kfac(factor_decay=0.0)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is optimizer
    model.train_on_batch(x[:64], y[:64])
    assert float(model.optimizer.dynamic_scale) > 1000.0  # the scale is really there to be divided out
    for layer in ("d1", "d2"):
        for name in ("A", "G"):
            mixed, full = optimizer.statistic(layer, name), reference_optimizer.statistic(layer, name)
            assert mixed.dtype == np.float32 and np.isfinite(mixed).all(), (layer, name)
            relative = np.linalg.norm(mixed - full) / np.linalg.norm(full)
            assert relative < 1e-2, (layer, name, relative)
    before = float(LOSS(y, model(x)))
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert float(LOSS(y, model(x))) < 0.8 * before
    rows = optimizer.curvature_summary()
    assert all(r["refreshes"] == 19 and r["nonfinite_skips"] == 0 and r["failed_inversions"] == 0 for r in rows)
    for variable in optimizer._statistics + optimizer._inverses:
        assert variable.dtype == "float32" and np.isfinite(variable.numpy()).all()


def test_global_policy_is_float32_again_after_the_mixed_precision_test():
    # Runs after the test above (file order): the conftest fixture restored float32.
    assert keras.mixed_precision.global_policy().name == "float32"
    assert _mlp().get_layer("d1").compute_dtype == "float32"


# --------------------------------------------------------------------------- 7. bad inputs, config
@pytest.mark.parametrize(
    "name,value",
    [
        ("damping", 0.0),
        ("damping", -1e-3),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("factor_decay", 1.0),
        ("kl_clip", 0.0),
        ("fisher", "foo"),
        ("factor_update_interval", 0),
        ("inverse_update_interval", 1.5),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_the_parameter(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_hoopt.KFAC(**{name: value})


def test_negative_learning_rate_raises_value_error():
    with pytest.raises(ValueError, match="learning_rate"):
        keras_hoopt.KFAC(learning_rate=-0.01)


def _custom_squared_error(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize(
    "loss,shown",
    [(keras.losses.Huber(), "huber"), (_custom_squared_error, "_custom_squared_error"), ("mae", "mae")],
)
def test_monte_carlo_fisher_rejects_an_unsupported_loss_at_compile(loss, shown):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=f"fisher='mc' does not support the loss.*{shown}"):
        model.compile(optimizer=keras_hoopt.KFAC(fisher="mc"), loss=loss)
    # Supported losses, as objects or strings, compile.
    for ok in (keras.losses.MeanSquaredError(), "binary_crossentropy", LOSS):
        model.compile(optimizer=keras_hoopt.KFAC(fisher="mc"), loss=ok)


def test_monte_carlo_fisher_in_a_custom_loop_without_a_loss_raises_at_the_first_step():
    model = _mlp()
    optimizer = keras_hoopt.KFAC(fisher="mc", model=model)  # attached without a loss
    x, y = _blobs(n=16)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    with pytest.raises(ValueError, match="fisher='mc' needs the model's loss"):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


def test_config_round_trip_with_learning_rate_and_damping_schedules():
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
    damping = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=20, decay_rate=0.1)
    optimizer = keras_hoopt.KFAC(
        learning_rate=lr, damping=damping, momentum=0.8, nesterov=True, factor_decay=0.9, kl_clip=None,
        fisher="mc", factor_update_interval=2, inverse_update_interval=6, seed=3, weight_decay=1e-4,
    )
    config = optimizer.get_config()
    json.dumps(config)  # plain data
    for restored in (
        keras_hoopt.KFAC.from_config(copy.deepcopy(config)),  # (Keras's from_config edits its argument)
        keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)),
    ):
        assert type(restored) is keras_hoopt.KFAC
        assert restored.get_config() == config
        assert isinstance(restored.damping, keras.optimizers.schedules.ExponentialDecay)
        for step in (0, 15, 40):
            assert float(restored.damping(step)) == pytest.approx(float(damping(step)), rel=1e-6)
            assert float(restored._learning_rate(step)) == pytest.approx(float(lr(step)), rel=1e-6)
        assert restored.refresh_policy.statistics_interval == 2 and restored.refresh_policy.inverse_interval == 6
        assert (restored.momentum, restored.nesterov, restored.factor_decay, restored.kl_clip) == (0.8, True, 0.9, None)
        assert (restored.fisher, restored.seed, restored.weight_decay) == ("mc", 3, 1e-4)
    # keras_hoopt's own schedule as damping.
    epoch_damping = keras_hoopt.schedules.EpochExponentialDecay(0.03, steps_per_epoch=5, decay_rate=0.5)
    again = keras_hoopt.KFAC.from_config(keras_hoopt.KFAC(damping=epoch_damping).get_config())
    assert float(again.damping(50)) == pytest.approx(float(epoch_damping(50)))


# --------------------------------------------------------------------------- 8. robustness
def _poisonable_model(flag):
    """Input(3) -> Spike -> Dense d (no bias) -> Shrink -> tanh -> Dense out.

    With ``flag`` set, d's statistics overflow while the loss and every gradient stay finite:
    Spike multiplies example 0's input by 1e20 (so A = E[a a^T] ~ 1e40 = inf in float32) and
    Shrink multiplies example 0's output of d by 1e-20 (the loss does not see the spike).
    Shrink's backward pass also multiplies example 1's output gradient by 1e20 (so
    G = E[g g^T] = inf); example 1's input is zero, so d's kernel gradient
    sum_n a_n g_n^T stays finite (example 0: 1e20 * 1e-20; example 1: 0 * 1e20).
    """

    def rows(n, index, value):
        return tf.where(tf.logical_and(tf.range(n) == index, flag > 0), value, 1.0)[:, None]

    class Spike(keras.layers.Layer):
        def call(self, x):
            return x * rows(tf.shape(x)[0], 0, 1e20)

    class Shrink(keras.layers.Layer):
        def call(self, z):
            @tf.custom_gradient
            def shrink(z):
                n = tf.shape(z)[0]
                forward = rows(n, 0, 1e-20)

                def grad(dy):
                    return dy * forward * rows(n, 1, 1e20)

                return z * forward, grad

            return shrink(z)

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            Spike(name="spike"),
            keras.layers.Dense(4, use_bias=False, name="d"),
            Shrink(name="shrink"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="out"),
        ]
    )


def test_nonfinite_statistics_are_skipped_and_the_weights_stay_finite():
    flag = tf.Variable(0, dtype=tf.int32, trainable=False)
    model = _poisonable_model(flag)
    optimizer = _kfac(learning_rate=0.05, inverse_update_interval=1)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.integers(0, 3, 32).astype("int32")
    for _ in range(3):
        model.train_on_batch(x, y)
    before = {key: (optimizer.statistic(*key), optimizer.inverse(*key)) for key in
              [("d", "A"), ("d", "G"), ("out", "A"), ("out", "G")]}

    poisoned = x.copy()
    poisoned[1] = 0.0  # example 1 (whose output gradient is amplified) has a zero input
    flag.assign(1)
    loss = model.train_on_batch(poisoned, y)
    assert np.isfinite(loss)
    assert all(np.isfinite(w).all() for w in _weights(model))
    rows = _summary_by_layer(optimizer)
    assert rows["d"]["statistics"]["A"]["nonfinite_skips"] == 1
    assert rows["d"]["statistics"]["G"]["nonfinite_skips"] == 1
    assert rows["d"]["nonfinite_skips"] == 2 and rows["d"]["refreshes"] == 3  # skipped, not refreshed
    assert rows["d"]["steps_since_refresh"] == 1
    assert rows["out"]["nonfinite_skips"] == 0 and rows["out"]["refreshes"] == 4  # unaffected layer
    for name in ("A", "G"):
        np.testing.assert_array_equal(optimizer.statistic("d", name), before[("d", name)][0])
        # Recomputed (inverse_update_interval=1) from the unchanged statistics: the previous inverse.
        np.testing.assert_allclose(optimizer.inverse("d", name), before[("d", name)][1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(optimizer.statistic("out", "A"), before[("out", "A")][0])

    flag.assign(0)
    model.train_on_batch(x, y)
    rows = _summary_by_layer(optimizer)
    assert rows["d"]["refreshes"] == 4 and rows["d"]["nonfinite_skips"] == 2
    assert all(np.isfinite(w).all() for w in _weights(model))
    assert np.isfinite(optimizer.statistic("d", "A")).all() and np.isfinite(optimizer.inverse("d", "A")).all()


def test_failed_factorisation_keeps_the_last_good_inverse():
    # A single Dense layer; factor_decay=0 so that A is exactly the batch's A.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    optimizer = _kfac(learning_rate=0.01, damping=1e-30, factor_decay=0.0, inverse_update_interval=1)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    y = rng.normal(size=(32, 2)).astype("float32")
    model.train_on_batch(rng.normal(size=(32, 3)).astype("float32"), y)  # full-rank A: inverted
    good_a, good_g = optimizer.inverse("d", "A"), optimizer.inverse("d", "G")
    assert np.isfinite(good_a).all() and not np.allclose(good_a, np.eye(4))

    # Every example identical: A = [1000, 1000, 1000, 1]^T [...] is rank 1 at scale 1e6; with damping
    # 1e-30 (and the 10x, 100x, 1000x retries) Cholesky fails in float32 every time.
    loss = model.train_on_batch(np.full((32, 3), 1000.0, "float32"), y)
    assert np.isfinite(loss)
    assert all(np.isfinite(w).all() for w in _weights(model))
    row = _summary_by_layer(optimizer)["d"]
    assert row["statistics"]["A"]["failed_inversions"] == 1 and row["statistics"]["A"]["inversions"] == 1
    assert row["statistics"]["G"]["failed_inversions"] == 0 and row["statistics"]["G"]["inversions"] == 2
    assert row["failed_inversions"] == 1 and row["nonfinite_skips"] == 0
    assert row["refreshes"] == 2  # the statistic itself is finite and was taken
    np.testing.assert_array_equal(optimizer.inverse("d", "A"), good_a)  # the last good inverse
    assert not np.array_equal(optimizer.inverse("d", "G"), good_g)  # G inverted with its new value
    assert np.isfinite(optimizer.statistic("d", "A")).all()


def test_damped_inverse_retries_with_more_damping():
    # Indefinite (-0.05): damping 0.01 fails, the first retry (0.1) succeeds.
    matrix = tf.constant(np.diag([-0.05, 1.0, 2.0]).astype("float32"))
    inverse, ok = linalg.damped_inverse(matrix, 0.01)
    assert bool(ok)
    np.testing.assert_allclose(inverse.numpy(), np.diag(1.0 / np.array([0.05, 1.1, 2.1])), rtol=1e-5)
    # Too indefinite for 0.01 * 1000: reported as failed (the caller keeps its last inverse).
    _, ok = linalg.damped_inverse(tf.constant(np.diag([-100.0, 1.0, 2.0]).astype("float32")), 0.01)
    assert not bool(ok)


# --------------------------------------------------------------------------- 9. tf.distribute
@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    """Run tests/_mirrored_worker.py in a subprocess: logical devices must be set before TF starts."""
    out = tmp_path_factory.mktemp("mirrored") / "result.npz"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_mirrored_worker.py"), str(out)],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = np.load(out, allow_pickle=False)
    return {key: data[key] for key in data.files}, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["sync_bn", "sync_bn_spngd", "no_bn_adaptive"])
def test_mirrored_strategy_matches_the_single_device_run(mirrored_results, variant):
    # The model is Conv2D + BatchNormalization(synchronized=True) + Dense. Plain BatchNormalization
    # normalises each replica's 32 examples with that replica's own moments, so a 2-replica run is a
    # different function from the single-device run on the global batch of 64 (weights differ by
    # ~1e-2 after 3 steps); synchronized=True all-reduces the moments: the same computation.
    arrays, info = mirrored_results
    assert info["replicas"] == 2
    rows = {mode: [r for r in info[variant][mode]["summary"] if "step" not in r] for mode in ("mirrored", "single")}
    assert rows["mirrored"] == rows["single"]
    # KFAC computes its statistics every step (no tf.cond); SPNGD inside a tf.cond on "due".
    assert all(r["refreshes"] == 3 for r in rows["mirrored"])
    if variant == "no_bn_adaptive":  # the quadratic model's choices agree to float32 reduction order
        steps = [info[variant][mode]["summary"][-1]["step"] for mode in ("mirrored", "single")]
        for key in ("learning_rate", "momentum", "damping", "reduction_ratio"):
            assert steps[0][key] == pytest.approx(steps[1][key], rel=1e-3, abs=1e-6), (key, steps)
    count = info[variant]["count"]
    assert count > 0
    moved = False
    for i in range(count):
        single, mirrored = arrays[f"{variant}/single/{i}"], arrays[f"{variant}/mirrored/{i}"]
        np.testing.assert_allclose(mirrored, single, rtol=1e-4, atol=1e-5, err_msg=f"{variant} weight {i}")
        moved = moved or not np.allclose(single, arrays[f"{variant}/initial/{i}"])
    assert moved
    for key in info[variant]["statistics"]:
        np.testing.assert_allclose(arrays[f"{variant}/mirrored/stat/{key}"], arrays[f"{variant}/single/stat/{key}"],
                                   rtol=1e-4, atol=1e-6, err_msg=key)


# --------------------------------------------------------------------------- 10. schedules, weight decay, switching
def test_learning_rate_schedule_is_applied_per_step():
    x, y = _blobs(seed=9)
    # 0.05 at step 0, then 5e-8, 5e-14: with momentum 0 only the first step moves the weights.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=1e-6, staircase=True)
    model = _mlp(seed=4)
    optimizer = _kfac(learning_rate=schedule, momentum=0.0)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    initial = _weights(model)
    model.train_on_batch(x[:32], y[:32])
    assert float(optimizer.learning_rate) == pytest.approx(0.05 * 1e-6, rel=1e-5)  # schedule(1), for the next step
    after_one = _weights(model)
    assert not np.allclose(after_one[0], initial[0], atol=1e-4)
    model.train_on_batch(x[32:64], y[32:64])
    model.train_on_batch(x[64:96], y[64:96])
    _assert_same_weights(_weights(model), after_one, atol=1e-6, rtol=0)
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(3)), rel=1e-5)


def test_weight_decay_is_decoupled_as_keras_documents():
    x, y = _blobs(seed=9)
    lr, wd = 0.05, 0.2
    plain = _mlp(seed=4)
    plain.compile(optimizer=_kfac(learning_rate=lr), loss=LOSS, jit_compile=False)
    decayed = _mlp(seed=4)
    optimizer = _kfac(learning_rate=lr, weight_decay=wd)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    decayed.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    initial = {v.path: v.numpy().copy() for v in decayed.trainable_variables}
    plain.train_on_batch(x[:32], y[:32])
    decayed.train_on_batch(x[:32], y[:32])
    # w <- w - lr * wd * w, then the (unchanged) K-FAC step computed from the same gradients.
    for p, d in zip(plain.trainable_variables, decayed.trainable_variables):
        shrink = 0.0 if "bias" in d.path else lr * wd
        np.testing.assert_allclose(d.numpy() - p.numpy(), -shrink * initial[d.path], atol=1e-6, err_msg=d.path)
    assert any(np.abs(initial[v.path]).max() * lr * wd > 1e-3 for v in decayed.trainable_variables)


def test_recompiling_with_sgd_after_kfac_trains_plainly():
    x, y = _blobs(seed=10)
    model = _mlp(seed=2)
    kfac = _kfac()
    model.compile(optimizer=kfac, loss=LOSS, jit_compile=False)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    rows = kfac.curvature_summary()
    assert all(r["refreshes"] == 6 for r in rows)

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=False)
    start = _weights(model)
    with tf.GradientTape() as tape:
        loss = LOSS(y[:32], model(x[:32], training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    model.train_on_batch(x[:32], y[:32])
    for w0, g, w1 in zip(start, grads, _weights(model)):
        np.testing.assert_allclose(w1, w0 - 0.1 * g.numpy(), rtol=1e-5, atol=1e-6)  # exactly one SGD step
    before = float(LOSS(y, model(x)))
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert float(LOSS(y, model(x))) < before
    assert kfac.curvature_summary() == rows  # the K-FAC capture is gone: nothing recorded any more

    # And back to a new curvature optimizer on the same model.
    again = _kfac()
    model.compile(optimizer=again, loss=LOSS, jit_compile=False)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert [(r["layer"], r["refreshes"]) for r in again.curvature_summary()] == [("d1", 6), ("d2", 6)]


def test_gradient_accumulation_counts_refresh_intervals_in_optimizer_steps():
    # gradient_accumulation_steps is a keras.optimizers.Optimizer argument (documented as passed through).
    x, y = _blobs(n=256, seed=3)
    model = _mlp(seed=1)
    optimizer = _kfac(gradient_accumulation_steps=2, inverse_update_interval=2)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)  # 8 micro-batches, 4 updates
    assert int(optimizer.iterations.numpy()) == 4
    rows = optimizer.curvature_summary()
    assert all(r["refreshes"] == 4 for r in rows), rows
    # Inverses due at optimizer steps 0 and 2; the statistics were refreshed in the last step.
    assert all(r["inversions"] == 2 and r["steps_since_refresh"] == 0 for r in rows), rows
    assert not np.allclose(optimizer.inverse("d2", "G"), np.eye(3))

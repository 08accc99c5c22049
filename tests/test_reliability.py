"""Nothing silently wrong (issue 14): non-finite steps skipped and reported, finite arguments,
capture that keeps working on shared layers, one optimizer per model.

Each test reproduces a failure a user met, with the outcome it must have now. The references are
independent: a snapshot of every variable before the step, a second run without the bad batches, or
the decoupled weight-decay formula applied by hand.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = {
    "kfac": lambda **kw: keras_hoopt.KFAC(learning_rate=0.05, damping=1e-2, **kw),
    "spngd": lambda **kw: keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2, **kw),
    "thor": lambda **kw: keras_hoopt.THOR(learning_rate=0.02, damping=1e-2, frequency=2, **kw),
}


def _regression(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    w = rng.normal(size=(6, 2)).astype("float32")
    y = (np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 2))).astype("float32")
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh", name="d1"), keras.layers.Dense(2, name="d2")]
    )


def _all_finite(model):
    return all(np.isfinite(w).all() for w in model.get_weights())


def _optimizer_state(optimizer):
    """Every optimizer variable except the two step counters, by path."""
    skip = {optimizer.iterations.path, optimizer._skipped_steps.path}
    return {v.path: v.numpy().copy() for v in optimizer.variables if v.path not in skip}


# --------------------------------------------------------------------------- 1. non-finite steps
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("where", ["inputs", "labels", "sample_weight", "inf_inputs"])
def test_non_finite_batches_are_skipped_and_training_goes_on(name, where):
    x, y = _regression()
    weights = np.ones(len(x), "float32")
    bad = [3, 4, 9]  # batches of 16 (shuffle=False), in the first of three epochs
    for b in bad:
        rows = slice(16 * b + 2, 16 * b + 5)
        if where == "inputs":
            x[rows] = np.nan
        elif where == "inf_inputs":
            x[rows, 0] = np.inf
        elif where == "labels":
            y[rows] = np.nan
        else:
            weights[rows] = np.nan
    clean = np.ones(len(x), bool)
    for b in bad:
        clean[16 * b: 16 * (b + 1)] = False
    model = _model()
    optimizer = OPTIMIZERS[name]()
    model.compile(optimizer=optimizer, loss="mse")
    start = model.evaluate(x[clean], y[clean], verbose=0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.fit(x, y, sample_weight=weights, batch_size=16, epochs=1, shuffle=False, verbose=0)
    after_one = model.evaluate(x[clean], y[clean], verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, sample_weight=weights, batch_size=16, epochs=2, shuffle=False, verbose=0)
    after_three = model.evaluate(x[clean], y[clean], verbose=0)
    assert _all_finite(model)
    assert optimizer.skipped_steps == 3 * len(bad)
    assert optimizer.health_summary()["skipped_steps"] == 3 * len(bad)
    assert optimizer.health_summary()["steps"] == 3 * 16
    assert after_three < after_one < start


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(name):
    x, y = _regression(64)
    model = _model()
    # Momentum, decoupled weight decay and statistics refreshed every step: everything a step writes.
    optimizer = OPTIMIZERS[name](weight_decay=1e-2, factor_decay=0.5)
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(x[:32], y[:32])
    model.train_on_batch(x[32:], y[32:])
    weights, state = model.get_weights(), _optimizer_state(optimizer)
    x_bad = x[:32].copy()
    x_bad[5] = np.nan
    with pytest.warns(RuntimeWarning, match="1 training step"):
        model.train_on_batch(x_bad, y[:32])
    assert optimizer.skipped_steps == 1
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(after, before)
    for path, value in _optimizer_state(optimizer).items():
        np.testing.assert_array_equal(value, state[path], err_msg=path)
    model.train_on_batch(x[:32], y[:32])  # and the next good step moves again
    assert not np.array_equal(model.get_weights()[0], weights[0])


def test_on_nonfinite_raise_stops_fit_at_the_last_good_state():
    x, y = _regression(64)
    model = _model()
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, on_nonfinite="raise")
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[:32], y[:32], batch_size=16, verbose=0)
    good = model.get_weights()
    x[40] = np.nan
    with pytest.raises(FloatingPointError, match="on_nonfinite='raise'"):
        model.fit(x[32:], y[32:], batch_size=16, shuffle=False, verbose=0)
    for before, after in zip(good, model.get_weights()):
        np.testing.assert_array_equal(after, before)
    assert optimizer.get_config()["on_nonfinite"] == "raise"


def test_skipped_steps_survive_a_keras_file(tmp_path):
    x, y = _regression(64)
    model = _model()
    model.compile(optimizer=keras_hoopt.KFAC(learning_rate=0.05), loss="mse")
    x[3] = np.nan
    with pytest.warns(RuntimeWarning):
        model.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras_hoopt.load_model(path)
    assert loaded.optimizer.skipped_steps == 1
    assert loaded.optimizer.on_nonfinite == "skip"


def test_weight_decay_is_still_keras_decoupled_decay():
    # Decay now happens with the update (so a skipped step can keep the weights): one step with
    # weight_decay must equal the step without it minus lr * wd * w0, Keras's own formula.
    x, y = _regression(32)
    results = []
    for wd in (None, 0.1):
        model = _model()
        model.compile(optimizer=keras_hoopt.KFAC(learning_rate=0.05, momentum=0.0, kl_clip=None, weight_decay=wd), loss="mse")
        w0 = model.get_weights()
        model.train_on_batch(x, y)
        results.append(model.get_weights())
    for start, plain, decayed in zip(w0, *results):
        np.testing.assert_allclose(decayed, plain - 0.05 * 0.1 * start, rtol=1e-5, atol=1e-7)


def test_mirrored_replicas_skip_together(tmp_path):
    """2 logical CPUs: a NaN in one replica's half of the batch skips the step on both."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_nonfinite_mirrored_worker.py")],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("kfac", "spngd", "thor"):
        run = info[name]
        assert run["replicas"] == 2
        assert run["skipped"] == [2, 2], name  # every replica's copy of the counter
        assert run["replicas_identical"], name
        assert run["finite"], name
        # The mirrored run equals the single-device run on the same global batches.
        assert run["max_difference_to_single_device"] < 1e-4, name
        assert run["single_skipped"] == 2


# --------------------------------------------------------------------------- 2. finite arguments
@pytest.mark.parametrize("cls", [keras_hoopt.KFAC, keras_hoopt.SPNGD, keras_hoopt.THOR])
@pytest.mark.parametrize("argument", ["learning_rate", "damping", "kl_clip", "momentum", "factor_decay",
                                      "weight_decay", "clipnorm", "global_clipnorm", "loss_scale_factor"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinite_and_nan_arguments_are_rejected(cls, argument, value):
    with pytest.raises(ValueError, match=f"Invalid value for `{argument}`"):
        cls(**{argument: value})


@pytest.mark.parametrize("cls,argument", [(keras_hoopt.SPNGD, "similarity_threshold"),
                                          (keras_hoopt.THOR, "omega1"), (keras_hoopt.THOR, "omega2")])
def test_infinite_policy_thresholds_are_rejected(cls, argument):
    with pytest.raises(ValueError, match=f"Invalid value for `{argument}`"):
        cls(**{argument: float("inf")})


def test_on_nonfinite_accepts_only_skip_and_raise():
    with pytest.raises(ValueError, match="`on_nonfinite`.*'skip' or 'raise'"):
        keras_hoopt.SPNGD(on_nonfinite="ignore")


# --------------------------------------------------------------------------- 3. capture
def _refreshes(optimizer):
    return [row["refreshes"] for row in optimizer.curvature_summary()]


def test_a_layer_shared_by_two_models_is_captured_for_both():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype("float32")
    y = rng.integers(0, 3, 120)
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    i = keras.Input((4,))
    a = keras.Model(i, keras.layers.Dense(3, name="head_a")(shared(i)))
    j = keras.Input((4,))
    b = keras.Model(j, keras.layers.Dense(1, name="head_b")(shared(j)))
    opt_a = keras_hoopt.SPNGD(learning_rate=0.1, similarity_threshold=0.0)
    a.compile(optimizer=opt_a, loss="sparse_categorical_crossentropy")
    a.fit(x, y, batch_size=20, verbose=0)  # 6 steps
    opt_b = keras_hoopt.SPNGD(learning_rate=0.1, similarity_threshold=0.0, factor_decay=0.0)
    b.compile(optimizer=opt_b, loss="mse")
    a.fit(x[:60], y[:60], batch_size=20, verbose=0)  # a retrace of A's step after B's compile
    assert _refreshes(opt_a) == [9, 9]
    b.fit(x[:60], y[:60].astype("float32"), batch_size=20, shuffle=False, verbose=0)
    assert _refreshes(opt_b) == [3, 3]
    assert [row["layer"] for row in opt_b.curvature_summary()] == ["shared", "head_b"]
    a.fit(x[:60], y[:60], batch_size=20, verbose=0)
    assert _refreshes(opt_a) == [12, 12]
    # B's statistic of the shared layer is its own: the input factor of B's batches only.
    a_in = np.concatenate([x[:60], np.ones((60, 1), "float32")], 1)
    np.testing.assert_allclose(opt_b.statistic("shared", "A"), a_in[40:60].T @ a_in[40:60] / 20, rtol=1e-4, atol=1e-5)


def test_recompiling_with_a_plain_optimizer_releases_only_that_models_capture():
    shared = keras.layers.Dense(8, name="shared")
    i = keras.Input((4,))
    a = keras.Model(i, keras.layers.Dense(3)(shared(i)))
    j = keras.Input((4,))
    b = keras.Model(j, keras.layers.Dense(1)(shared(j)))
    a.compile(optimizer=keras_hoopt.KFAC(), loss="mse")
    b.compile(optimizer=keras_hoopt.KFAC(), loss="mse")
    b.compile(optimizer="sgd", loss="mse")
    assert "call" in shared.__dict__  # still captured for A
    a.compile(optimizer="sgd", loss="mse")
    assert "call" not in shared.__dict__ and "_keras_hoopt_sessions" not in shared.__dict__


class _NoTrainingFlag(keras.Model):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x))  # training=True forgotten
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


def test_a_train_step_that_records_nothing_warns_once_and_names_the_fix():
    x, y = _regression(64)
    i = keras.Input((6,))
    model = _NoTrainingFlag(i, keras.layers.Dense(2)(keras.layers.Dense(8)(i)), name="custom_step")
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    with pytest.warns(UserWarning, match=r"no curvature block recorded.*training=True") as caught:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert sum("no curvature block recorded" in str(w.message) for w in caught) == 1
    assert all(row["refreshes"] == 0 for row in optimizer.curvature_summary())


# --------------------------------------------------------------------------- 4. one optimizer, one model
@pytest.mark.parametrize("built", [False, True])
def test_one_optimizer_in_two_models_is_refused_at_the_second_compile(built):
    optimizer = keras_hoopt.SPNGD()
    first = keras.Sequential([keras.layers.Dense(3)], name="first")
    second = keras.Sequential([keras.layers.Dense(3)], name="second")
    if built:
        first.build((None, 4))
        second.build((None, 4))
    first.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="already attached to the model 'first'.*'second'"):
        second.compile(optimizer=optimizer, loss="mse")
    first.compile(optimizer=optimizer, loss="mse")  # the same model again is fine


def test_a_skipped_step_puts_batchnorm_moving_statistics_back():
    # BatchNormalization writes its moving mean/variance in the forward pass, before the optimizer
    # sees the NaN gradients; the skipped step restores them, so inference stays finite.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="c"),
        keras.layers.BatchNormalization(momentum=0.5, name="bn"), keras.layers.Flatten(), keras.layers.Dense(2),
    ])
    optimizer = keras_hoopt.SPNGD(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x[:32], y[:32])
    bn = model.get_layer("bn")
    before = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    bad = x[32:64].copy()
    bad[0, 2, 2, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.train_on_batch(bad, y[32:64])
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])
    assert np.isfinite(model.evaluate(x, y, verbose=0))
    model.train_on_batch(x[64:], y[64:])  # a good step still updates them
    assert not np.array_equal(bn.moving_mean.numpy(), before[0])


class _NoTrainingArgument(keras.Model):
    def __init__(self):
        super().__init__(name="no_training_argument")
        self.d1 = keras.layers.Dense(8, activation="tanh", name="d1")
        self.d2 = keras.layers.Dense(2, name="d2")

    def call(self, x):  # no `training`: Keras's train_step then calls self(x) without it
        return self.d2(self.d1(x))


def test_a_subclassed_model_whose_call_takes_no_training_argument_is_captured():
    x, y = _regression(64)
    model = _NoTrainingArgument()
    optimizer = keras_hoopt.KFAC(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "recorded nothing" warning
        model.fit(x, y, batch_size=16, verbose=0)
    assert _refreshes(optimizer) == [4, 4]
    model.evaluate(x, y, verbose=0)  # inference passes record nothing
    model.predict(x, verbose=0)
    assert _refreshes(optimizer) == [4, 4]


@pytest.mark.parametrize("cls", [keras_hoopt.NaturalGradient, keras_hoopt.Newton])
def test_one_exact_optimizer_in_two_models_is_refused_too(cls):
    optimizer = cls()
    first = keras.Sequential([keras.layers.Dense(3)], name="first")
    second = keras.Sequential([keras.layers.Dense(3)], name="second")
    first.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="already attached to the model 'first'.*'second'"):
        second.compile(optimizer=optimizer, loss="mse")


def test_curvature_tensorboard_reports_the_skipped_steps(tmp_path):
    x, y = _regression(64)
    x[20] = np.nan  # batch 1 of 4
    model = _model()
    model.compile(optimizer=keras_hoopt.SPNGD(learning_rate=0.05), loss="mse")
    callback = keras_hoopt.callbacks.CurvatureTensorBoard(str(tmp_path), spectra=False)
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[callback])
    assert callback.scalars()["optimizer/skipped_steps"] == 1.0

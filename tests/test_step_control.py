"""The defaults ``step_size="auto"``, ``damping_control="auto"``, ``learning_rate=None``, ``damping=None``.

They resolve against the loss when the optimizer meets its model: the quadratic model's step with
Levenberg-Marquardt damping where the loss's curvature is known, the fixed step otherwise.
"""

import warnings

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_hoopt
from keras_hoopt.optimizers import step_control

FIXED = {"learning_rate": 0.01, "damping": 1e-3}


def _requested(**kwargs):
    values = dict(step_size="auto", damping_control="auto", learning_rate=None, damping=None, kl_clip="auto")
    values.update(kwargs)
    return values


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, np.argmax(x[:, :3], axis=1).astype("int32")


@pytest.mark.parametrize("requested,supported,nesterov,expected", [
    # The loss's curvature is known: the quadratic model, LM, lr 1, initial lambda 1e-4, no KL-clip.
    (_requested(), True, False, ("quadratic_model", "lm", 1.0, 1e-4, None)),
    # Unknown curvature (Huber, several outputs, attach(model) alone), or Nesterov: the fixed step.
    (_requested(), False, False, ("fixed", None, 0.01, 1e-3, 1e-3)),
    (_requested(), True, True, ("fixed", None, 0.01, 1e-3, 1e-3)),
    # Explicit values are kept, and the rest follows the step size in use.
    (_requested(step_size="fixed"), True, False, ("fixed", None, 0.01, 1e-3, 1e-3)),
    (_requested(learning_rate=0.3, damping=0.1), True, False, ("quadratic_model", "lm", 0.3, 0.1, None)),
    (_requested(damping_control=None), True, False, ("quadratic_model", None, 1.0, 1e-4, None)),
    (_requested(kl_clip=1e-2), True, False, ("quadratic_model", "lm", 1.0, 1e-4, 1e-2)),
    (_requested(step_size="quadratic_model", damping_control="auto"), True, False,
     ("quadratic_model", "lm", 1.0, 1e-4, None)),
])
def test_resolution_table(requested, supported, nesterov, expected):
    got = step_control.resolve(requested, supported, nesterov, FIXED, attached=True)
    assert (got["step_size"], got["damping_control"], got["learning_rate"], got["damping"], got["kl_clip"]) == expected


def test_a_damping_schedule_is_not_adapted():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    got = step_control.resolve(_requested(damping=schedule), True, False, FIXED, attached=True)
    assert got["step_size"] == "quadratic_model" and got["damping_control"] is None and got["damping"] is schedule


def test_before_the_model_is_known_nothing_is_decided():
    got = step_control.resolve(_requested(), False, False, FIXED, attached=False)
    assert got["step_size"] == "auto" and got["damping_control"] is None and got["learning_rate"] == 0.01


@pytest.mark.parametrize("requested,loss", [
    (_requested(step_size="quadratic_model"), keras.losses.Huber()),
    (_requested(damping_control="lm"), keras.losses.Huber()),
    (_requested(step_size="quadratic_model"), None),
])
def test_an_explicit_quadratic_model_the_loss_rules_out_is_an_error(requested, loss):
    with pytest.raises(ValueError, match="quadratic_model"):
        step_control.resolve(requested, False, False, FIXED, attached=True, loss=loss)


@pytest.mark.parametrize("cls,fixed_damping", [(keras_hoopt.KFAC, 1e-3), (keras_hoopt.SPNGD, 1e-3),
                                               (keras_hoopt.THOR, 0.03)])
def test_compile_resolves_the_defaults_and_the_config_keeps_them_open(cls, fixed_damping):
    x, y = _data()
    model = _mlp()
    optimizer = cls()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert (optimizer.step_size, optimizer.damping_control, optimizer.kl_clip) == ("quadratic_model", "lm", None)
    assert float(optimizer.learning_rate) == 1.0 and optimizer.damping == pytest.approx(1e-4)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    summary = optimizer.step_summary()
    assert summary["step_size"] == "quadratic_model" and summary["learning_rate"] > 0
    config = optimizer.get_config()
    assert {k: config[k] for k in ("learning_rate", "damping", "step_size", "damping_control", "kl_clip")} == {
        "learning_rate": None, "damping": None, "step_size": "auto", "damping_control": "auto", "kl_clip": "auto",
    }
    # The same config on a loss without known curvature: the class's fixed step.
    other = cls.from_config(config)
    _mlp().compile(optimizer=other, loss=keras.losses.Huber())
    assert (other.step_size, other.damping_control, other.kl_clip) == ("fixed", None, 1e-3)
    assert float(other.learning_rate) == pytest.approx(0.01) and other.damping == pytest.approx(fixed_damping)


def test_a_custom_training_loop_gets_the_fixed_step_without_a_loss_and_the_model_with_one():
    x, y = _data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for loss, step_size in ((None, "fixed"), (loss_fn, "quadratic_model")):
        model = _mlp()
        optimizer = keras_hoopt.KFAC()
        optimizer.attach(model, loss=loss)
        assert optimizer.step_size == step_size

        @tf.function
        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                step_loss = loss_fn(yb, model(xb, training=True))
            optimizer.apply(tape.gradient(step_loss, model.trainable_variables), model.trainable_variables)
            return step_loss

        first = float(train_step(x, y))
        for _ in range(5):
            last = float(train_step(x, y))
        assert last < first
        # No train_step, so no batch for Levenberg-Marquardt to re-evaluate: lambda stays as given.
        assert optimizer.current_damping() == pytest.approx(optimizer.damping)


def _recurrent_model(dtype=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4, 3)), keras.layers.Bidirectional(keras.layers.GRU(5, dtype=dtype)),
                             keras.layers.Dense(3, dtype="float32")])


def test_a_recurrent_model_gets_the_quadratic_model_by_differences_and_trains():
    """One-sided differences only re-run the GRU's while loop, so "auto" keeps the quadratic model."""
    model = _recurrent_model()
    optimizer = keras_hoopt.SPNGD()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert (optimizer.step_size, optimizer.damping_control) == ("quadratic_model", "lm")
    x = np.random.default_rng(0).normal(size=(64, 4, 3)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the fixed step
        history = model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    assert optimizer.step_size == "quadratic_model"
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert optimizer.step_summary()["learning_rate"] != pytest.approx(1.0)  # the model's choice, not lr


@pytest.mark.parametrize("kwargs, dtype", [(dict(quadratic_model_products="forward_mode"), None),
                                           ({}, "mixed_bfloat16")])
def test_a_recurrent_model_gets_the_fixed_step_where_the_products_would_be_forward_mode(kwargs, dtype):
    model = _recurrent_model(dtype)
    optimizer = keras_hoopt.SPNGD(**kwargs)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert (optimizer.step_size, optimizer.damping_control, optimizer.kl_clip) == ("fixed", None, 1e-3)
    assert float(optimizer.learning_rate) == pytest.approx(0.01)


def test_a_model_that_cannot_be_rerun_falls_back_to_the_fixed_step(monkeypatch):
    """What keras-hub's GPT-2 under XLA did in forward mode (an op without a gradient), injected into
    the model's re-run: "auto" warns once and trains on with the fixed step; an explicit
    "quadratic_model" raises."""
    from keras_hoopt.capture import CaptureSession
    from keras_hoopt.optimizers import quadratic_model

    def untraceable(self, args, kwargs):
        raise LookupError("gradient registry has no entry for: XlaDynamicUpdateSlice")

    monkeypatch.setattr(CaptureSession, "rerun", untraceable)
    x, y = _data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _mlp()
    optimizer = keras_hoopt.KFAC()
    model.compile(optimizer=optimizer, loss=loss)
    assert optimizer.step_size == "quadratic_model"
    with pytest.warns(UserWarning, match="could not build the quadratic model.*XlaDynamicUpdateSlice"):
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert (optimizer.step_size, optimizer.damping_control, optimizer.kl_clip) == ("fixed", None, 1e-3)
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    assert optimizer.step_summary()["learning_rate"] == pytest.approx(0.01)
    assert history.history["loss"][-1] < history.history["loss"][0]
    explicit_model = _mlp()
    explicit_model.compile(optimizer=keras_hoopt.KFAC(step_size="quadratic_model"), loss=loss)
    with pytest.raises(quadratic_model.ProductsUnavailable, match="LookupError: .*XlaDynamicUpdateSlice"):
        explicit_model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_an_error_in_the_products_own_code_is_not_taken_for_an_untraceable_model(monkeypatch):
    """Only the model's re-run is translated: a TypeError elsewhere in the quadratic model (here its
    quadratic form called with the wrong arguments) propagates, even with step_size="auto"."""
    from keras_hoopt.optimizers import quadratic_model

    def wrong_signature(family, from_logits, y_pred, u):
        raise AssertionError("not reached")

    monkeypatch.setattr(quadratic_model, "output_quadratic_form", wrong_signature)
    x, y = _data()
    model = _mlp()
    optimizer = keras_hoopt.KFAC()
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(TypeError):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert optimizer.step_size == "quadratic_model"

"""Bad inputs, tried as a new Keras user would (issue 14 "Reliability", item 7).

Every case feeds the optimizers something wrong (a hyperparameter, the data, the
model, the way the optimizer is used, or a numerical fault) and asserts what a
user should see. Each case asserts one of the two acceptable outcomes:

====================  =====================================================================
outcome class         what the case asserts
====================  =====================================================================
clear error           ``pytest.raises(<type>, match=...)``: the exception type, and a message
                      that names the argument (``Invalid value for `<name>```) or the cause
handled gracefully    training finishes and the weights are finite, plus a counter that moved
                      (``skipped_steps``, ``failed_inversions``, ``rejected_steps``,
                      ``refreshes``) or a warning's text (``pytest.warns(..., match=...)``)
unclear error         not acceptable: an exception that does not name the cause (e.g. a
                      ``TypeError`` from inside the update step, an ``AttributeError`` on a
                      private name). The case asserts the clear error / graceful outcome the
                      library should give, so it fails until the library is fixed
silently wrong        not acceptable: NaN weights, a counter that did not move, an input
                      accepted that should be refused, a model that trains without
                      curvature. The case asserts the right behaviour and fails meanwhile
hangs                 not acceptable: a run that does not finish. None found; every case
                      here runs in seconds
====================  =====================================================================

What the cases found when the module was written, before the fixes that came with it (every case
passes now; the reproductions of the issue itself, such as a custom ``train_step`` without
``training=True``, are in tests/test_reliability.py):

====================  =====================================================================
outcome class         cases
====================  =====================================================================
clear error           60: non-finite floats of KFAC/SPNGD/THOR and the exact optimizers' own
                      floats; bad strings/ints; schedule steps_per_epoch=0, end_epoch=nan;
                      labels out of range / wrong shape / wrong count; apply_gradients
                      without a model; one optimizer in two models; statistic() of an
                      unknown layer; fisher="mc" with an unsupported loss; a model too large
                      for NaturalGradient; on_nonfinite="raise" (FloatingPointError)
handled gracefully    31: NaN/+inf/-inf inputs, NaN float labels, NaN sample weights (exact
                      skip counts, bit-identical state); all-zero batch; batch of 1; partial
                      batch; empty dataset; custom/stateful-LSTM layers left uncovered with a warning;
                      an Embedding's IndexedSlices gradient preconditioned; frozen layer; no-bias Dense; nested functional and subclassed
                      (with ``training``) models; mixed_float16 NaN batch; KFAC's BatchNorm
                      moving statistics on a NaN batch; inspection before build; .keras
                      reload; shared layer; tiny or NaN or zero damping; lr=1e6 under the
                      KL-clip; Levenberg-Marquardt rejects
unclear error         2 (fixed): ``statistic()`` before build (AttributeError
                      ``_statistics``); schedules refused numpy scalars
silently wrong        14 (fixed): NaturalGradient/Newton accepted NaN/inf weight_decay,
                      clipnorm, loss_scale_factor; the schedules accepted NaN/inf
                      initial_value, power, end_value, decay_rate, epochs_per_decay and a
                      fractional steps_per_epoch; a subclassed model whose ``call(self, x)``
                      has no ``training`` argument got no curvature at all; a learning rate
                      that became inf wrote NaN weights without counting a skipped step;
                      NaturalGradient let a NaN batch poison BatchNorm's moving statistics
hangs                 none
====================  =====================================================================

The five groups of cases: hyperparameters, data, models, misuse, faults. Models
are tiny (Dense 4-8-3), runs are a few steps with ``verbose=0``; every test builds
its own model through the helpers below (no module-level models or optimizers).
"""

import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.schedules import EpochExponentialDecay, PolynomialEpochDecay

KFAC, SPNGD, THOR = keras_hoopt.KFAC, keras_hoopt.SPNGD, keras_hoopt.THOR
NaturalGradient, Newton = keras_hoopt.NaturalGradient, keras_hoopt.Newton
CURVATURE = (KFAC, SPNGD, THOR)
NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- helpers
def _xy(n=64, seed=0):
    """``n`` examples of 4 features and integer labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


def _mlp(name="mlp", use_bias=True):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", use_bias=use_bias, name="hidden"),
            keras.layers.Dense(3, use_bias=use_bias, name="logits"),
        ],
        name=name,
    )


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compiled(cls=KFAC, model=None, loss=None, **kwargs):
    """``(model, optimizer)``: a fresh tiny model compiled with a fresh optimizer."""
    kwargs.setdefault("learning_rate", 0.1)
    if cls in CURVATURE:
        kwargs.setdefault("damping", 1e-2)
    model = _mlp() if model is None else model
    optimizer = cls(**kwargs)
    model.compile(optimizer=optimizer, loss=_sce() if loss is None else loss)
    return model, optimizer


def _fit(model, x, y, batch_size=16, epochs=1, **kwargs):
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False, **kwargs)


def _finite(model):
    return all(np.isfinite(v.numpy()).all() for v in model.weights)


def _snapshot(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def _moved(before, variables):
    """Largest absolute change of each variable since ``before``."""
    return [float(np.max(np.abs(a - v.numpy()))) for a, v in zip(before, variables)]


def _refreshes(optimizer):
    return {row["layer"]: row["refreshes"] for row in optimizer.curvature_summary()}


def _invalid(name, value):
    """The message pattern of ``_validation.check``: it names the argument and the value."""
    return rf"Invalid value for `{re.escape(name)}`: {re.escape(repr(value))}\. Accepted: "


# ===================================================================== 1. hyperparameters
_NON_FINITE_FLOATS = [
    (KFAC, "learning_rate", NAN),
    (SPNGD, "learning_rate", INF),
    (THOR, "learning_rate", -INF),
    (KFAC, "damping", NAN),
    (SPNGD, "damping", INF),
    (THOR, "momentum", NAN),
    (KFAC, "factor_decay", INF),
    (SPNGD, "kl_clip", NAN),
    (THOR, "kl_clip", INF),
    (SPNGD, "similarity_threshold", NAN),
    (SPNGD, "similarity_threshold", INF),
    (THOR, "omega1", NAN),
    (THOR, "omega2", INF),
    (KFAC, "weight_decay", NAN),
    (SPNGD, "clipnorm", INF),
    (THOR, "clipvalue", NAN),
    (KFAC, "global_clipnorm", -INF),
    (SPNGD, "ema_momentum", NAN),
    (THOR, "loss_scale_factor", INF),
    (NaturalGradient, "learning_rate", NAN),
    (Newton, "damping", INF),
    (NaturalGradient, "momentum", NAN),
    (NaturalGradient, "weight_decay", NAN),
    (Newton, "clipnorm", INF),
    (Newton, "loss_scale_factor", NAN),
]


@pytest.mark.parametrize(
    "cls,name,value", _NON_FINITE_FLOATS, ids=[f"{c.__name__}-{n}={v}" for c, n, v in _NON_FINITE_FLOATS]
)
def test_a_non_finite_float_argument_is_refused_by_name(cls, name, value):
    with pytest.raises(ValueError, match=_invalid(name, value)):
        cls(**{name: value})


_BAD_CHOICES = [
    (KFAC, {"fisher": "true"}, "fisher"),
    (NaturalGradient, {"fisher": "fisher"}, "fisher"),
    (KFAC, {"communication": "mpi"}, "communication"),
    (SPNGD, {"model_parallel": "all"}, "model_parallel"),
    (KFAC, {"on_nonfinite": "ignore"}, "on_nonfinite"),
    (Newton, {"on_nonfinite": "warn"}, "on_nonfinite"),
    (NaturalGradient, {"step_control": "trust_region"}, "step_control"),
    (SPNGD, {"max_interval": 0}, "max_interval"),
    (KFAC, {"seed": 1.5}, "seed"),
    (THOR, {"nesterov": "yes"}, "nesterov"),
    (KFAC, {"factor_update_interval": 0}, "factor_update_interval"),
    (KFAC, {"inverse_update_interval": 2.5}, "inverse_update_interval"),
    (THOR, {"frequency": 0}, "frequency"),
    (THOR, {"split_dim": 0}, "split_dim"),
    (THOR, {"omega1": 0.001, "omega2": 0.01}, "omega2"),  # omega2 > omega1
    (KFAC, {"learning_rate": "0.1"}, "learning_rate"),  # a string, as read from a config file
    (SPNGD, {"momentum": 1.0}, "momentum"),
    (THOR, {"damping": 0.0}, "damping"),
    (Newton, {"max_parameters": 0}, "max_parameters"),
    (SPNGD, {"weight_rescaling": "no"}, "weight_rescaling"),
]


@pytest.mark.parametrize(
    "cls,kwargs,name", _BAD_CHOICES, ids=[f"{c.__name__}-{n}" for c, _, n in _BAD_CHOICES]
)
def test_a_bad_string_or_int_argument_is_refused_by_name(cls, kwargs, name):
    with pytest.raises(ValueError, match=_invalid(name, kwargs[name])):
        cls(**kwargs)


_POLY = dict(initial_value=0.1, steps_per_epoch=10, end_epoch=5)
_EXP = dict(initial_value=0.03, steps_per_epoch=10)
_BAD_SCHEDULES = [
    (PolynomialEpochDecay, {**_POLY, "initial_value": NAN}, "initial_value"),
    (PolynomialEpochDecay, {**_POLY, "initial_value": INF}, "initial_value"),
    (PolynomialEpochDecay, {**_POLY, "power": INF}, "power"),
    (PolynomialEpochDecay, {**_POLY, "end_value": NAN}, "end_value"),
    (PolynomialEpochDecay, {**_POLY, "steps_per_epoch": 0}, "steps_per_epoch"),
    (PolynomialEpochDecay, {**_POLY, "steps_per_epoch": 2.5}, "steps_per_epoch"),  # int() made it 2
    (PolynomialEpochDecay, {**_POLY, "end_epoch": NAN}, "end_epoch"),
    (EpochExponentialDecay, {**_EXP, "decay_rate": NAN}, "decay_rate"),
    (EpochExponentialDecay, {**_EXP, "initial_value": INF}, "initial_value"),
    (EpochExponentialDecay, {**_EXP, "epochs_per_decay": INF}, "epochs_per_decay"),
]


@pytest.mark.parametrize(
    "cls,kwargs,name",
    _BAD_SCHEDULES,
    ids=[f"{c.__name__}-{n}={k[n]}" for c, k, n in _BAD_SCHEDULES],
)
def test_a_schedule_refuses_a_non_finite_or_bad_argument_by_name(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid value for `{name}`"):
        cls(**kwargs)


def test_a_schedule_accepts_numpy_scalars_like_the_optimizers_do():
    # KFAC(damping=np.float32(0.03)) is accepted; a grid search over np.logspace gives numpy scalars.
    KFAC(damping=np.float32(0.03), learning_rate=np.float64(0.1))
    schedule = EpochExponentialDecay(np.float32(0.03), steps_per_epoch=np.int64(10))
    assert float(schedule(0)) == pytest.approx(0.03)


# ============================================================================ 2. data
@pytest.mark.parametrize("cls,value", [(KFAC, NAN), (SPNGD, INF), (THOR, -INF)], ids=["KFAC-nan", "SPNGD-inf", "THOR--inf"])
def test_non_finite_inputs_in_two_batches_skip_exactly_those_steps(cls, value):
    x, y = _xy()
    x[17, 1] = value  # batch 1 of 4
    x[50, 0] = value  # batch 3 of 4
    model, optimizer = _compiled(cls)
    before = _snapshot(model.trainable_variables)
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(model, x, y)
    assert _finite(model)
    assert optimizer.skipped_steps == 2
    assert optimizer.health_summary()["skipped_steps"] == 2
    assert min(_moved(before, model.trainable_variables)) > 0  # the two good batches were applied


def test_a_skipped_step_leaves_weights_momenta_and_statistics_bit_identical():
    x, y = _xy()
    model, optimizer = _compiled(SPNGD, weight_decay=1e-2)
    model.train_on_batch(x[:16], y[:16])
    weights = _snapshot(model.weights)
    state = {v.path: np.array(v.numpy(), copy=True) for v in optimizer.variables}
    bad = x[16:32].copy()
    bad[3, 2] = NAN
    with pytest.warns(RuntimeWarning, match="skipped"):
        model.train_on_batch(bad, y[16:32])
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(weights, model.weights))
    changed = {v.path for v in optimizer.variables if not np.array_equal(state[v.path], v.numpy())}
    assert changed == {f"{optimizer.name}/iteration", f"{optimizer.name}/skipped_steps"}


def test_nan_in_float_labels_skips_that_batch():
    x, _ = _xy()
    y = np.random.default_rng(1).normal(size=(64, 3)).astype("float32")
    y[20, 0] = NAN  # batch 1
    model, optimizer = _compiled(KFAC, loss="mse")
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(model, x, y)
    assert _finite(model)
    assert optimizer.skipped_steps == 1


def test_a_nan_sample_weight_skips_that_batch():
    x, y = _xy()
    weights = np.ones(64, "float32")
    weights[40] = NAN  # batch 2
    model, optimizer = _compiled(THOR)
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(model, x, y, sample_weight=weights)
    assert _finite(model)
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("cls", [NaturalGradient, Newton])
def test_the_exact_optimizers_skip_a_nan_batch_too(cls):
    x, y = _xy()
    x[20, 3] = NAN  # batch 1
    model, optimizer = _compiled(cls, learning_rate=0.5)
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(model, x, y)
    assert _finite(model)
    assert optimizer.skipped_steps == 1


def test_an_all_zero_input_batch_trains_and_keeps_finite_statistics():
    x, y = _xy()
    x[:16] = 0.0  # the first batch: A has only its bias entry
    model, optimizer = _compiled(KFAC, inverse_update_interval=1)
    _fit(model, x, y)
    assert _finite(model)
    health = optimizer.health_summary()
    assert (health["skipped_steps"], health["failed_inversions"], health["nonfinite_statistics"]) == (0, 0, 0)
    assert np.isfinite(optimizer.statistic("hidden", "A")).all()
    assert _refreshes(optimizer) == {"hidden": 4, "logits": 4}


def test_a_batch_of_size_one_trains():
    x, y = _xy(3)
    model, optimizer = _compiled(SPNGD)
    _fit(model, x, y, batch_size=1)
    assert _finite(model)
    assert int(optimizer.iterations.numpy()) == 3
    assert optimizer.skipped_steps == 0
    assert all(r >= 1 for r in _refreshes(optimizer).values())


def test_a_partial_last_batch_trains():
    x, y = _xy(40)  # 16 + 16 + 8
    model, optimizer = _compiled(KFAC)
    _fit(model, x, y)
    assert _finite(model)
    assert int(optimizer.iterations.numpy()) == 3
    assert _refreshes(optimizer) == {"hidden": 3, "logits": 3}


@pytest.mark.parametrize("label", [7, -1])
def test_a_sparse_label_out_of_range_is_a_clear_error_or_a_skipped_step(label):
    # On CPU TensorFlow checks the labels; on a GPU its kernel returns a NaN loss instead,
    # and then the step must be skipped.
    x, y = _xy()
    y[21] = label  # batch 1
    model, optimizer = _compiled(KFAC)
    if tf.config.list_physical_devices("GPU"):
        with pytest.warns(RuntimeWarning, match="skipped"):
            _fit(model, x, y)
        assert optimizer.skipped_steps == 1
    else:
        with pytest.raises(
            tf.errors.InvalidArgumentError, match=rf"label value of {label} which is outside the valid range of \[0, 3\)"
        ):
            _fit(model, x, y)
    assert _finite(model)


def test_labels_of_the_wrong_shape_are_a_clear_error():
    x, _ = _xy()
    model, _ = _compiled(KFAC, loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"`target` and `output` must have the same shape.*\(16, 5\).*\(16, 3\)"):
        _fit(model, x, np.zeros((64, 5), "float32"))


def test_labels_for_fewer_examples_than_inputs_are_a_clear_error():
    x, y = _xy()
    model, _ = _compiled(SPNGD)
    with pytest.raises(ValueError, match=r"Data cardinality is ambiguous"):
        _fit(model, x, y[:50])


def test_an_empty_dataset_warns_and_changes_nothing():
    x, y = _xy()
    model, optimizer = _compiled(KFAC)
    before = _snapshot(model.trainable_variables)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(16)
    with pytest.warns(UserWarning, match="ran out of data"):
        model.fit(empty, epochs=1, verbose=0)
    assert max(_moved(before, model.trainable_variables)) == 0.0
    assert optimizer.skipped_steps == 0
    assert _refreshes(optimizer) == {"hidden": 0, "logits": 0}


# ========================================================================== 3. models
class _Scale(keras.layers.Layer):
    """A custom layer with a weight: no curvature block exists for it."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def test_a_model_without_any_supported_layer_warns_and_trains_first_order():
    x, _ = _xy()
    y = np.tanh(2.0 * x)
    model = keras.Sequential([keras.Input((4,)), _Scale(name="scale"), keras.layers.Activation("tanh")])
    with pytest.warns(UserWarning, match=r"no curvature block for .*scale"):
        model, optimizer = _compiled(KFAC, model=model, loss="mse")
        before = _snapshot(model.trainable_variables)
        _fit(model, x, y)
    assert optimizer.curvature_summary() == []
    assert _finite(model)
    assert max(_moved(before, model.trainable_variables)) > 0


def test_a_frozen_layer_is_left_alone_and_the_others_are_preconditioned():
    x, y = _xy()
    model = _mlp()
    model.get_layer("hidden").trainable = False
    frozen = _snapshot(model.get_layer("hidden").weights)
    model, optimizer = _compiled(KFAC, model=model)
    _fit(model, x, y)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, model.get_layer("hidden").weights))
    assert _refreshes(optimizer) == {"logits": 4}
    assert _finite(model)


def test_dense_layers_without_bias_get_factors_without_the_bias_row():
    x, y = _xy()
    model, optimizer = _compiled(KFAC, model=_mlp(use_bias=False))
    _fit(model, x, y)
    shapes = {row["layer"]: row["factor_shapes"] for row in optimizer.curvature_summary()}
    assert shapes == {"hidden": {"A": (4, 4), "G": (8, 8)}, "logits": {"A": (8, 8), "G": (3, 3)}}
    assert _refreshes(optimizer) == {"hidden": 4, "logits": 4}
    assert _finite(model)


def test_a_sequential_nested_in_a_functional_model_is_preconditioned():
    x, y = _xy()
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="inner_dense")], name="inner")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(inner(inputs)))
    model, optimizer = _compiled(THOR, model=model)
    _fit(model, x, y)
    assert _refreshes(optimizer) == {"inner_dense": 1, "head": 1}  # THOR: frequency=100, refreshed at step 0
    assert _finite(model)


class _Subclassed(keras.Model):
    """The first subclassed model of the Keras guide: ``call(self, x)``, no ``training`` argument."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.hidden = keras.layers.Dense(8, activation="tanh", name="sub_hidden")
        self.out = keras.layers.Dense(3, name="sub_out")

    def call(self, x):
        return self.out(self.hidden(x))


class _SubclassedNested(keras.Model):
    """A subclassed model with a ``training`` argument and a nested Sequential block."""

    def __init__(self):
        super().__init__(name="subclassed_nested")
        self.block = keras.Sequential([keras.layers.Dense(8, activation="tanh", name="block_dense")], name="block")
        self.out = keras.layers.Dense(3, name="nested_out")

    def call(self, x, training=None):
        return self.out(self.block(x, training=training))


def test_a_subclassed_model_whose_call_has_no_training_argument_is_preconditioned():
    x, y = _xy()
    model, optimizer = _compiled(KFAC, model=_Subclassed())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y)
    assert [str(w.message) for w in caught if "no curvature block recorded" in str(w.message)] == []
    assert _refreshes(optimizer) == {"sub_hidden": 4, "sub_out": 4}
    assert _finite(model)


def test_a_subclassed_model_with_a_nested_block_is_preconditioned():
    x, y = _xy()
    model, optimizer = _compiled(SPNGD, model=_SubclassedNested())
    _fit(model, x, y)
    refreshes = _refreshes(optimizer)
    assert set(refreshes) == {"block_dense", "nested_out"}
    assert min(refreshes.values()) >= 2  # SPNGD's adaptive intervals: refreshed at least at steps 0 and 1
    assert _finite(model)


def test_a_stateful_lstm_is_left_uncovered_with_a_warning_and_still_trains():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 5, 2)).astype("float32"), rng.integers(0, 3, 64)
    model = keras.Sequential(
        [
            keras.Input((5, 2), batch_size=16),
            keras.layers.LSTM(6, stateful=True, name="lstm"),  # the LSTM block rejects stateful layers
            keras.layers.Dense(3, name="logits"),
        ]
    )
    with pytest.warns(UserWarning, match=r"no curvature block for .*lstm"):
        model, optimizer = _compiled(KFAC, model=model)
        before = _snapshot(model.get_layer("lstm").trainable_weights)
        _fit(model, x, y)
    assert _refreshes(optimizer) == {"logits": 4}
    assert min(_moved(before, model.get_layer("lstm").trainable_weights)) > 0
    assert _finite(model)


def test_an_embedding_with_indexed_slices_gradients_is_preconditioned_and_trains():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 10, (64, 5)), rng.integers(0, 3, 64)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embedding"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model, optimizer = _compiled(KFAC, model=model)
    before = _snapshot(model.get_layer("embedding").trainable_weights)
    _fit(model, x, y)  # the embedding's gradient is a tf.IndexedSlices
    assert _refreshes(optimizer) == {"embedding": 4, "logits": 4}
    assert min(_moved(before, model.get_layer("embedding").trainable_weights)) > 0
    assert _finite(model)


def test_mixed_float16_with_a_nan_batch_keeps_finite_weights_through_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")  # reset by conftest
    x, y = _xy()
    x[20] = NAN  # batch 1
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3, dtype="float32")]
    )
    model, optimizer = _compiled(KFAC, model=model)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    initial_scale = float(model.optimizer.dynamic_scale.numpy())
    before = _snapshot(model.trainable_variables)
    _fit(model, x, y)
    assert _finite(model)
    assert float(model.optimizer.dynamic_scale.numpy()) < initial_scale  # the overflowing step was skipped
    assert min(_moved(before, model.trainable_variables)) > 0


@pytest.mark.parametrize("cls", [KFAC, NaturalGradient])
def test_a_nan_batch_does_not_poison_batchnorm_moving_statistics(cls):
    # The skip warning says "weights ... kept their last good values": moving_mean and
    # moving_variance are weights too, and inference reads them.
    x, y = _xy()
    x[20] = NAN  # batch 1
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="hidden"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model, optimizer = _compiled(cls, model=model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        _fit(model, x, y)
    assert optimizer.skipped_steps == 1
    assert [v.path for v in model.weights if not np.isfinite(v.numpy()).all()] == []
    assert np.isfinite(model.predict(x[:16], verbose=0)).all()


def test_a_model_too_large_for_the_exact_natural_gradient_is_refused_at_compile():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(100), keras.layers.Dense(60)])  # 6,560 parameters
    with pytest.raises(ValueError, match=r"max_parameters=5000 \(this model has 6,560 trainable parameters\)\. Use keras_hoopt.KFAC"):
        model.compile(optimizer=NaturalGradient(), loss="mse")


# ========================================================================== 4. misuse
def test_apply_gradients_without_a_model_names_the_fix():
    model = _mlp()
    optimizer = KFAC()
    gradients = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"KFAC needs its model: pass it to `model.compile\(optimizer=...\)`"):
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))


def test_model_argument_pointing_to_another_model_is_refused_at_compile():
    optimizer = KFAC(model=_mlp("first"))
    with pytest.raises(ValueError, match=r"already attached to the model 'first'.*'second'"):
        _mlp("second").compile(optimizer=optimizer, loss=_sce())


@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "trained"])
def test_one_optimizer_compiled_into_a_second_model_is_refused(built):
    first, optimizer = _compiled(THOR, model=_mlp("first"))
    if built:
        _fit(first, *_xy(16))
    second = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(3)], name="second")
    with pytest.raises(ValueError, match=r"THOR optimizer is already attached to the model 'first'.*'second'"):
        second.compile(optimizer=optimizer, loss=_sce())


def test_inspection_before_build_returns_empty_values():
    optimizer = KFAC()
    assert optimizer.curvature_summary() == []
    assert optimizer.skipped_steps == 0
    assert optimizer.kl_clip_coefficient is None
    assert optimizer.health_summary()["skipped_steps"] == 0
    unbuilt = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(3)])
    unbuilt.compile(optimizer=optimizer, loss=_sce())
    assert not optimizer.built
    assert optimizer.curvature_summary() == []


def test_statistic_of_an_unknown_layer_is_a_key_error_naming_it():
    model, optimizer = _compiled(KFAC)
    with pytest.raises(KeyError, match=r"'no_such_layer'"):
        optimizer.statistic("no_such_layer", "A")
    with pytest.raises(KeyError, match=r"No statistic 'Q' for layer 'hidden'"):
        optimizer.statistic("hidden", "Q")


def test_statistic_before_build_is_a_clear_error():
    optimizer = KFAC()
    keras.Sequential([keras.layers.Dense(8, name="hidden")]).compile(optimizer=optimizer, loss="mse")
    with pytest.raises((KeyError, ValueError, RuntimeError), match=r"hidden|built"):
        optimizer.statistic("hidden", "A")


def test_a_loaded_keras_file_continues_training_with_its_curvature_state(tmp_path):
    x, y = _xy()
    model, optimizer = _compiled(SPNGD)
    _fit(model, x, y)
    saved = _refreshes(optimizer)
    path = str(tmp_path / "run.keras")
    model.save(path)
    loaded = keras_hoopt.load_model(path)
    restored = loaded.optimizer
    assert isinstance(restored, SPNGD)
    assert _refreshes(restored) == saved and int(restored.iterations.numpy()) == 4
    _fit(loaded, x, y)
    assert int(restored.iterations.numpy()) == 8
    assert all(_refreshes(restored)[layer] > count for layer, count in saved.items())
    assert _finite(loaded)


def test_a_layer_shared_by_two_compiled_models_keeps_refreshing_in_both():
    x, y = _xy()
    shared = keras.layers.Dense(8, activation="tanh", name="shared")
    in_a, in_b = keras.Input((4,)), keras.Input((4,))
    model_a = keras.Model(in_a, keras.layers.Dense(3, name="head_a")(shared(in_a)), name="a")
    model_b = keras.Model(in_b, keras.layers.Dense(2, name="head_b")(shared(in_b)), name="b")
    model_a, opt_a = _compiled(KFAC, model=model_a)
    model_b, opt_b = _compiled(KFAC, model=model_b)
    _fit(model_a, x, y)
    _fit(model_b, x, y % 2)
    assert _refreshes(opt_a) == {"shared": 4, "head_a": 4} and _refreshes(opt_b) == {"shared": 4, "head_b": 4}
    _fit(model_a, x, y)
    _fit(model_b, x, y % 2)
    assert _refreshes(opt_a) == {"shared": 8, "head_a": 8} and _refreshes(opt_b) == {"shared": 8, "head_b": 8}
    assert _finite(model_a) and _finite(model_b)


@pytest.mark.parametrize(
    "cls,loss,named",
    [(KFAC, "mae", "'mae'"), (SPNGD, keras.losses.Huber(), "huber"), (NaturalGradient, "poisson", "'poisson'")],
    ids=["KFAC-mae", "SPNGD-Huber", "NaturalGradient-poisson"],
)
def test_fisher_mc_with_a_loss_that_has_no_sampler_is_refused_at_compile(cls, loss, named):
    with pytest.raises(ValueError, match=rf"fisher='mc' does not support the loss {named}.*Use fisher='empirical'"):
        _compiled(cls, fisher="mc", loss=loss)


def test_on_nonfinite_raise_stops_fit_and_keeps_the_last_good_weights():
    x, y = _xy(16)
    model, optimizer = _compiled(KFAC, on_nonfinite="raise")
    _fit(model, x, y)
    good = _snapshot(model.weights)
    x[3] = NAN
    with pytest.raises(FloatingPointError, match=r"skipped.*on_nonfinite='raise'"):
        _fit(model, x, y)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(good, model.weights))
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("cls", [THOR, Newton])
def test_on_nonfinite_raise_stops_train_on_batch(cls):
    x, y = _xy(16)
    model, optimizer = _compiled(cls, on_nonfinite="raise")
    model.train_on_batch(x, y)
    good = _snapshot(model.weights)
    x[5, 1] = INF
    with pytest.raises(FloatingPointError, match=rf"{cls.__name__}: 1 training step\(s\).*skipped"):
        model.train_on_batch(x, y)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(good, model.weights))


# ========================================================================== 5. faults
def _ill_conditioned(n=64):
    """Inputs with a duplicated column and feature scales from 1e-4 to 1e4."""
    x, y = _xy(n, seed=4)
    x[:, 1] = x[:, 0]
    x[:, 2] *= 1e4
    x[:, 3] *= 1e-4
    return x, y


@pytest.mark.parametrize("cls", [KFAC, THOR])
def test_tiny_damping_without_kl_clip_on_an_ill_conditioned_problem_keeps_finite_weights(cls):
    x, y = _ill_conditioned()
    extra = {"frequency": 1} if cls is THOR else {}
    model, optimizer = _compiled(cls, damping=1e-12, kl_clip=None, momentum=0.0, **extra)
    _fit(model, x, y, epochs=2)
    assert _finite(model)  # the loss may diverge (docs: a step-size problem), the weights must not be NaN
    assert optimizer.health_summary()["steps"] == 8


@pytest.mark.parametrize("cls", [KFAC, SPNGD])
def test_a_huge_learning_rate_is_bounded_by_the_kl_clip(cls):
    x, y = _xy()
    model, optimizer = _compiled(cls, learning_rate=1e6, kl_clip=1e-3)
    before = _snapshot(model.trainable_variables)
    _fit(model, x, y, epochs=2)
    assert _finite(model)
    assert optimizer.kl_clip_coefficient < 1e-6  # the clip scaled the step down by > 1e6
    assert max(_moved(before, model.trainable_variables)) < 5.0


def test_a_damping_schedule_that_returns_nan_counts_failed_inversions():
    x, y = _xy()
    model, optimizer = _compiled(KFAC, damping=lambda step: tf.constant(NAN), inverse_update_interval=1)
    _fit(model, x, y)
    assert _finite(model)
    assert optimizer.health_summary()["failed_inversions"] > 0


def test_a_damping_schedule_that_decays_to_zero_counts_failed_inversions():
    x, y = _xy()
    to_zero = PolynomialEpochDecay(1e-2, steps_per_epoch=1, end_epoch=1)  # 0 from step 1 on
    model, optimizer = _compiled(KFAC, damping=to_zero, inverse_update_interval=1)
    _fit(model, x, y)
    assert optimizer.current_damping() == 0.0
    assert _finite(model)
    assert optimizer.health_summary()["failed_inversions"] > 0  # G of the softmax layer is singular


def test_a_learning_rate_schedule_that_reaches_inf_skips_the_step():
    # A sign slip: decay_rate=-1 gives lr = 0.1 / (1 - step), inf at step 1.
    lr = keras.optimizers.schedules.InverseTimeDecay(0.1, decay_steps=1, decay_rate=-1.0)
    x, y = _xy(16)
    model, optimizer = _compiled(KFAC, learning_rate=lr)
    _fit(model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y)  # step 1: lr = inf
    assert _finite(model)
    assert optimizer.skipped_steps == 1
    assert any(issubclass(w.category, RuntimeWarning) and "skipped" in str(w.message) for w in caught)


def test_levenberg_marquardt_rejects_a_step_that_would_raise_the_loss():
    x, y = _xy()
    model, optimizer = _compiled(NaturalGradient, learning_rate=50.0, damping=1e-4)
    assert optimizer.step_control == "lm"
    before = model.evaluate(x, y, batch_size=64, verbose=0)
    _fit(model, x, y, batch_size=64, epochs=3)  # the same full batch every step
    assert optimizer.rejected_steps >= 1
    assert model.evaluate(x, y, batch_size=64, verbose=0) <= before + 1e-6
    assert _finite(model)
    assert optimizer.skipped_steps == 0

"""What the curvature blocks cover, as a user inspects it, and the Keras habits around it.

* ``model.compile(optimizer="spngd")`` and ``keras.optimizers.get`` resolve every optimizer name;
* ``coverage_summary()`` counts parameters exactly (against a count by hand), and
  ``curvature_summary()`` rows list the variables they precondition.
"""

import numpy as np
import pytest
import keras

import keras_hoopt


@pytest.mark.parametrize(
    "name, cls",
    [
        ("kfac", keras_hoopt.KFAC),
        ("spngd", keras_hoopt.SPNGD),
        ("SPNGD", keras_hoopt.SPNGD),
        ("thor", keras_hoopt.THOR),
        ("natural_gradient", keras_hoopt.NaturalGradient),
        ("newton", keras_hoopt.Newton),
    ],
)
def test_optimizer_names_resolve_like_keras_own(name, cls):
    assert type(keras.optimizers.get(name)) is cls
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is cls
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    if hasattr(model.optimizer, "curvature_summary"):
        assert [r["kind"] for r in model.optimizer.curvature_summary()] == ["dense", "dense"]


def test_an_unknown_name_is_still_keras_error():
    with pytest.raises(ValueError, match="kfca"):
        keras.optimizers.get("kfca")


class _Gain(keras.layers.Layer):
    """No block handles it: ``y = x * g``."""

    def build(self, input_shape):
        self.g = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="g")

    def call(self, x):
        return x * self.g


def test_coverage_summary_counts_parameters_by_kind():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),  # 3*3*3*4 + 4 = 112
            keras.layers.BatchNormalization(name="bn"),  # 4 + 4 trainable
            keras.layers.Flatten(),
            _Gain(name="gain"),  # 6*6*4 = 144, uncovered
            keras.layers.Dense(5, name="head"),  # 144*5 + 5 = 725
        ]
    )
    optimizer = keras_hoopt.SPNGD()
    with pytest.warns(UserWarning, match="no curvature block for .*gain"):
        model.compile(optimizer=optimizer, loss="mse")
    summary = optimizer.coverage_summary()
    assert summary["parameters"] == 112 + 8 + 144 + 725 == model.count_params() - 8  # minus BN's moving stats
    assert summary["by_kind"] == {"dense": 725, "conv2d": 112, "batchnorm": 8}
    assert summary["preconditioned"] == 725 + 112 + 8
    assert summary["uncovered"] == {"sequential/gain/g": 144}
    assert summary["share"] == pytest.approx(845 / 989)
    rows = {r["layer"]: r["variables"] for r in optimizer.curvature_summary()}
    assert rows == {
        "conv": ["sequential/conv/kernel", "sequential/conv/bias"],
        "bn": ["sequential/bn/gamma", "sequential/bn/beta"],
        "head": ["sequential/head/kernel", "sequential/head/bias"],
    }


def test_coverage_summary_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        keras_hoopt.KFAC().coverage_summary()

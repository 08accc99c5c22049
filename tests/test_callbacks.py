"""CurvatureTensorBoard and is_chief: what is written, checked against independent computations."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_hoopt
from keras_hoopt.callbacks import CurvatureTensorBoard, is_chief


def _events(log_dir):
    """``{tag: [(step, value), ...]}`` read back from the event files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, []).append((event.step, number))
                assert value.metadata.plugin_data.plugin_name in ("scalars", "")
    return out


def _digits_model():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(16, activation="tanh", name="hidden"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(10, name="logits"),
    ])


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_writes_optimizer_and_per_layer_scalars_readable_by_tensorboard(tmp_path):
    (x, y), _ = keras_hoopt.datasets.load_digits()
    model = _digits_model()
    damping = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10, decay_rate=0.5)
    optimizer = keras_hoopt.SPNGD(learning_rate=0.1, damping=damping)
    model.compile(optimizer=optimizer, loss=_loss())
    callback = CurvatureTensorBoard(str(tmp_path), update_freq=4)
    model.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0, callbacks=[callback])  # 16 steps
    events = _events(str(tmp_path))

    assert [step for step, _ in events["optimizer/damping"]] == [4, 8, 12, 16]
    for step, value in events["optimizer/damping"]:
        assert value == pytest.approx(1e-2 * 0.5 ** (step / 10), rel=1e-5)
    assert events["optimizer/learning_rate"][-1][1] == pytest.approx(0.1)
    assert 0 < events["optimizer/kl_clip_coefficient"][-1][1] <= 1
    summary = {row["layer"]: row for row in optimizer.curvature_summary()}
    for layer, names in (("hidden", "AG"), ("logits", "AG"), ("bn", "F")):
        for name in names:
            stats = summary[layer]["statistics"][name]
            assert events[f"{layer}/{name}/refreshes"][-1][1] == stats["refreshes"]
            assert events[f"{layer}/{name}/inversions"][-1][1] == stats["inversions"]
            assert events[f"{layer}/{name}/interval"][-1][1] == summary[layer]["intervals"][name]
            assert f"{layer}/{name}/trace" in events and f"{layer}/{name}/condition" in events
            assert events[f"{layer}/{name}/damped_condition"][-1][1] >= 1.0


def test_first_layer_trace_and_spectrum_match_the_batch_inputs():
    """K-FAC's A for the first Dense layer is E[a a^T] with a = [x, 1]: after one step on one batch
    with factor_decay=0, trace(A) = mean ||x||^2 + 1, and its eigenvalues are those of that matrix."""
    (x, y), _ = keras_hoopt.datasets.load_digits()
    x, y = x[:200], y[:200]
    model = _digits_model()
    model.compile(optimizer=keras_hoopt.KFAC(learning_rate=0.01, damping=1e-2, factor_decay=0.0), loss=_loss())
    model.train_on_batch(x, y)
    callback = CurvatureTensorBoard("unused", spectra=True)
    callback.set_model(model)
    scalars = callback.scalars()
    a = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1).astype(np.float64)
    expected = a.T @ a / len(x)
    eig = np.linalg.eigvalsh(expected)
    assert scalars["hidden/A/trace"] == pytest.approx(np.mean(np.sum(x.astype(np.float64) ** 2, 1)) + 1, rel=1e-5)
    assert scalars["hidden/A/eigenvalue_max"] == pytest.approx(eig[-1], rel=1e-4)
    # x has constant-zero pixels in digits: A is singular, reported at the cap.
    assert scalars["hidden/A/condition"] == pytest.approx(1 / np.finfo(np.float32).eps)
    assert scalars["hidden/A/steps_since_refresh"] == 0 and scalars["hidden/A/refreshes"] == 1


def test_kl_clip_coefficient_is_the_ratio_of_clipped_to_unclipped_updates():
    """Same state, same batch: the clipped step equals nu times the unclipped step."""
    (x, y), _ = keras_hoopt.datasets.load_digits()
    x, y = x[:128], y[:128]
    deltas, coefficients = [], []
    for kl_clip in (None, 1e-6):
        keras.utils.set_random_seed(3)
        model = _digits_model()
        optimizer = keras_hoopt.KFAC(learning_rate=0.05, damping=1e-2, momentum=0.0, kl_clip=kl_clip, step_size="fixed", fisher="empirical")
        model.compile(optimizer=optimizer, loss=_loss())
        before = [w.numpy().copy() for w in model.trainable_weights]
        model.train_on_batch(x, y)
        deltas.append(np.concatenate([(w.numpy() - b).ravel() for w, b in zip(model.trainable_weights, before)]))
        coefficients.append(optimizer.kl_clip_coefficient)
    assert coefficients[0] == 1.0
    ratio = np.dot(deltas[1], deltas[0]) / np.dot(deltas[0], deltas[0])
    assert coefficients[1] < 0.1
    assert ratio == pytest.approx(coefficients[1], rel=1e-3)
    # float32 weight differences: compare at the scale of the update
    np.testing.assert_allclose(deltas[1], coefficients[1] * deltas[0], atol=1e-3 * np.abs(deltas[1]).max())


def test_first_order_optimizer_gets_learning_rate_only(tmp_path):
    (x, y), _ = keras_hoopt.datasets.load_digits()
    model = _digits_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss())
    model.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0,
              callbacks=[CurvatureTensorBoard(str(tmp_path), spectra=False)])
    assert set(_events(str(tmp_path))) == {"optimizer/learning_rate"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(log_dir=""), "`log_dir`"),
    (dict(log_dir="x", update_freq="batch"), "`update_freq`"),
    (dict(log_dir="x", update_freq=0), "`update_freq`"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurvatureTensorBoard(**kwargs)


@pytest.mark.parametrize("tf_config,chief", [
    (None, True),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}', True),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}', False),
    ('{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}', False),
    ('{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', True),
])
def test_is_chief_follows_tf_config(monkeypatch, tf_config, chief):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert is_chief() is chief

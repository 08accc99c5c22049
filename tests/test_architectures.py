"""Standard architectures (tests/_architectures.py) are preconditioned, and train, in every mode.

For each of a MobileNet-style CNN, keras_hub BERT and GPT-2 (from configs), LSTM/GRU/Conv1D text
classifiers and a stock-layer transformer:

* at least 95% of the trainable parameters are preconditioned by a curvature block
  (``coverage_summary``), and the uncovered rest is listed;
* SPNGD trains it with finite, falling loss in graph mode, through a ``.keras`` round trip
  (training resumes from the file with the optimizer state), and under ``mixed_float16`` with
  ``jit_compile=True``;
* under ``MirroredStrategy`` on 2 logical CPUs the same steps give the single-device weights
  (a subprocess: tests/_architecture_mirrored_worker.py); with BatchNormalization, which
  normalises per replica, finite and falling loss.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import keras

import keras_hoopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _architectures  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = sorted(_architectures.ARCHITECTURES)
# mixed_float16 + XLA for each family of blocks once (the suite's time is mostly XLA compiles):
# convolutions, depthwise/separable and BatchNorm (mobilenet_style); EinsumDense attention,
# LayerNorm, position and tied reversible embeddings (gpt2_causal_lm); the recurrent blocks and
# Embedding (lstm_classifier; GRU and SimpleRNN share rnn.py).
MIXED_PRECISION_NAMES = ["gpt2_causal_lm", "lstm_classifier", "mobilenet_style"]


def _compile(name, jit_compile=False, **options):
    model, loss, data = _architectures.ARCHITECTURES[name]()
    optimizer = keras_hoopt.SPNGD(learning_rate=0.1, damping=1e-2, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    return model, optimizer, data, [str(w.message) for w in caught]


def _fit(model, data, epochs):
    x, y = data
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0).history["loss"]


def _assert_trains(losses):
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", NAMES + ["mobilenet_v2"])
def test_blocks_precondition_at_least_95_percent_of_the_parameters(name):
    if name == "mobilenet_v2":
        model, loss, data = _architectures.mobilenet_v2()
        optimizer = keras_hoopt.SPNGD()
        model.compile(optimizer=optimizer, loss=loss)
    else:
        model, optimizer, data, _ = _compile(name)
        model(data[0])
    summary = optimizer.coverage_summary()
    assert summary["parameters"] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert summary["share"] >= 0.95, (summary["share"], summary["uncovered"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trains_in_graph_mode_and_resumes_from_a_keras_file(name, tmp_path):
    model, optimizer, data, _ = _compile(name)
    before = _fit(model, data, epochs=2)
    _assert_trains(before)
    assert optimizer.skipped_steps == 0
    if name == "gpt2_causal_lm":  # the tied table: both of its uses recorded
        kinds = {row["layer"]: row["kind"] for row in optimizer.curvature_summary()}
        assert (kinds["token_embedding"], kinds["position_embedding"]) == ("reversible_embedding", "position_embedding")
        assert np.all(optimizer.statistic("token_embedding", "D_reverse") > 0)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    restored = keras_hoopt.load_model(path)
    assert type(restored.optimizer) is keras_hoopt.SPNGD
    x = data[0]
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    for a, b in zip(restored.optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    after = _fit(restored, data, epochs=1)
    assert np.all(np.isfinite(after)) and after[-1] < before[0], (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIXED_PRECISION_NAMES)
def test_trains_under_mixed_float16_with_jit_compile(name):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model, optimizer, data, _ = _compile(name, jit_compile=True)
    _assert_trains(_fit(model, data, epochs=2))
    assert optimizer.skipped_steps <= 2  # the loss scale may overflow in its first steps


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_equals_one_device():
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "_architecture_mirrored_worker.py"), *NAMES],
        capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report) == NAMES
    for name, row in report.items():
        assert row["finite"], (name, row)
        assert row["losses"][-1] < row["losses"][0], (name, row)
        if not row["per_replica_batchnorm"]:  # per-replica BN statistics change the trajectory by design
            assert row["max_weight_difference"] < 2e-4, (name, row)

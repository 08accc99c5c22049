"""The character-level text data, the two text workloads, Muon as a benchmark peer, and the two
text examples (run as a user runs them, on a tiny setting)."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_hoopt import datasets
from keras_hoopt.benchmarks import WORKLOADS
from keras_hoopt.benchmarks.optimizers import OPTIMIZERS
from keras_hoopt.benchmarks.runner import run_one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([-+0-9.eE]+|nan|inf)"
T = 64


@pytest.fixture(scope="module")
def text_ids():
    return datasets.encode_text(datasets.pydoc_text())


def test_vocabulary_is_fixed_and_covers_the_text(text_ids):
    vocabulary = datasets.PYDOC_VOCABULARY
    assert len(vocabulary) == 97 and len(set(vocabulary)) == 97
    assert vocabulary[:3] == "\x00\n " and vocabulary[-1] == "~" and vocabulary[2:] == "".join(map(chr, range(32, 127)))
    assert datasets.decode_text(datasets.encode_text("def f(x):\n\treturn x")) == "def f(x):\n\treturn x".replace(
        "\t", "\x00")  # a character outside the vocabulary is id 0
    text = datasets.pydoc_text()
    assert len(text) > 400_000 and "The \"if\" statement" in text
    assert text_ids.dtype == np.int32 and len(text_ids) == len(text)
    assert np.mean(text_ids == 0) < 1e-4  # typographic quotes and dashes are written in ASCII, tabs as spaces
    known = text_ids != 0
    assert datasets.decode_text(text_ids[known]) == "".join(c for c, k in zip(text, known) if k)


def test_windows_are_next_character_pairs_from_disjoint_parts_of_the_text(text_ids):
    (x, y), (x_test, y_test) = datasets.load_pydoc_text(sequence_length=T)
    split = int(round(0.9 * len(text_ids)))
    assert x.shape == y.shape == (math.ceil((split - T) / T), T) and x.dtype == y.dtype == np.int32
    assert x_test.shape == y_test.shape == (math.ceil((len(text_ids) - split - T) / T), T)
    # adjacent windows of the first 90% of the text; the targets are the inputs shifted by one character
    np.testing.assert_array_equal(x.reshape(-1), text_ids[: x.size])
    np.testing.assert_array_equal(y.reshape(-1), text_ids[1: x.size + 1])
    assert x.size + 1 <= split  # no training target reaches the held-out text
    np.testing.assert_array_equal(x_test.reshape(-1), text_ids[split: split + x_test.size])
    np.testing.assert_array_equal(y_test.reshape(-1), text_ids[split + 1: split + x_test.size + 1])
    # a stride samples windows spread over the same training text; the test windows do not change
    (x2, y2), (x2_test, _) = datasets.load_pydoc_text(sequence_length=T, stride=2 * T)
    np.testing.assert_array_equal(x2, x[::2])
    np.testing.assert_array_equal(y2, y[::2])
    np.testing.assert_array_equal(x2_test, x_test)
    # deterministic
    (x3, y3), (x3_test, y3_test) = datasets.load_pydoc_text(sequence_length=T)
    for a, b in ((x, x3), (y, y3), (x_test, x3_test), (y_test, y3_test)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{"sequence_length": 0}, {"sequence_length": 64.0}, {"test_fraction": 1.0},
                                    {"stride": 0}, {"sequence_length": 10**6}])
def test_bad_text_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="sequence_length|test_fraction|stride"):
        datasets.load_pydoc_text(**kwargs)


def test_text_workloads_use_the_pydoc_windows_and_report_the_held_out_loss():
    (x, y), (x_test, y_test) = WORKLOADS["text_transformer"].load_xy()
    assert x.shape == (len(x), T) and 3000 < len(x) < 3600 and 600 < len(x_test) < 800  # stride 128
    for name in ("text_transformer", "text_lstm"):
        workload = WORKLOADS[name]
        assert workload.test_metric == "loss" and not workload.higher_test_is_better
        assert workload.target_test < workload.target_loss + 0.1 < math.log(97)
    lstm = WORKLOADS["text_lstm"].build()
    assert [type(layer).__name__ for layer in lstm.layers] == ["Embedding", "LSTM", "Dense"]
    assert lstm.layers[1].return_sequences and lstm.output_shape == (None, T, 97)


def test_text_transformer_is_causal():
    """Changing the characters after position t changes no logit at positions <= t."""
    model = WORKLOADS["text_transformer"].build()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("MultiHeadAttention") == 2 and kinds.count("LayerNormalization") == 5
    assert kinds.count("Embedding") == 2 and model.output_shape == (None, T, 97)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (2, T)).astype("int32")
    changed = tokens.copy()
    changed[:, 40:] = rng.integers(0, 97, (2, T - 40))
    before, after = model.predict(tokens, verbose=0), model.predict(changed, verbose=0)
    np.testing.assert_allclose(before[:, :40], after[:, :40], rtol=1e-5, atol=1e-5)
    assert np.abs(before[:, 40:] - after[:, 40:]).max() > 1e-3


@pytest.mark.slow
# SPNGD on the transformer: test_small_transformer_example.
@pytest.mark.parametrize("name,optimizer", [("text_transformer", "adam"), ("text_lstm", "adam"), ("text_lstm", "spngd"),
                                            ("text_lstm", "muon")])
def test_text_workload_trains_one_short_epoch(name, optimizer):
    """The benchmark runner on 96 training / 64 test windows: 3 steps, a finite training and held-out loss."""
    workload = WORKLOADS[name]
    (x, y), (x_test, y_test) = workload.load_xy()
    factory, _, quick_grid = OPTIMIZERS[optimizer]
    data = ((x[:96], y[:96]), (x_test[:64], y_test[:64]))
    result = run_one(workload, optimizer, factory, quick_grid[0], 1, data=data)
    assert result.steps_per_epoch == 3 and len(result.epoch_loss) == len(result.epoch_test) == 1
    assert np.isfinite(result.final_loss) and result.final_loss < 1.1 * math.log(97), result.epoch_loss
    assert np.isfinite(result.best_test) and result.best_test < 1.1 * math.log(97), result.epoch_test
    if optimizer == "spngd":
        assert result.statistic_fraction > 0 and result.inversion_fraction > 0


def test_muon_keeps_embeddings_biases_and_the_output_layer_on_adamw():
    model = WORKLOADS["text_transformer"].build()
    optimizer = OPTIMIZERS["muon"][0](1e-2)
    optimizer.build(model.trainable_variables)
    on_muon = sorted(v.path for v in model.trainable_variables if not optimizer._should_use_adamw(v))
    assert on_muon == [f"block{b}_mlp_{io}/kernel" for b in (0, 1) for io in ("in", "out")], on_muon
    assert optimizer._should_use_adamw(model.get_layer("logits").kernel)
    assert optimizer._should_use_adamw(model.get_layer("token_embedding").embeddings)
    bias = model.get_layer("block0_attention").query_dense.bias
    assert len(bias.shape) == 2 and optimizer._should_use_adamw(bias)  # [heads, head_dim]: still a bias


# ---- the examples, as a user runs them ------------------------------------------------------------------


def _run_example(script, *args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"examples/{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def _numbers(pattern, stdout):
    """The one line matching ``pattern``: its groups as floats."""
    found = re.findall(pattern, stdout)
    assert len(found) == 1, f"{len(found)} lines match {pattern!r}:\n{stdout[-3000:]}"
    return tuple(float(v) for v in (found[0] if isinstance(found[0], tuple) else (found[0],)))


def _curvature_kinds(stdout):
    match = re.search(r"(\d+) curvature blocks: (.*)", stdout)
    assert match, stdout
    kinds = dict((kind, int(n)) for kind, n in re.findall(r"(\w+) x(\d+)", match.group(2)))
    assert sum(kinds.values()) == int(match.group(1)), stdout
    return kinds


@pytest.mark.slow
def test_small_transformer_example(tmp_path):
    """examples/small_transformer.py: SPNGD, 3 steps; the held-out loss is below uniform guessing."""
    stdout = _run_example("small_transformer.py", "--epochs", "1", "--steps", "3", tmp_path=tmp_path)
    assert "3270 training windows, 726 test windows of 64 characters, vocabulary 97" in stdout, stdout
    assert "spngd: learning rate 0.3, batch 32, 3 steps/epoch, 116,705 parameters" in stdout, stdout
    (train,) = _numbers(rf"epoch 1/1: train loss {NUMBER}", stdout)
    test, bits, unigram = _numbers(
        rf"held-out loss {NUMBER} nats/char \({NUMBER} bits/char\); character frequencies: {NUMBER}", stdout)
    assert all(map(math.isfinite, (train, test, bits, unigram))) and test < math.log(97), stdout
    assert bits == pytest.approx(test / math.log(2), abs=1e-3) and 3.0 < unigram < 3.5
    kinds = _curvature_kinds(stdout)
    assert kinds.get("dense", 0) >= 5, kinds  # the 4 MLP layers and the logits, at least
    assert len(re.findall(r"refreshes [1-9]\d* inversions [1-9]", stdout)) == sum(kinds.values()), stdout


@pytest.mark.slow
def test_keras_hub_backbone_example(tmp_path):
    """examples/keras_hub_backbone.py: GPT2CausalLM from a config, SPNGD, 3 steps, no download."""
    stdout = _run_example("keras_hub_backbone.py", "--epochs", "1", "--steps", "3", tmp_path=tmp_path)
    assert "GPT2CausalLM(GPT2Backbone: 2 layers, 2 heads, hidden 64, intermediate 128), vocabulary 97" in stdout
    first, uniform, test = _numbers(
        rf"first batch loss {NUMBER} \(uniform over the vocabulary: {NUMBER}\), held-out loss {NUMBER}", stdout)
    assert uniform == pytest.approx(math.log(97), abs=1e-4)
    assert abs(first - uniform) < 0.2, stdout  # GPT-2's small initialisation: nearly uniform logits
    assert math.isfinite(test) and test < first, stdout
    kinds = _curvature_kinds(stdout)
    assert kinds.get("dense", 0) >= 4, kinds  # each decoder layer's two feedforward Dense layers, at least

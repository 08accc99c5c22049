"""Train a small ResNet on CIFAR-10 with SP-NGD (or K-FAC, THOR, SGD, Adam).

    python examples/cifar10_resnet.py                                   # SP-NGD, ResNet-8, keras.datasets download
    python examples/cifar10_resnet.py --data ~/data/cifar-10-batches-py # a local copy (no download)
    python examples/cifar10_resnet.py --data cifar10.npz --depth 20     # .npz with x_train, y_train, x_test, y_test
    python examples/cifar10_resnet.py --optimizer kfac                  # also: thor, sgd, adam
    python examples/cifar10_resnet.py --epochs 1 --steps 5 --subset 512 # smoke run

The network is a CIFAR ResNet (He et al. 2016) of depth 6n+2: a conv-BN-relu stem with 16
channels, three stages of n residual blocks (Conv2D-BN-relu-Conv2D-BN plus the shortcut, a
strided 1x1 Conv2D-BN where the shape changes) with 16, 32 and 64 channels, global average
pooling and Dense(10). Every Conv2D, BatchNormalization and Dense layer gets a curvature block.
The learning rate decays polynomially to 0 over the run, like SP-NGD's recipe.

Data, in this order: ``--data PATH`` (the ``cifar-10-batches-py`` folder of the official
python version, the folder holding it, its ``cifar-10-python.tar.gz``, or an ``.npz`` with
``x_train, y_train, x_test, y_test``), else ``keras.datasets.cifar10.load_data()``, which
downloads about 170 MB once (skipped with ``--offline``). Without either, the script exits with
code 2 and says how to get the data.
"""

import argparse
import math
import os
import pickle
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
HOW_TO_GET = """\
How to get CIFAR-10 (then pass it with --data PATH):
  * download the python version, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (163 MB),
    and pass the .tar.gz itself or the cifar-10-batches-py folder it unpacks to;
  * or write an .npz (x_train, y_train, x_test, y_test) on a machine with internet access:
      python -c "import keras, numpy as np; (a, b), (c, d) = keras.datasets.cifar10.load_data(); np.savez('cifar10.npz', x_train=a, y_train=b, x_test=c, y_test=d)"
  * or run without --data (and without --offline) where keras.datasets can download it."""


class DataError(Exception):
    """The data could not be found or read; the message says why."""


def _images_from_rows(rows):
    """The python version stores each image as 3072 bytes: 1024 red, 1024 green, 1024 blue, row-major."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"expected image rows of 3072 values, got an array of shape {rows.shape}")
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _unpickle(handle, name):
    try:
        batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # pickle raises many types on a damaged file
        raise DataError(f"{name} is not a CIFAR-10 python batch: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name} is not a CIFAR-10 python batch: no b'data' and b'labels' entries")
    return _images_from_rows(batch[b"data"]), np.asarray(batch[b"labels"])


def _join(batches):
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _load_batches_folder(folder):
    if not os.path.exists(os.path.join(folder, TEST_BATCH)) and os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    missing = [n for n in TRAIN_BATCHES + (TEST_BATCH,) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(f"{folder} is not a cifar-10-batches-py folder: missing {', '.join(missing)}")
    batches = {}
    for name in TRAIN_BATCHES + (TEST_BATCH,):
        with open(os.path.join(folder, name), "rb") as handle:
            batches[name] = _unpickle(handle, os.path.join(folder, name))
    return _join([batches[n] for n in TRAIN_BATCHES]), batches[TEST_BATCH]


def _load_tarball(path):
    batches = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive.getmembers():
                name = os.path.basename(member.name)
                if member.isfile() and name in TRAIN_BATCHES + (TEST_BATCH,):
                    batches[name] = _unpickle(archive.extractfile(member), f"{path}:{member.name}")
    except tarfile.TarError as error:
        raise DataError(f"{path} is not a readable tar archive: {error}") from error
    missing = [n for n in TRAIN_BATCHES + (TEST_BATCH,) if n not in batches]
    if missing:
        raise DataError(f"{path} holds no CIFAR-10 python batches {', '.join(missing)}")
    return _join([batches[n] for n in TRAIN_BATCHES]), batches[TEST_BATCH]


def _load_npz(path):
    try:
        with np.load(path) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise DataError(f"{path} has no arrays {', '.join(missing)} (it has {', '.join(archive.files)})")
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable .npz file: {error}") from error
    for part in ("train", "test"):
        x = arrays[f"x_{part}"]
        if x.ndim == 2:
            x = _images_from_rows(x)
        elif x.ndim == 4 and x.shape[1:] == (3, 32, 32):
            x = x.transpose(0, 2, 3, 1)
        if x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: x_{part} has shape {arrays[f'x_{part}'].shape}; expected [N, 32, 32, 3]")
        arrays[f"x_{part}"] = x
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_local(path):
    """``(x_train, y_train), (x_test, y_test)`` from a local copy: uint8-valued images, int labels."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return _load_batches_folder(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    if path.endswith(".npz"):
        return _load_npz(path)
    if tarfile.is_tarfile(path):
        return _load_tarball(path)
    raise DataError(f"{path} is neither a cifar-10-batches-py folder, a .tar.gz of it, nor an .npz file")


def load_data(path, offline):
    if path is not None:
        return load_local(path), path
    if offline:
        raise DataError("no --data given and --offline forbids the download")
    import keras

    try:
        return keras.datasets.cifar10.load_data(), "keras.datasets.cifar10"
    except Exception as error:  # no network, proxy, damaged cache, ...
        raise DataError(f"keras.datasets.cifar10.load_data() failed: {type(error).__name__}: {error}") from error


def preprocess(train, test, subset, seed):
    (x, y), (x_test, y_test) = train, test
    y, y_test = np.asarray(y).reshape(-1).astype("int32"), np.asarray(y_test).reshape(-1).astype("int32")
    for name, labels in (("y_train", y), ("y_test", y_test)):
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise DataError(f"{name} holds labels outside 0..9")
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise DataError(f"{len(x)} training images but {len(y)} labels, or {len(x_test)} test images "
                        f"but {len(y_test)} labels")
    if subset:
        rng = np.random.default_rng(seed)
        x, y = _take(x, y, subset, rng)
        x_test, y_test = _take(x_test, y_test, subset, rng)
    scale = 1.0 if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0 else 255.0  # [0,1] or [0,255]
    x, x_test = x.astype("float32") / scale, x_test.astype("float32") / scale
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-6  # per channel, training set only
    return ((x - mean) / std, y), ((x_test - mean) / std, y_test)


def _take(x, y, n, rng):
    index = rng.permutation(len(x))[:n]
    return x[index], y[index]


def build_model(depth, width=16):
    import keras

    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"Invalid value for `depth`: {depth}. Accepted: 6n+2 with n >= 1 (8, 14, 20, 32, ...).")
    blocks_per_stage = (depth - 2) // 6

    def conv_bn(x, filters, kernel, strides=1, relu=True):
        x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                                kernel_initializer="he_normal")(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        return keras.layers.Activation("relu")(x) if relu else x

    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, width, 3)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = conv_bn(x, filters, 1, strides, relu=False)
            x = conv_bn(x, filters, 3, strides)
            x = conv_bn(x, filters, 3, relu=False)
            x = keras.layers.Activation("relu")(keras.layers.Add()([x, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES))(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


DEFAULTS = {  # (learning rate, damping)
    "spngd": (0.3, 1e-2),
    "kfac": (0.3, 1e-2),
    "thor": (0.3, 3e-2),
    "sgd": (0.1, None),
    "adam": (1e-3, None),
}


def make_optimizer(name, learning_rate, damping, steps_per_epoch, epochs):
    import keras

    import keras_hoopt

    schedule = keras_hoopt.schedules.PolynomialEpochDecay(learning_rate, steps_per_epoch, end_epoch=epochs,
                                                           power=2.0, end_value=learning_rate * 1e-2)
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    common = dict(learning_rate=schedule, damping=damping, kl_clip=1e-3, momentum=0.9, step_size="fixed")
    if name == "spngd":
        return keras_hoopt.SPNGD(**common)
    if name == "kfac":
        return keras_hoopt.KFAC(**common)
    # THOR's default frequency (100) is for 5,000-step ImageNet epochs.
    return keras_hoopt.THOR(frequency=max(1, min(20, steps_per_epoch)), **common)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(DEFAULTS), default="spngd")
    parser.add_argument("--data", default=None, help="a local copy of CIFAR-10 (see above); default: keras.datasets")
    parser.add_argument("--offline", action="store_true", help="never download (needs --data)")
    parser.add_argument("--depth", type=int, default=8, help="6n+2: 8, 14, 20, 32, ... (default 8)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=None,
                        help="use only N random training images (and at most N test images)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="initial value; default: " + ", ".join(f"{k} {v[0]:g}" for k, v in sorted(DEFAULTS.items())))
    parser.add_argument("--damping", type=float, default=None,
                        help="curvature optimizers only; default: "
                        + ", ".join(f"{k} {v[1]:g}" for k, v in sorted(DEFAULTS.items()) if v[1]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save the trained model to this .keras file")
    args = parser.parse_args(argv)
    if args.depth < 8 or (args.depth - 2) % 6:
        parser.error(f"--depth {args.depth}: a CIFAR ResNet has depth 6n+2 with n >= 1 (8, 14, 20, 32, ...)")

    # Data first, without TensorFlow: a missing copy is reported in a second, not after the import.
    try:
        (train, test), source = load_data(args.data, args.offline)
        (x, y), (x_test, y_test) = preprocess(train, test, args.subset, args.seed)
    except DataError as error:
        print(f"error: could not load CIFAR-10: {error}\n\n{HOW_TO_GET}", file=sys.stderr)
        return 2
    if len(x) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(x)} training images")
    print(f"CIFAR-10 from {source}: {len(x)} training images, {len(x_test)} test images, "
          f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]}", flush=True)

    import keras

    keras.utils.set_random_seed(args.seed)
    default_lr, default_damping = DEFAULTS[args.optimizer]
    learning_rate = default_lr if args.learning_rate is None else args.learning_rate
    damping = default_damping if args.damping is None else args.damping
    steps_per_epoch = args.steps or math.ceil(len(x) / args.batch_size)
    model = build_model(args.depth)
    optimizer = make_optimizer(args.optimizer, learning_rate, damping, steps_per_epoch, args.epochs)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    print(f"{model.name}: {model.count_params():,} parameters; {args.optimizer}, learning rate {learning_rate:g}"
          + (f", damping {damping:g}" if damping is not None else "")
          + f", batch {args.batch_size}, {steps_per_epoch} steps/epoch", flush=True)

    start = time.time()
    log = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(
        f"epoch {epoch + 1}/{args.epochs}: train loss {logs['loss']:.4f}, train accuracy {logs['accuracy']:.3f} "
        f"({time.time() - start:.0f} s)", flush=True))
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps,
              callbacks=[log], verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.3f}")
    if hasattr(optimizer, "curvature_summary"):
        rows = optimizer.curvature_summary()
        stats = [s for row in rows for s in row["statistics"].values()]
        steps = int(optimizer.iterations.numpy())
        print(f"{len(rows)} curvature blocks, {len(stats)} statistics over {steps} steps: "
              f"{sum(s['refreshes'] for s in stats)} refreshes, {sum(s['inversions'] for s in stats)} inversions "
              f"(every statistic every step would be {len(stats) * steps}), "
              f"{sum(s['failed_inversions'] for s in stats)} failed")
    if args.checkpoint:
        model.save(args.checkpoint)
        print(f"saved {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Saving and loading models with a keras_hoopt optimizer.

:func:`save_model` writes a checkpoint so that a crash cannot destroy the
previous one; :func:`load_model` reads it back with the curvature state.
"""

import contextlib
import io
import json
import os
import secrets
import zipfile

import keras

# The file name endings save_model writes, and the model method that writes each.
_WRITERS = {".weights.h5": "save_weights", ".keras": "save"}


def checkpoint_suffix(filepath):
    """``".keras"`` or ``".weights.h5"``: the ending of ``filepath``; a ValueError naming ``filepath`` otherwise."""
    path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path or "://" in path:
        raise ValueError(f"Invalid value for `filepath`: {filepath!r}. Accepted: a local file path (str or os.PathLike).")
    for suffix in _WRITERS:
        if path.endswith(suffix):
            return suffix
    raise ValueError(
        f"Invalid value for `filepath`: {path!r}. Accepted: a path ending in `.keras` (the whole model with "
        "the optimizer's curvature state, `model.save`) or `.weights.h5` (`model.save_weights`)."
    )


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_model(model, filepath, overwrite=True, **kwargs):
    """Save ``model`` to ``filepath`` atomically: a crash mid-save leaves the previous file intact.

    ``model.save("m.keras")`` opens ``m.keras`` for writing first, so a crash,
    a kill or a full disk while it writes leaves a truncated file, and the last
    good checkpoint is gone (loading it then fails with "File not found").
    This function writes to a hidden temporary file in the same folder
    (``.m.keras.tmp-<pid>-<random>.keras``), flushes it to disk (``fsync``),
    renames it over ``filepath`` in one step (``os.replace``, atomic on POSIX
    file systems) and flushes the folder. At any moment ``filepath`` holds the
    old checkpoint or the complete new one::

        keras_hoopt.save_model(model, "run.keras")
        model = keras_hoopt.load_model("run.keras")

    If the save raises, the temporary file is removed and the error re-raised.
    A process killed mid-save cannot clean up: its hidden temporary file stays
    next to the target and can be deleted. Every process that calls this
    writes; in a distributed run call it on the chief only, or use
    :class:`keras_hoopt.callbacks.AtomicModelCheckpoint`.

    Args:
        model: the Keras model.
        filepath: str or ``os.PathLike``, a local file ending in ``.keras``
            (``model.save``: architecture, weights, optimizer state) or
            ``.weights.h5`` (``model.save_weights``: weights, and the
            optimizer's state when the model is compiled).
        overwrite: if False and ``filepath`` exists, raise ``FileExistsError``.
        **kwargs: passed to ``model.save`` / ``model.save_weights``
            (except ``zipped=False`` and ``max_shard_size``, which write
            several files and cannot be replaced in one step).
    """
    suffix = checkpoint_suffix(filepath)
    path = os.path.abspath(os.fspath(filepath))
    if kwargs.get("zipped", True) is False or kwargs.get("max_shard_size") is not None:
        raise ValueError(
            "keras_hoopt.save_model writes one file and renames it over `filepath`; `zipped=False` and "
            f"`max_shard_size` write several files. Received: {kwargs}."
        )
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The folder of `filepath` does not exist: {folder!r} (filepath={filepath!r}).")
    if os.path.isdir(path):
        raise ValueError(f"Invalid value for `filepath`: {filepath!r} is a folder. Accepted: a file path.")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"`filepath` {filepath!r} exists and `overwrite=False`.")
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        getattr(model, _WRITERS[suffix])(temporary, overwrite=True, **kwargs)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync(folder)  # make the rename itself durable


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """``keras.models.load_model`` with keras_hoopt's optimizers registered.

    The optimizer's curvature state (statistics, inverses, counters, momenta)
    is restored with the model, so ``fit`` continues on the same trajectory.
    Plain ``keras.models.load_model`` works the same once ``keras_hoopt`` is
    imported, except for one case this function also handles: a model whose
    class overrides ``compile`` without ``compile_from_config`` (keras_hub's
    tasks, e.g. ``GPT2CausalLM``) comes back from Keras uncompiled or with its
    own default optimizer; the saved keras_hoopt optimizer is then rebuilt from
    the file's compile config, the model compiled with it, and its state loaded.
    """
    model = keras.models.load_model(filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    if compile and os.fspath(filepath).endswith(".keras"):
        _restore_custom_compiled_optimizer(model, filepath, custom_objects)
    return model


def _restore_custom_compiled_optimizer(model, filepath, custom_objects):
    from keras.src.saving import saving_lib, serialization_lib

    from keras_hoopt.optimizers import OPTIMIZER_NAMES

    with zipfile.ZipFile(filepath, "r") as archive:
        config = json.loads(archive.read(saving_lib._CONFIG_FILENAME))
        optimizer_config = (config.get("compile_config") or {}).get("optimizer")
        if not isinstance(optimizer_config, dict):
            return
        ours = {cls.__name__ for cls in OPTIMIZER_NAMES.values()}
        if optimizer_config.get("class_name") not in ours:
            return
        if type(getattr(model, "optimizer", None)).__name__ == optimizer_config["class_name"]:
            return  # Keras restored it (the usual case)
        with keras.saving.custom_object_scope(custom_objects or {}):
            compile_config = serialization_lib.deserialize_keras_object(config["compile_config"])
        model.compile(**compile_config)
        model.optimizer.build(model.trainable_variables)
        names = archive.namelist()
        if saving_lib._VARS_FNAME_H5 not in names:
            return
        store = saving_lib.H5IOStore(io.BytesIO(archive.read(saving_lib._VARS_FNAME_H5)), mode="r")
        try:
            model.optimizer.load_own_variables(store.get("optimizer"))
        finally:
            store.close()

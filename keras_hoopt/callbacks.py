"""Keras 3 callbacks: curvature monitoring in TensorBoard and what a Horovod launch needs.

* :class:`CurvatureTensorBoard`: damping, learning rate, KL-clip coefficient,
  per-layer refresh intervals and counts, factor traces and condition numbers,
  written as TensorBoard scalars.
* :class:`BroadcastGlobalVariables` and :class:`AverageMetrics`: ``horovod.tensorflow.keras``
  (its ``DistributedOptimizer`` and callbacks) does not work with Keras 3
  (docs/distributed.md); the curvature optimizers reduce gradients and
  statistics themselves, and these callbacks provide the rest: the initial
  broadcast and metrics averaged over workers (rank-aware logging).
* :class:`AtomicModelCheckpoint`: ``keras.callbacks.ModelCheckpoint`` writing
  through :func:`keras_hoopt.save_model`, so a crash mid-save keeps the last
  good checkpoint; only the chief writes.
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from keras_hoopt.communication.horovod import horovod_rank_and_size, import_horovod
from keras_hoopt.saving import checkpoint_suffix, save_model


class BroadcastGlobalVariables(keras.callbacks.Callback):
    """Copy every model and optimizer variable from worker ``root_rank`` to all workers.

    Runs once per model, when training begins (after Keras has built the model and the
    optimizer), so every Horovod process starts from the same weights
    and curvature state even if each initialised or loaded its own::

        model.fit(dataset, callbacks=[keras_hoopt.callbacks.BroadcastGlobalVariables(0)])

    Under ``tf.distribute`` strategies variables are already mirrored; this
    callback is for Horovod launches and needs Horovod.

    Args:
        root_rank: the worker whose values everyone takes (an int >= 0).
    """

    def __init__(self, root_rank=0):
        super().__init__()
        if not isinstance(root_rank, int) or isinstance(root_rank, bool) or root_rank < 0:
            raise ValueError(f"Invalid value for `root_rank`: {root_rank!r}. Accepted: an int >= 0.")
        self.root_rank = root_rank
        self._broadcast_to = None  # the model last synchronised (once per model)

    @property
    def broadcast_done(self):
        return self._broadcast_to is not None and self._broadcast_to is self.model

    def on_train_begin(self, logs=None):
        if self.broadcast_done:
            return
        hvd = import_horovod()
        if self.root_rank >= hvd.size():
            raise ValueError(
                f"Invalid value for `root_rank`: {self.root_rank}. Accepted: a rank below the "
                f"number of Horovod processes ({hvd.size()})."
            )
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "built", False):
            variables += list(optimizer.variables)
        seen, unique = set(), []
        for variable in variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                unique.append(variable)
        if hvd.size() > 1 and unique:
            hvd.broadcast_variables([getattr(v, "value", v) for v in unique], root_rank=self.root_rank)
        self._broadcast_to = self.model


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    return metadata.SerializeToString()


_SCALAR_METADATA = _scalar_metadata()


def is_chief():
    """True on the worker that should log and write files: Horovod rank 0, or the
    ``chief``/worker 0 task of a ``TF_CONFIG`` cluster, or the only process."""
    rank, _ = horovod_rank_and_size()
    if rank != 0:
        return False
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task") or {}
    cluster = config.get("cluster") or {}
    if not task:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


class AverageMetrics(keras.callbacks.Callback):
    """Average the epoch's logged metrics over Horovod processes (rank-aware logging).

    Each process computes ``loss`` and metrics on its own share of the data;
    put this callback first in ``callbacks=[...]`` and every later callback
    (the progress bar of rank 0, ``CSVLogger``, ``ModelCheckpoint``, early
    stopping) sees the mean over processes, the same on every rank::

        model.fit(..., callbacks=[keras_hoopt.callbacks.BroadcastGlobalVariables(0),
                                  keras_hoopt.callbacks.AverageMetrics()],
                  verbose=2 if hvd.rank() == 0 else 0)

    Under ``tf.distribute`` strategies Keras already reports global metrics.
    Without Horovod (or with one process) it does nothing.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        _, size = horovod_rank_and_size()
        if size <= 1:
            return
        hvd = import_horovod()
        names = sorted(k for k, v in logs.items() if np.ndim(v) == 0 and np.isreal(v))
        values = tf.constant([float(logs[k]) for k in names], tf.float64)
        averaged = hvd.allreduce(values, op=hvd.Average, name=f"keras_hoopt_metrics_{epoch}").numpy()
        for name, value in zip(names, averaged):
            logs[name] = float(value)


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint`` whose files survive a crash mid-save.

    Same arguments and behaviour as Keras's callback (``filepath`` formatted
    with ``{epoch}``, ``{batch}`` and the logged metrics, ``monitor``,
    ``save_best_only``, ``mode``, ``save_freq``, ``save_weights_only``,
    ``initial_value_threshold``, ``verbose``), but each file is written by
    :func:`keras_hoopt.save_model`: to a temporary file in the same folder,
    then renamed over the target. A crash, a kill or a full disk during a save
    leaves the previous checkpoint at ``filepath`` intact::

        model.fit(x, y, validation_data=(xv, yv), epochs=10, callbacks=[
            keras_hoopt.callbacks.AtomicModelCheckpoint("best.keras", save_best_only=True)])
        model = keras_hoopt.load_model("best.keras")

    In a distributed run only the chief writes (Horovod rank 0, the
    ``TF_CONFIG`` chief or worker 0); with Horovod put
    :class:`AverageMetrics` before it, so ``save_best_only`` compares the
    metrics of all workers.

    Args:
        filepath: str or ``os.PathLike`` ending in ``.keras`` (the whole model
            with the optimizer's curvature state), or in ``.weights.h5`` with
            ``save_weights_only=True``.
        monitor: the logged metric ``save_best_only`` compares.
        verbose: 0 (silent) or 1 (a message for each save decision).
        save_best_only: save only when ``monitor`` improves on the best so far.
        save_weights_only: ``model.save_weights`` instead of ``model.save``.
        mode: ``"auto"``, ``"min"`` or ``"max"``: whether a smaller or larger
            ``monitor`` is better (``"auto"``: from the metric's name).
        save_freq: ``"epoch"`` or a positive int (every that many batches).
        initial_value_threshold: the best value to beat at the start
            (``save_best_only=True``); None: the first value is saved.
    """

    def __init__(
        self,
        filepath,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        save_weights_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
    ):
        expected = ".weights.h5" if save_weights_only else ".keras"
        if checkpoint_suffix(filepath) != expected:
            raise ValueError(
                f"Invalid value for `filepath`: {filepath!r}. Accepted with save_weights_only={save_weights_only!r}: "
                f"a path ending in `{expected}`."
            )
        if not (save_freq == "epoch" or (isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq > 0)):
            raise ValueError(f"Invalid value for `save_freq`: {save_freq!r}. Accepted: 'epoch' or an int > 0.")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Invalid value for `mode`: {mode!r}. Accepted: 'auto', 'min' or 'max'.")
        super().__init__(
            filepath,
            monitor=monitor,
            verbose=verbose,
            save_best_only=save_best_only,
            save_weights_only=save_weights_only,
            mode=mode,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )

    def _save_model(self, epoch, batch, logs):
        """Keras 3's ``ModelCheckpoint._save_model`` (path formatting and the best-so-far decision are
        Keras's own) with the write replaced by :func:`keras_hoopt.save_model`, on the chief only."""
        if not is_chief():
            return
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        folder = os.path.dirname(filepath)
        if folder:
            os.makedirs(folder, exist_ok=True)
        save_model(self.model, filepath, overwrite=True)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")


def _condition(eigenvalues):
    """Worst ``max / min`` eigenvalue ratio over the rows of ``[units, n]`` ascending eigenvalues,
    capped at ``1 / eps(float32)`` (about 8.4e6: singular in the precision the optimizer uses)."""
    cap = 1.0 / np.finfo(np.float32).eps
    top = eigenvalues[:, -1]
    ratio = top / np.maximum(eigenvalues[:, 0], top / cap)
    return float(np.minimum(np.max(ratio), cap)) if np.all(top > 0) else cap


class CurvatureTensorBoard(keras.callbacks.Callback):
    """Write curvature diagnostics of a keras_hoopt optimizer to TensorBoard.

    Scalars written every ``update_freq`` (``"epoch"`` or every N train
    batches), step = the optimizer's iteration:

    * ``optimizer/learning_rate``, ``optimizer/damping`` (schedules evaluated),
      ``optimizer/kl_clip_coefficient`` (the scale
      ``nu = min(1, sqrt(c / (lr^2 sum_l <p_l, g_l>)))`` of the last step; 1: not clipped)
      and ``optimizer/skipped_steps`` (steps skipped for NaN/Inf); with
      ``step_size="quadratic_model"`` also ``optimizer/chosen_learning_rate``,
      ``optimizer/chosen_momentum`` (what the last step applied) and
      ``optimizer/reduction_ratio`` (the last Levenberg-Marquardt ``rho``);
    * per layer and statistic (``<layer>/<statistic>/...``): ``refreshes``,
      ``inversions``, ``steps_since_refresh``, ``nonfinite_skips``,
      ``failed_inversions``, the refresh policy's state (SP-NGD's adaptive
      ``interval``; THOR's ``trace`` and ``stopped``);
    * with ``spectra=True``, from the factor's eigenvalues: ``trace``,
      ``eigenvalue_max``, ``eigenvalue_min``, ``condition`` (max / min, of the
      undamped factor, capped at 1/eps(float32) ~ 8.4e6, i.e. singular) and ``damped_condition`` (condition of the inverse the
      optimizer applies, damping included). BatchNorm's unit-wise Fisher
      reports the sum of its units' traces and the worst unit's conditions.

    Spectra cost one symmetric eigendecomposition per factor per write
    (about 0.1 s for a 1000x1000 factor on a CPU core); set ``spectra=False``
    or a larger ``update_freq`` for big models. In a distributed run only the
    chief (Horovod rank 0, TF_CONFIG worker 0) writes. With
    ``model_parallel="gradients"`` a worker holds only its own layers'
    inverses, so ``damped_condition`` is reported for those.
    Works with any optimizer: for first-order ones only the learning rate is written.

    Args:
        log_dir: folder of the event files (``tensorboard --logdir log_dir``).
        update_freq: ``"epoch"`` or a positive int (every that many batches).
        spectra: compute traces and condition numbers of the factors.
    """

    def __init__(self, log_dir, update_freq="epoch", spectra=True):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise ValueError(f"Invalid value for `log_dir`: {log_dir!r}. Accepted: a folder path.")
        if not (update_freq == "epoch" or (isinstance(update_freq, int) and not isinstance(update_freq, bool)
                                           and update_freq > 0)):
            raise ValueError(f"Invalid value for `update_freq`: {update_freq!r}. Accepted: 'epoch' or an int > 0.")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.spectra = bool(spectra)
        self._writer = None
        self._batches = 0

    # -- Keras hooks ----------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self._writer is None and is_chief():
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self.write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self.write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    # -- what is written --------------------------------------------------------
    def scalars(self):
        """``{tag: float}`` of everything this callback writes now (the optimizer's current state)."""
        optimizer = self.model.optimizer
        out = {}
        # Keras 3 evaluates a learning-rate schedule at the current iteration here.
        out["optimizer/learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if not hasattr(optimizer, "curvature_summary") or not optimizer.built:
            return out
        out["optimizer/damping"] = optimizer.current_damping()
        out["optimizer/kl_clip_coefficient"] = optimizer.kl_clip_coefficient
        out["optimizer/skipped_steps"] = float(optimizer.skipped_steps)
        if getattr(optimizer, "step_size", "fixed") == "quadratic_model":
            step = optimizer.step_summary()
            out["optimizer/chosen_learning_rate"] = step["learning_rate"]
            out["optimizer/chosen_momentum"] = step["momentum"]
            out["optimizer/reduction_ratio"] = step["reduction_ratio"]
        for row in optimizer.curvature_summary():
            layer = row["layer"]
            for name, counts in row["statistics"].items():
                prefix = f"{layer}/{name}"
                for key in ("refreshes", "inversions", "steps_since_refresh", "nonfinite_skips", "failed_inversions"):
                    out[f"{prefix}/{key}"] = float(counts[key])
                if "intervals" in row:
                    out[f"{prefix}/interval"] = float(row["intervals"][name])
                if self.spectra:
                    out.update({f"{prefix}/{k}": v for k, v in self._spectrum(optimizer, layer, name).items()})
            if "trace" in row:  # THOR's trace rule
                out[f"{layer}/trace_rule/trace"] = float(row["trace"])
                out[f"{layer}/trace_rule/stopped"] = float(row["stopped"])
        return out

    @staticmethod
    def _spectrum(optimizer, layer, name):
        factor = optimizer.statistic(layer, name).astype(np.float64)
        factor = factor.reshape((-1,) + factor.shape[-2:])  # unit-wise (BatchNorm) or one matrix
        if not np.all(np.isfinite(factor)):
            return {}
        eig = np.linalg.eigvalsh(0.5 * (factor + np.swapaxes(factor, -1, -2)))
        out = {
            "trace": float(np.trace(factor, axis1=-2, axis2=-1).sum()),
            "eigenvalue_max": float(eig[:, -1].max()),
            "eigenvalue_min": float(eig[:, 0].min()),
            "condition": _condition(eig),
        }
        inverse = optimizer.inverse(layer, name)
        if inverse is None:
            return out
        inverse = inverse.astype(np.float64).reshape((-1,) + inverse.shape[-2:])
        if np.all(np.isfinite(inverse)) and not np.allclose(inverse, np.eye(inverse.shape[-1])):
            out["damped_condition"] = _condition(np.linalg.eigvalsh(0.5 * (inverse + np.swapaxes(inverse, -1, -2))))
        return out

    def write(self):
        """Write :meth:`scalars` now (the chief only)."""
        if self._writer is None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        with self._writer.as_default(step=step):
            for tag, value in self.scalars().items():
                if value is not None and np.isfinite(value):
                    # What tf.summary.scalar writes, without needing the tensorboard package.
                    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)
        self._writer.flush()

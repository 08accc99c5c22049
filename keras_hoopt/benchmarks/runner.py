"""Train a workload with one optimizer and record what the tables report."""

import dataclasses
import os
import threading
import time

import keras
import numpy as np

from keras_hoopt.benchmarks.optimizers import CURVATURE_OPTIMIZERS


@dataclasses.dataclass
class RunResult:
    workload: str
    optimizer: str
    learning_rate: float
    epoch_loss: list
    epoch_test: list  # the workload's test metric after each epoch (accuracy, or test loss)
    epoch_seconds: list  # wall-clock of each epoch (the first includes tracing/compilation)
    steps_per_epoch: int
    target_loss: float
    target_test: float
    higher_test_is_better: bool
    peak_memory_mb: float  # peak resident memory during the run, above the resident memory at its start
    optimizer_state_mb: float  # the optimizer's variables (momenta, factors, inverses, counters)
    statistic_fraction: float = None  # statistics computed / (statistics x steps); None: first-order
    inversion_fraction: float = None  # inverses recomputed / (statistics x steps)

    @property
    def seconds_per_step(self):
        """Median steady-state seconds per train step (first epoch excluded)."""
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return float(np.median(steady)) / self.steps_per_epoch

    @property
    def setup_seconds(self):
        """First epoch minus a steady one: tracing the train step (and, for the
        curvature optimizers, the burst of early refreshes)."""
        steady = self.epoch_seconds[1:]
        return float(self.epoch_seconds[0] - np.median(steady)) if steady else None

    def _first(self, values, reached):
        for epoch, value in enumerate(values, start=1):
            if reached(value):
                return epoch
        return None

    @property
    def epochs_to_loss(self):
        return self._first(self.epoch_loss, lambda v: v <= self.target_loss)

    @property
    def epochs_to_test(self):
        if self.higher_test_is_better:
            return self._first(self.epoch_test, lambda v: v >= self.target_test)
        return self._first(self.epoch_test, lambda v: v <= self.target_test)

    def seconds_to(self, epochs):
        return None if epochs is None else float(np.sum(self.epoch_seconds[:epochs]))

    @property
    def final_loss(self):
        return self.epoch_loss[-1]

    @property
    def best_test(self):
        values = [v for v in self.epoch_test if np.isfinite(v)]
        if not values:
            return float("nan")
        return max(values) if self.higher_test_is_better else min(values)

    def rank_key(self):
        """Smaller is better: seconds to the loss target, then final loss."""
        seconds = self.seconds_to(self.epochs_to_loss)
        return (0, seconds) if seconds is not None else (1, self.final_loss if np.isfinite(self.final_loss) else np.inf)


def _resident_mb():
    """Resident memory of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0.0


class _MemoryPeak:
    """Samples resident memory every 20 ms in a thread; ``peak_mb`` is the growth over the start."""

    def __init__(self, interval=0.02):
        self.interval, self.start_mb, self.peak_mb = interval, _resident_mb(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _resident_mb() - self.start_mb)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _resident_mb() - self.start_mb)


class _EpochTimer(keras.callbacks.Callback):
    """Times each epoch; after it (untimed) evaluates the test metric and reports progress."""

    def __init__(self, workload, x_test, y_test, progress=None, label=""):
        super().__init__()
        self.workload, self.x_test, self.y_test = workload, x_test, y_test
        self.progress, self.label = progress, label
        self.seconds, self.test = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        if self.workload.test_metric == "accuracy":
            probs = self.model.predict(self.x_test, batch_size=1024, verbose=0)
            value = float(np.mean(np.argmax(probs, -1) == self.y_test))
        else:
            value = float(self.model.evaluate(self.x_test, self.y_test, batch_size=1024, verbose=0))
        self.test.append(value)
        if self.progress is not None:
            self.progress(
                f"    {self.label} epoch {epoch + 1}: train loss {logs.get('loss', float('nan')):.4f}, "
                f"test {self.workload.test_metric} {value:.4f}, {self.seconds[-1]:.1f} s"
            )


def run_one(workload, optimizer_name, factory, learning_rate, epochs, seed=0, jit_compile="auto", data=None,
            progress=None):
    """Train ``workload`` once; returns a :class:`RunResult`.

    ``data``: ``workload.load_xy()`` when already loaded; ``progress``: a
    callable taking one line per epoch (None: silent).
    """
    (x, y), (x_test, y_test) = data if data is not None else workload.load_xy()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    with _MemoryPeak() as memory:
        model = workload.build()
        options = workload.curvature_options if optimizer_name in CURVATURE_OPTIMIZERS else {}
        model.compile(optimizer=factory(learning_rate, **options), loss=workload.loss, jit_compile=jit_compile)
        timer = _EpochTimer(workload, x_test, y_test, progress, f"{optimizer_name} lr={learning_rate:g}")
        history = model.fit(
            x, y, batch_size=workload.batch_size, epochs=epochs, verbose=0, shuffle=True, callbacks=[timer]
        )
    losses = [float(v) for v in history.history["loss"]]
    statistic_fraction = inversion_fraction = None
    optimizer = model.optimizer
    if hasattr(optimizer, "curvature_summary"):
        rows = optimizer.curvature_summary()
        slots = sum(len(r["statistics"]) for r in rows) * int(optimizer.iterations.numpy())
        statistic_fraction = sum(s["refreshes"] for r in rows for s in r["statistics"].values()) / slots
        inversion_fraction = sum(s["inversions"] for r in rows for s in r["statistics"].values()) / slots
    return RunResult(
        workload=workload.name,
        optimizer=optimizer_name,
        learning_rate=learning_rate,
        epoch_loss=losses,
        epoch_test=timer.test,
        epoch_seconds=timer.seconds,
        steps_per_epoch=int(np.ceil(len(x) / workload.batch_size)),
        target_loss=workload.target_loss,
        target_test=workload.target_test,
        higher_test_is_better=workload.higher_test_is_better,
        peak_memory_mb=memory.peak_mb,
        optimizer_state_mb=sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables) / 2**20,
        statistic_fraction=statistic_fraction,
        inversion_fraction=inversion_fraction,
    )


def run_grid(workload, optimizer_name, factory, grid, epochs, progress=print, epoch_progress=None, **kwargs):
    """Run every learning rate of ``grid``; returns ``(best, all results)``."""
    data = workload.load_xy()
    results = []
    for lr in grid:
        result = run_one(workload, optimizer_name, factory, lr, epochs, data=data, progress=epoch_progress, **kwargs)
        progress(
            f"  {workload.name:<10} {optimizer_name:<6} lr={lr:<8g} final loss {result.final_loss:.4f} "
            f"best test {workload.test_metric} {result.best_test:.4f} {result.seconds_per_step * 1e3:.1f} ms/step "
            f"peak +{result.peak_memory_mb:.0f} MB"
        )
        results.append(result)
    return min(results, key=RunResult.rank_key), results

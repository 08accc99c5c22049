"""Train a workload with one optimizer and record what the tables report."""

import dataclasses
import resource
import time

import keras
import numpy as np


@dataclasses.dataclass
class RunResult:
    workload: str
    optimizer: str
    learning_rate: float
    epoch_loss: list
    epoch_test_accuracy: list
    epoch_seconds: list  # wall-clock of each epoch (the first includes tracing/compilation)
    steps_per_epoch: int
    target_loss: float
    target_accuracy: float
    peak_rss_mb: float
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
    def epochs_to_accuracy(self):
        return self._first(self.epoch_test_accuracy, lambda v: v >= self.target_accuracy)

    def seconds_to(self, epochs):
        return None if epochs is None else float(np.sum(self.epoch_seconds[:epochs]))

    @property
    def final_loss(self):
        return self.epoch_loss[-1]

    @property
    def best_test_accuracy(self):
        return max(self.epoch_test_accuracy)

    def rank_key(self):
        """Smaller is better: seconds to the loss target, then final loss."""
        seconds = self.seconds_to(self.epochs_to_loss)
        return (0, seconds) if seconds is not None else (1, self.final_loss if np.isfinite(self.final_loss) else np.inf)


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self, x_test, y_test):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.seconds, self.accuracy = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        probs = self.model.predict(self.x_test, batch_size=1024, verbose=0)
        self.accuracy.append(float(np.mean(np.argmax(probs, -1) == self.y_test)))


def run_one(workload, optimizer_name, factory, learning_rate, epochs, seed=0, jit_compile="auto", data=None):
    """Train ``workload`` once; returns a :class:`RunResult`."""
    (x, y), (x_test, y_test) = data if data is not None else workload.load()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = workload.build()
    model.compile(optimizer=factory(learning_rate), loss=workload.loss, jit_compile=jit_compile)
    timer = _EpochTimer(x_test, y_test)
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
        epoch_test_accuracy=timer.accuracy,
        epoch_seconds=timer.seconds,
        steps_per_epoch=int(np.ceil(len(x) / workload.batch_size)),
        target_loss=workload.target_loss,
        target_accuracy=workload.target_accuracy,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        statistic_fraction=statistic_fraction,
        inversion_fraction=inversion_fraction,
    )


def run_grid(workload, optimizer_name, factory, grid, epochs, progress=print, **kwargs):
    """Run every learning rate of ``grid``; returns ``(best, all results)``."""
    data = workload.load()
    results = []
    for lr in grid:
        result = run_one(workload, optimizer_name, factory, lr, epochs, data=data, **kwargs)
        progress(
            f"  {workload.name:<10} {optimizer_name:<6} lr={lr:<8g} final loss {result.final_loss:.4f} "
            f"test acc {result.best_test_accuracy:.3f} {result.seconds_per_step * 1e3:.1f} ms/step"
        )
        results.append(result)
    return min(results, key=RunResult.rank_key), results

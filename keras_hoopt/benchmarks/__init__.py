"""Reproducible benchmarks: ``python -m keras_hoopt.benchmarks --help``."""

from keras_hoopt.benchmarks.runner import RunResult, run_grid, run_one
from keras_hoopt.benchmarks.workloads import WORKLOADS, Workload

__all__ = ["WORKLOADS", "Workload", "RunResult", "run_one", "run_grid"]

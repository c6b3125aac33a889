"""The CPU engine: numpy arrays and the kernels compiled as C++/OpenMP."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.backend.kernels import load_cpu


class CpuBackend(Backend):
    """Runs every operator on the host with the OpenMP build of ``kernels/*.cu``."""

    name = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        self.xp = np
        self.kernels = load_cpu()
        self.threads = threads or len(os.sched_getaffinity(0))
        self.kernels.set_threads(self.threads)

    def asarray(self, host: np.ndarray) -> Any:
        return np.ascontiguousarray(host)

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def running_max(self, values: Any) -> Any:
        """numpy's sequential prefix maximum (one pass; the portable version is O(n log n))."""
        return np.maximum.accumulate(values)

    def describe(self) -> str:
        return f"cpu (kernels compiled as C++/OpenMP, {self.threads} threads)"

"""The GPU engine: CuPy arrays and the kernels compiled by NVRTC.

This is the only module that imports GPU libraries.  Two decode paths feed it:
``cudf`` (records parsed on the GPU by ``cudf.read_json``) and ``cupy`` (records parsed on
the host by pyarrow, columns moved to the device), so the kernels run wherever CuPy and a
device exist, even without cuDF.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.backend.kernels import load_gpu
from gpu_pipeline.errors import EngineUnavailableError


def gpu_unavailable_reason() -> str | None:
    """Why the GPU engine cannot run here, or None when it can."""
    try:
        import cupy
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"CuPy is not importable ({exc}); pip install cupy-cuda12x"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA driver/device ({type(exc).__name__}: {exc})"
    return None


def cudf_unavailable_reason() -> str | None:
    """Why cuDF cannot be used here, or None when it can."""
    reason = gpu_unavailable_reason()
    if reason:
        return reason
    try:
        import cudf  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"cuDF is not importable ({type(exc).__name__}: {exc}); pip install cudf-cu12"
    return None


class GpuBackend(Backend):
    """Runs every operator on one CUDA device with the NVRTC build of ``kernels/*.cu``."""

    name = "gpu"

    def __init__(self, device: int = 0) -> None:
        reason = gpu_unavailable_reason()
        if reason:
            raise EngineUnavailableError(f"the GPU engine cannot run here: {reason}")
        import cupy

        self.xp = cupy
        self.device = device
        with cupy.cuda.Device(device):
            self.kernels = load_gpu(device)

    def asarray(self, host: np.ndarray) -> Any:
        return self.xp.asarray(host)

    def to_host(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array) if isinstance(array, self.xp.ndarray) else np.asarray(array)

    def describe(self) -> str:
        props = self.xp.cuda.runtime.getDeviceProperties(self.device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu ({name}, kernels compiled by NVRTC)"

"""Engines: the CPU (numpy + kernels as C++/OpenMP) and the GPU (CuPy + kernels by NVRTC)."""

from __future__ import annotations

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.errors import ConfigError


def select_backend(engine: str, threads: int | None = None) -> tuple[Backend, str]:
    """The backend for ``--engine`` and a sentence saying what was chosen and why."""
    from gpu_pipeline.backend.gpu import gpu_unavailable_reason

    if engine not in ("auto", "cpu", "gpu"):
        raise ConfigError("engine", f"must be auto, cpu or gpu, got {engine!r}")
    if engine in ("auto", "gpu"):
        reason = gpu_unavailable_reason()
        if reason is None:
            from gpu_pipeline.backend.gpu import GpuBackend

            backend: Backend = GpuBackend()
            return backend, f"engine: {backend.describe()}"
        if engine == "gpu":
            from gpu_pipeline.errors import EngineUnavailableError

            raise EngineUnavailableError(f"--engine gpu: {reason}; use --engine cpu or auto")
        from gpu_pipeline.backend.cpu import CpuBackend

        backend = CpuBackend(threads)
        return backend, f"engine: {backend.describe()} — GPU not used: {reason}"
    from gpu_pipeline.backend.cpu import CpuBackend

    backend = CpuBackend(threads)
    return backend, f"engine: {backend.describe()}"

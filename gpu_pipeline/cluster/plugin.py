"""Per-worker setup of a cluster run: the engine, its kernels, GPU memory."""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from gpu_pipeline.errors import PipelineError

PLUGIN_NAME = "gpu-pipeline"
log = logging.getLogger(__name__)


class ClusterSetupError(PipelineError):
    """A worker cannot run the job's engine (no GPU, kernels that do not build)."""


class PipelineSetup(WorkerPlugin):
    """Prepares a worker once, before its first task: picks the engine, builds or loads the
    kernels, and on a GPU worker puts CuPy on an RMM pool (when RMM is installed), so the
    tasks of every job on that worker share one warm device and one kernel build.

    ``threads`` is the OpenMP threads of the CPU engine per worker (0: the worker's share
    of the machine's cores).
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, engine: str, threads: int = 0, workers_per_host: int = 1) -> None:
        self.engine = engine
        self.threads = threads
        self.workers_per_host = max(1, workers_per_host)
        self.backend: Any = None
        self.message = ""

    def setup(self, worker: Any) -> None:
        from gpu_pipeline.backend import select_backend

        threads = self.threads or max(1, len(os.sched_getaffinity(0)) // self.workers_per_host)
        try:
            self.backend, self.message = select_backend(self.engine, threads)
        except PipelineError as exc:
            raise ClusterSetupError(
                f"worker {worker.address} cannot run the {self.engine} engine: {exc}"
            ) from None
        if self.backend.name == "gpu":
            _use_rmm_pool()
        log.info("gpu-pipeline worker %s: %s", worker.address, self.message)


def _use_rmm_pool() -> None:
    """CuPy allocations from an RMM pool when RMM is installed (as with dask-cuda)."""
    try:
        import cupy
        import rmm
        from rmm.allocators.cupy import rmm_cupy_allocator
    except ImportError:
        return
    rmm.reinitialize(pool_allocator=True)
    cupy.cuda.set_allocator(rmm_cupy_allocator)


def worker_backend() -> tuple[Any, str]:
    """This worker's backend as prepared by :class:`PipelineSetup` (inside a task)."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, PipelineSetup) or plugin.backend is None:
        raise ClusterSetupError(
            f"worker {worker.address} was not prepared for gpu-pipeline (its setup failed; "
            "see the worker's log)"
        )
    return plugin.backend, plugin.message

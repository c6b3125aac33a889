"""Getting a dask cluster for a run: a local one (``--workers N``) or an existing one
(``--scheduler tcp://HOST:PORT``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from gpu_pipeline.errors import ConfigError

CONNECT_TIMEOUT_S = 15
"""How long to wait for an existing scheduler to answer."""
WORKERS_TIMEOUT_S = 120
"""How long to wait for the workers of a cluster to appear."""


@dataclass
class ClusterHandle:
    """A connected client, and the local cluster it started (None when joining one)."""

    client: Any
    cluster: Any = None
    kind: str = ""
    closers: list[Any] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        """The dask dashboard's address ('' when it does not run)."""
        try:
            return str(self.client.dashboard_link or "")
        except Exception:
            return ""

    def workers(self) -> list[str]:
        """Addresses of the workers connected now."""
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def close(self) -> None:
        """Disconnect, and stop the local cluster if this handle started it."""
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


def usable_gpus() -> int:
    """GPUs this process could give one worker each (0 without a usable CUDA driver)."""
    from gpu_pipeline.backend.gpu import gpu_unavailable_reason

    if gpu_unavailable_reason() is not None:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def open_cluster(workers: int, scheduler: str, engine: str) -> ClusterHandle:
    """Connect to ``scheduler`` (and wait until it has ``workers`` workers, at least one),
    or start ``workers`` local workers: dask-cuda's
    ``LocalCUDACluster`` (one worker per GPU) when the engine may use GPUs and there are
    some, else ``distributed.LocalCluster`` with one single-threaded worker process each
    (a worker runs one partition at a time; the kernels use its share of the cores)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(
                "scheduler",
                f"cannot reach the dask scheduler at {scheduler} ({exc or type(exc).__name__}); "
                "start one with `dask scheduler` and give its tcp://HOST:PORT address",
            ) from None
        handle = ClusterHandle(client, kind=f"scheduler {scheduler}")
        try:
            client.wait_for_workers(max(workers, 1), timeout=WORKERS_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            handle.close()
            raise ConfigError(
                "scheduler",
                f"the dask scheduler at {scheduler} has no workers ({exc}); start some with "
                f"`dask worker {scheduler}` or `dask cuda worker {scheduler}`",
            ) from None
        return handle
    gpus = usable_gpus() if engine != "cpu" else 0
    if gpus:
        if workers > gpus:
            raise ConfigError(
                "workers", f"{workers} workers asked for, but only {gpus} GPUs: one worker per GPU"
            )
        from dask_cuda import LocalCUDACluster

        devices = ",".join(str(i) for i in range(workers))
        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=devices, threads_per_worker=1, dashboard_address=":0"
        )
        kind = f"LocalCUDACluster, {workers} GPU workers"
    else:
        if engine == "gpu":
            raise ConfigError("engine", "--engine gpu with --workers needs usable GPUs")
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        kind = f"LocalCluster, {workers} worker processes"
    client = Client(cluster)
    client.wait_for_workers(workers, timeout=WORKERS_TIMEOUT_S)
    return ClusterHandle(client, cluster, kind)

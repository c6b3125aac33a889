"""What a cluster worker runs: one file partition, or one Kafka consumer of the job's group.

Every task is safe to run again: dask reruns a task whose worker died (mid-run, or after it
finished while its result was still needed).  A file partition's task resumes from the
partition's checkpoint and replays up to the interrupted checkpoint with the same insert
tokens, or does nothing once the partition is marked done; a Kafka consumer task rejoins the
group as the same static member and resumes every partition it gets from its checkpoint.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from gpu_pipeline.cluster.plugin import ClusterSetupError, worker_backend
from gpu_pipeline.config import RunConfig
from gpu_pipeline.state.store import open_state_store

REPORT_EVERY_S = 1.0
STAGED = "staged"
"""The folder of the job's checkpoint location where blocks wait for a chdb writer."""
DRIVER_SILENCE_S = 30.0
"""A task stops (checkpointing first) when the client's heartbeat is this old: the client
died, and with an external scheduler nobody else would stop it.  A worker's environment
variable ``GPU_PIPELINE_CLIENT_SILENCE_S`` sets another value."""


def client_silence_s() -> float:
    """How long this worker's tasks outlive a silent client (see :data:`DRIVER_SILENCE_S`)."""
    text = os.environ.get("GPU_PIPELINE_CLIENT_SILENCE_S", "")
    try:
        value = float(text) if text else DRIVER_SILENCE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ClusterSetupError(
            f"GPU_PIPELINE_CLIENT_SILENCE_S must be a positive number of seconds, got {text!r}"
        )
    return value


@dataclass(frozen=True)
class TaskSpec:
    """One task of a cluster run."""

    config: RunConfig
    job: str
    """The job id, decided by the client (workers never recompute it)."""
    control: str
    """Name of the dask Variable the client beats and sets ``stop`` in."""
    reachable: str
    """A file the client wrote in the job's checkpoint location (its name there): a worker
    that cannot see it does not share the checkpoint location."""
    staged: bool = False
    """Stage blocks (in the job's checkpoint location) for the client's writer (chdb sinks);
    False: insert directly."""
    partition: int | None = None
    """A file partition to read to its end; None for a Kafka consumer task."""
    member: int = 0
    """The Kafka consumer's member number."""
    name: str = field(default="")


def run_task(spec: TaskSpec) -> dict[str, Any]:
    """Run ``spec`` on this worker and report what it did (see :func:`_report`)."""
    from distributed import get_client, get_worker

    from gpu_pipeline.cluster.staging import StagedSink
    from gpu_pipeline.runtime.pipeline import Pipeline

    worker = get_worker()
    backend, _ = worker_backend()
    silence_s = client_silence_s()
    files = open_state_store(spec.config.checkpoint_dir).sub(spec.job)
    if not files.exists(spec.reachable):
        raise ClusterSetupError(
            f"worker {worker.address} cannot see the job's checkpoint location "
            f"{files.location}: every worker needs the same shared directory at the same "
            "path, or the same object-store URL (--checkpoint-dir)"
        )
    config = replace(spec.config, metrics_port=0, progress="never")
    sink = StagedSink(files.sub(STAGED), config.sink) if spec.staged else None
    kafka = spec.partition is None
    pipeline = Pipeline(
        config, sink=sink, backend=backend, job=spec.job, member=spec.member if kafka else None
    )
    started = time.perf_counter()
    watcher = _Watcher(get_client(), spec, pipeline, worker.address, started, silence_s)
    try:
        if not kafka:
            assert spec.partition is not None
            store = pipeline.store
            with store.lease(spec.partition):
                if store.partition_done(spec.partition):
                    pipeline._resume(spec.partition, replays=False)
                    return _report(spec, pipeline, worker.address, started, skipped=True)
                pipeline.sink.open()
                watcher.start()
                result = pipeline.process(partitions=[spec.partition])
        else:
            pipeline.sink.open()
            watcher.start()
            result = pipeline.process()
        return _report(spec, pipeline, worker.address, started, stopped=result.stopped)
    finally:
        watcher.stop()
        pipeline.close()


def _report(
    spec: TaskSpec,
    pipeline: Any,
    address: str,
    started: float,
    *,
    skipped: bool = False,
    stopped: bool = False,
) -> dict[str, Any]:
    """Figures of a task: who ran it, its partitions, records read by this run, peak RSS."""
    return {
        "task": spec.name,
        "worker": address,
        "engine": pipeline.backend.name,
        "partitions": sorted(pipeline._partition_counters),
        "records": pipeline.metrics.records_this_process,
        "elapsed_s": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "skipped": skipped,
        "stopped": stopped,
        "lags": dict(pipeline.source.lag()) if hasattr(pipeline.source, "lag") else {},
    }


class _Watcher:
    """A task's link to the client: stops the pipeline when told to (Ctrl-C in the client)
    or when the client's heartbeat goes quiet, and publishes the task's progress."""

    def __init__(
        self, client: Any, spec: TaskSpec, pipeline: Any, address: str, t0: float, silence_s: float
    ):
        from distributed import Variable

        self.control = Variable(spec.control, client=client)
        self.progress = Variable(f"{spec.control}-{spec.name}", client=client)
        self.spec, self.pipeline, self.address, self.t0 = spec, pipeline, address, t0
        self.silence_s = silence_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-pipeline-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        last_beat, heard = None, time.monotonic()
        while not self._done.wait(REPORT_EVERY_S):
            try:
                state = self.control.get(timeout=5)
                self.progress.set(_report(self.spec, self.pipeline, self.address, self.t0))
            except Exception:  # the scheduler is unreachable: count it as silence
                state = None
            if isinstance(state, dict):
                if state.get("stop"):
                    self.pipeline.request_stop()
                    return
                if state.get("beat") != last_beat:
                    last_beat, heard = state.get("beat"), time.monotonic()
            if time.monotonic() - heard > self.silence_s:
                abandon = getattr(self.pipeline.sink, "abandon", None)
                if abandon is not None:
                    abandon()  # nobody inserts staged blocks any more
                self.pipeline.request_stop()
                return

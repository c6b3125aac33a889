"""The client side of a cluster run: one job, its partitions spread over dask workers.

The client does what belongs to the job as a whole and nothing else: it checks and claims
the database (as a single-process run does), writes the job's identity into the shared
checkpoint location, submits one task per file partition (or one Kafka consumer per
worker, the consumer group assigning the partitions), owns the embedded ClickHouse when
the sink is chdb (inserting the blocks the workers stage, see
:mod:`gpu_pipeline.cluster.staging`), beats a heartbeat the tasks watch, and marks a
bounded job complete once every partition is done.  What the tables hold does not depend
on how many workers there are, or on which worker ran what: every partition is computed by
the same deterministic code from its own checkpoint and cut at the same positions.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_pipeline import logs
from gpu_pipeline.cluster.connect import ClusterHandle
from gpu_pipeline.cluster.tasks import STAGED, TaskSpec, run_task
from gpu_pipeline.config import RunConfig
from gpu_pipeline.errors import PipelineError
from gpu_pipeline.runtime.metrics import ProgressDisplay, RunMetrics
from gpu_pipeline.runtime.pipeline import Pipeline, RunResult

HEARTBEAT_S = 2.0
KAFKA_ROUNDS = 5
"""Rounds of consumers a bounded Kafka job gets to read every partition to its end."""


class ClusterError(PipelineError):
    """A cluster run could not finish: a task failed, or workers kept dying."""


@dataclass
class ClusterRunResult:
    """A cluster run's result: the job's figures, and what each task and partition did."""

    result: RunResult
    tasks: list[dict[str, Any]] = field(default_factory=list)
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)
    cluster: str = ""
    dashboard: str = ""
    staged_blocks: int = 0


class ClusterRun:
    """Runs ``config``'s job on the cluster behind ``handle``."""

    def __init__(self, config: RunConfig, handle: ClusterHandle) -> None:
        from gpu_pipeline.backend.cpu import CpuBackend

        self.handle = handle
        # the client computes nothing: a one-thread CPU backend restores finished partitions
        self.pipeline = Pipeline(config, backend=CpuBackend(1))
        self.config = self.pipeline.config
        self.job_id = self.pipeline.job_id
        self.nonce = uuid.uuid4().hex[:12]
        self.control_name = f"gpu-pipeline-{self.job_id}-{self.nonce}"
        self._stop = threading.Event()
        self._beat = 0

    @property
    def kafka(self) -> bool:
        return self.config.source.startswith("kafka://")

    def request_stop(self, *_: Any) -> None:
        """Ask every task to checkpoint and return (Ctrl-C, SIGTERM)."""
        self._stop.set()

    def run(self, progress: str | None = None) -> ClusterRunResult:
        """Run the job to its end (or a stop) across the cluster."""
        from distributed import Variable

        pipeline = self.pipeline
        finished = pipeline.prepare()
        outcome = ClusterRunResult(
            RunResult(pipeline.metrics, "cluster", True),
            cluster=self.handle.kind,
            dashboard=self.handle.dashboard,
        )
        if finished is not None:
            outcome.result = finished
            outcome.partitions = self._partition_counters()
            return outcome
        store = pipeline.store
        store.describe_job()
        reachable = f"clients/{self.nonce}"
        store.files.write(reachable, f"cluster run {self.nonce}\n".encode())
        writer = None
        staged = False
        if self.config.sink.startswith("chdb://"):  # one process per chdb folder: stage
            from gpu_pipeline.cluster.staging import StagedWriter

            staged = True
            writer = StagedWriter(store.files.sub(STAGED), pipeline.sink)
            writer.drain()  # blocks a crashed run staged but did not insert
            writer.start()
        self._register_setup()
        control = Variable(self.control_name, client=self.handle.client)
        control.set({"beat": 0, "stop": False})
        beating = threading.Thread(target=self._heartbeat, args=(control,), daemon=True)
        beating.start()
        specs = self._specs(reachable, staged)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            reports, failure = self._wait(specs, progress, writer)
            if self.kafka and self.config.until_idle:
                more, failure = self._finish_kafka(
                    reports, failure, reachable, staged, progress, writer
                )
                reports += more
        except Exception as exc:
            if not _scheduler_lost(exc):
                raise
            reports = []
            failure = ClusterError(
                f"lost the connection to the dask scheduler ({self.handle.kind}): "
                f"{type(exc).__name__}; what the tasks checkpointed is kept (dask workers "
                "shut down without their scheduler): restart the scheduler and its workers, "
                "then run the same command again to resume"
            )
        finally:
            self._stop.set()
            beating.join(timeout=HEARTBEAT_S * 2)
            with contextlib.suppress(Exception):  # the scheduler may be gone
                control.set({"beat": -1, "stop": True})
            if writer is not None:
                writer.stop()
                outcome.staged_blocks = writer.blocks
            with contextlib.suppress(OSError):
                store.files.remove(reachable)
        if failure is not None:
            raise ClusterError(_explain(failure)) from failure
        stopped = any(r.get("stopped") for r in reports)
        outcome.tasks = reports
        outcome.partitions = self._partition_counters()
        if not self.kafka and not stopped:
            missing = [p for p in range(len(specs)) if not store.partition_done(p)]
            if missing:
                raise ClusterError(f"partitions {missing} did not finish; run again to resume")
            store.mark_complete()
        metrics = RunMetrics()
        for counters in outcome.partitions.values():
            metrics.add(**counters)
        metrics.started = started
        metrics.records_this_process = sum(int(r["records"]) for r in reports)
        engines = sorted({str(r["engine"]) for r in reports}) or ["cpu"]
        outcome.result = RunResult(
            metrics, "/".join(engines), completed=not stopped, stopped=stopped
        )
        return outcome

    def _finish_kafka(
        self,
        reports: list[dict[str, Any]],
        failure: BaseException | None,
        reachable: str,
        staged: bool,
        progress: str | None,
        writer: Any,
    ) -> tuple[list[dict[str, Any]], BaseException | None]:
        """A bounded Kafka job ends when every partition was read to its end and flushed.

        Each consumer ends by itself once the partitions it holds are idle, so a partition
        that a rebalance handed over late (to a consumer that had already finished, or away
        from one that died) can be left short of its end.  The client checks every partition
        of the topic and runs the consumers again until none is; the partitions resume from
        their checkpoints, so a round adds only what is missing.
        """
        more: list[dict[str, Any]] = []
        for round_ in range(2, KAFKA_ROUNDS + 1):
            if failure is not None or self._stop.is_set():
                return more, failure
            if any(r.get("stopped") for r in reports + more):
                return more, failure
            unfinished = self._unfinished_partitions()
            if not unfinished:
                return more, failure
            logs.say(
                f"partitions {unfinished} were not read to their end and flushed (a "
                f"rebalance moved them late): consumer round {round_}",
                partitions=unfinished,
                round=round_,
            )
            specs = self._specs(reachable, staged, round_)
            reports_now, failure = self._wait(specs, progress, writer)
            more += reports_now
        if failure is None and not self._stop.is_set():
            unfinished = self._unfinished_partitions()
            if unfinished:
                failure = ClusterError(
                    f"partitions {unfinished} were still not read to their end after "
                    f"{KAFKA_ROUNDS} rounds of consumers; run the same command again to resume"
                )
        return more, failure

    def _unfinished_partitions(self) -> list[int]:
        """Partitions of the topic with data that no consumer has flushed at its position."""
        store = self.pipeline.store
        unfinished = []
        for partition, (low, high) in sorted(topic_extent(self.config).items()):
            position = store.position(partition)
            if position is None:
                if high > low:
                    unfinished.append(partition)
            elif store.flushed_position(partition) != position:
                unfinished.append(partition)
        return unfinished

    def _register_setup(self) -> None:
        from collections import Counter

        from gpu_pipeline.cluster.plugin import PipelineSetup

        workers = self.handle.workers()
        per_host = Counter(address.rsplit(":", 1)[0] for address in workers)
        plugin = PipelineSetup(self.config.engine, self.config.threads, max(per_host.values()))
        try:
            self.handle.client.register_plugin(plugin)
        except PipelineError:
            raise
        except Exception as exc:
            raise ClusterError(f"preparing the workers failed: {exc}") from exc

    def _specs(self, reachable: str, staged: bool, round_: int = 1) -> list[TaskSpec]:
        base = dict(
            config=self.config, job=self.job_id, control=self.control_name, reachable=reachable
        )
        if self.kafka:
            members = len(self.handle.workers())
            suffix = "" if round_ == 1 else f"-r{round_}"
            return [
                TaskSpec(**base, staged=staged, member=m, name=f"consumer-{m}{suffix}")  # type: ignore[arg-type]
                for m in range(members)
            ]
        count = _partition_count(self.config)
        return [
            TaskSpec(**base, staged=staged, partition=p, name=f"partition-{p}")  # type: ignore[arg-type]
            for p in range(count)
        ]

    def _wait(
        self, specs: list[TaskSpec], progress: str | None, writer: Any
    ) -> tuple[list[dict[str, Any]], BaseException | None]:
        """Submit the tasks and wait for them, showing progress; the reports, first failure."""
        from distributed import Variable, wait

        client = self.handle.client
        futures = {
            client.submit(run_task, spec, key=f"{self.control_name}-{spec.name}", pure=False): spec
            for spec in specs
        }
        progress_of = {
            spec.name: Variable(f"{self.control_name}-{spec.name}", client=client) for spec in specs
        }
        reports: list[dict[str, Any]] = []
        failure: BaseException | None = None
        pending = set(futures)
        live = RunMetrics()
        total = self.config.events if self.config.source == "synthetic" else None
        with ProgressDisplay(progress or self.config.progress, total) as display:
            while pending:
                try:
                    done, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    if future.status == "finished":
                        reports.append(future.result())
                    elif failure is None:
                        failure = future.exception() or RuntimeError(future.status)
                        self._stop.set()
                    future.release()  # finished: never recomputed if its worker dies later
                if writer is not None and failure is None:
                    try:
                        writer.check()
                    except BaseException as exc:
                        failure = exc
                        self._stop.set()
                if display.enabled:
                    live.records_this_process = _live_records(progress_of, reports)
                    live.counters["records"] = live.records_this_process
                    display.update(live, f"{len(reports)}/{len(specs)} tasks done")
        return reports, failure

    def _heartbeat(self, control: Any) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat += 1
            try:
                control.set({"beat": self._beat, "stop": False})
            except Exception:
                return
        with contextlib.suppress(Exception):
            control.set({"beat": self._beat, "stop": True})

    def _partition_counters(self) -> dict[int, dict[str, int]]:
        store = self.pipeline.store
        return {p: store.counters(p) for p in store.partitions()}

    def close(self) -> None:
        self.pipeline.close()


def _live_records(progress_of: dict[str, Any], reports: list[dict[str, Any]]) -> int:
    finished = {r["task"]: int(r["records"]) for r in reports}
    total = 0
    for name, variable in progress_of.items():
        if name in finished:
            total += finished[name]
            continue
        try:
            report = variable.get(timeout=0.2)
        except Exception:
            continue
        total += int(report.get("records", 0)) if isinstance(report, dict) else 0
    return total


def topic_extent(config: RunConfig) -> dict[int, tuple[int, int]]:
    """Low and high watermark of every partition of the job's Kafka topic."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from gpu_pipeline.sources.kafka import (
        client_properties,
        connection_properties,
        parse_kafka_url,
    )

    bootstrap, topic, properties = parse_kafka_url(config.source, "source")
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "gpu-pipeline-extent",
            "enable.auto.commit": False,
            **client_properties(connection_properties(properties)),
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=15)
        partitions = sorted(metadata.topics[topic].partitions)
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            for p in partitions
        }
    except (KafkaException, KeyError) as exc:
        raise ClusterError(f"cannot read the extent of topic {topic!r}: {exc}") from exc
    finally:
        consumer.close()


def _partition_count(config: RunConfig) -> int:
    if config.source.startswith("file:"):
        from gpu_pipeline.sources.files import FileSource

        return FileSource(config.source).partition_count
    return 1  # the synthetic source is one partition


def _scheduler_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the client lost its scheduler (not that a task failed)."""
    from distributed.client import FuturesCancelledError
    from distributed.comm.core import CommClosedError

    return isinstance(exc, FuturesCancelledError | CommClosedError | OSError)


def _explain(failure: BaseException) -> str:
    from distributed import KilledWorker

    if isinstance(failure, KilledWorker):
        return (
            f"{failure}: its workers kept dying (dask's distributed.scheduler.allowed-failures "
            "reruns a task that many times); what was checkpointed is kept, so run the same "
            "command again to resume once the workers are healthy"
        )
    if isinstance(failure, PipelineError):
        return str(failure)
    return f"a task failed: {type(failure).__name__}: {failure}"


def run_on_cluster(
    config: RunConfig,
    progress: str | None = None,
    on_start: Callable[[ClusterRun], None] | None = None,
) -> ClusterRunResult:
    """Open the cluster ``config`` names, run the job on it, close what was opened."""
    from gpu_pipeline.cluster.connect import open_cluster

    handle = open_cluster(config.workers, config.scheduler, config.engine)
    try:
        run = ClusterRun(config, handle)
        try:
            if on_start is not None:
                on_start(run)
            return run.run(progress)
        finally:
            run.close()
    finally:
        handle.close()

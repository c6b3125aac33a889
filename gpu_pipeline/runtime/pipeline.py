"""The run loop: source -> decode -> partition operators -> outbox -> sink, with checkpoints.

Exactly-once (SPEC §2.7) rests on four facts:

1. batch boundaries are a deterministic function of the checkpointed positions and the
   batch size (Kafka: the batch journal), so a replay after a crash cuts the same batches;
2. every operator is deterministic, so a replayed batch produces the same rows;
3. rows wait in the outbox and are inserted by the checkpoint, one block per partition and
   table, named ``job:partition:c<n>:<from>-<to>:table``; the position ``to`` is recorded
   durably (the partition's intent) before the insert, so a replay after a crash checkpoints
   at ``to`` again with the same rows and tokens, which ClickHouse drops as duplicates;
4. only the checkpoint commits, in one order: sink writes -> state snapshot -> positions
   (and, for Kafka, the consumer offsets after that).

A checkpoint is *cut* on the main thread (rows taken from the outbox, state serialised,
bookkeeping moved on) and *written* by one background thread, in that order; for files and
the synthetic source the main thread goes on with the next batches meanwhile.  The next
checkpoint is written only after the previous one is durable, so checkpoints stay strictly
sequential and each keeps the order above.  A Kafka job waits for each checkpoint: its
offsets are committed right after it, on the thread that polls the consumer, and a
streaming job may have no next batch to commit them at.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema
from gpu_pipeline.backend import select_backend
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig, redact
from gpu_pipeline.decode.base import Decoder, DecodeResult
from gpu_pipeline.errors import CheckpointError, ConfigError, JobConflictError
from gpu_pipeline.operators.watermark import NEG_INF
from gpu_pipeline.runtime.faults import crash_point
from gpu_pipeline.runtime.job import (
    consumer_group,
    describe_identity,
    identity_conflict,
    job_id,
    job_identity,
)
from gpu_pipeline.runtime.metrics import ProgressDisplay, RunMetrics
from gpu_pipeline.runtime.outbox import Outbox
from gpu_pipeline.runtime.partition import BatchOutput, PartitionProcessor
from gpu_pipeline.runtime.prefetch import prefetch
from gpu_pipeline.sinks.base import Sink, open_sink
from gpu_pipeline.sinks.jobs import record_job, recorded_jobs, row_counts
from gpu_pipeline.sources.base import RawBatch, Source
from gpu_pipeline.state.checkpoint import CheckpointStore, PartitionCheckpoint, PreparedCheckpoint
from gpu_pipeline.state.store import open_state_store

CHECKPOINT_ROWS = 250_000
"""Output rows waiting in the outbox that make a checkpoint due (bounds memory, and for files
and the synthetic source it is the only trigger besides the end, see _checkpoint_due)."""


@dataclass
class _PartitionWrite:
    """One partition's share of a cut checkpoint."""

    partition: int
    position: int
    flushed: bool
    token_base: str
    tables: dict[str, pa.Table]
    state: PreparedCheckpoint


@dataclass
class _CutCheckpoint:
    """A checkpoint cut on the main thread, written by the checkpoint writer."""

    writes: list[_PartitionWrite] = field(default_factory=list)
    cut_s: float = 0.0
    """Seconds the main thread spent cutting it (rows taken, state serialised)."""
    write_s: float = 0.0
    """Seconds the writer spent making it durable."""


@dataclass
class RunResult:
    """How a run ended and what it counted."""

    metrics: RunMetrics
    engine: str
    completed: bool
    already_complete: bool = False
    stopped: bool = False


def open_source(config: RunConfig, partitions: list[int] | None = None) -> Source:
    """The source named by ``--source`` (a file source limited to ``partitions`` if given)."""
    if config.source == "synthetic":
        from gpu_pipeline.sources.synthetic import SyntheticSource

        return SyntheticSource(config.events, config.seed)
    if config.source.startswith("file:"):
        from gpu_pipeline.sources.files import FileSource

        return FileSource(config.source[len("file:") :], partitions)
    if config.source.startswith("kafka://"):
        raise ConfigError(
            "source", "a Kafka source is opened by the Pipeline (it needs checkpoints)"
        )
    raise ConfigError("source", f"unsupported source {config.source!r}")


def make_decoder(name: str = "native") -> Decoder:
    """The decoder (``--decoder``), on the host for every engine.

    ``native``: ``kernels/decode.cu`` (CPU target) decides the ordinary records, the Arrow
    decoder the rest; ``arrow``: the Arrow decoder for every record.  Both give the same
    tables (tests/decode/test_native.py).  The GPU engine moves the decoded columns to the
    device; running the decode kernel there too (bytes copied once) is not wired yet.
    """
    from gpu_pipeline.decode.json import ArrowJsonDecoder

    if name == "arrow":
        return ArrowJsonDecoder()
    from gpu_pipeline.decode.native import NativeJsonDecoder

    return NativeJsonDecoder()


class Pipeline:
    """One job: a source, an engine, a sink and the checkpoints that tie them together."""

    def __init__(
        self,
        config: RunConfig,
        *,
        sink: Sink | None = None,
        backend: Backend | None = None,
        member: int | None = None,
        job: str | None = None,
    ) -> None:
        """``member`` numbers this consumer among a cluster's Kafka consumers of the job (it
        names the static group member); None for a single-process run.  ``job`` is the job
        id a cluster's client decided (its workers do not recompute or check it)."""
        self.member = member
        self.identity = job_identity(config)
        self.job_id = job or job_id(config)
        if config.source.startswith("kafka://"):
            config = replace(config, group_id=consumer_group(config, self.job_id))
        self.config = config
        if backend is None:
            backend, self.engine_message = select_backend(config.engine, config.threads or None)
        else:
            self.engine_message = f"engine: {backend.describe()}"
        self.backend = backend
        self.semantics = config.semantics()
        self.sink = sink or open_sink(config.sink, config.database)
        self.store = CheckpointStore(
            open_state_store(config.checkpoint_dir).sub(self.job_id), self.job_id, self.identity
        )
        if config.job_id and not config.fresh and job is None:
            self._check_named_job()
        self.decoder = make_decoder(config.decoder)
        self.processors: dict[int, PartitionProcessor] = {}
        self.positions: dict[int, int] = {}
        self.metrics = RunMetrics()
        self.source: Source | None = None
        self.journal: Any = None
        self.dead_letter_queue: Any = None
        self._topic = ""
        self._checkpointed: dict[int, int] = {}
        self.outbox = Outbox()
        self._boundary: dict[int, tuple[int, bool]] = {}
        """Per partition replaying an interrupted checkpoint: its position and whether it
        included the end-of-input flush; the partition is checkpointed only there."""
        self._flushed: set[int] = set()
        self._dirty: set[int] = set()
        """Partitions processed since their last checkpoint (only those are checkpointed, so
        the checkpoint numbers in insert tokens are the same in a replay)."""
        self._since: dict[int, int] = {}
        """Per partition: the position of its last checkpoint (where its waiting rows begin)."""
        self._partition_counters: dict[int, dict[str, int]] = {}
        self._latency_ms: dict[int, float] = {}
        self._stop = threading.Event()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._inflight: tuple[_CutCheckpoint, Future[None]] | None = None
        self.figures: Any = None
        self.metrics_server: Any = None
        if config.metrics_port:
            self._start_metrics(config.metrics_port)

    def _start_metrics(self, port: int) -> None:
        """Serve the run's figures to Prometheus (``--metrics-port``)."""
        from gpu_pipeline.runtime.prometheus import MetricsServer, RunFigures
        from gpu_pipeline.sinks import clickhouse

        before = clickhouse.RETRIES  # the counter is per process: count this run's retries
        self.figures = RunFigures(
            counters=lambda: self.metrics.counters,
            insert_retries=lambda: clickhouse.RETRIES - before,
        )
        self.metrics_server = MetricsServer(self.figures, port)

    def _observe_batch(self, raw: RawBatch, output_dead: pa.Table | None, seconds: float) -> None:
        """Update the figures Prometheus reads (only with ``--metrics-port``)."""
        figures = self.figures
        self.metrics_server.batch_latency.observe(seconds)
        if output_dead is not None and output_dead.num_rows:
            fields = pc.list_element(pc.split_pattern(output_dead["error"], ":", max_splits=1), 0)
            for item in pc.value_counts(fields).to_pylist():
                name = str(item["values"])
                figures.dead_letter_fields[name] = figures.dead_letter_fields.get(name, 0) + int(
                    item["counts"]
                )
        lag_of = getattr(self.source, "lag", None)
        if lag_of is not None:
            figures.lags = dict(lag_of())
        figures.watermarks_ms = {
            p: mark
            for p, processor in self.processors.items()
            if (mark := processor.watermark.current()) > NEG_INF
        }

    # ------------------------------------------------------------------ control

    def request_stop(self, *_: Any) -> None:
        """Finish the current batch, checkpoint and return (SIGINT/SIGTERM)."""
        self._stop.set()
        stop = getattr(self.source, "stop", None)
        if stop is not None:
            stop()

    def install_signal_handlers(self) -> None:
        """Route SIGINT and SIGTERM to :meth:`request_stop` (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ run

    def run(self, progress: str | None = None) -> RunResult:
        """Run until the source ends (then flush) or a stop is requested."""
        finished = self.prepare()
        if finished is not None:
            return finished
        return self.process(progress)

    def prepare(self) -> RunResult | None:
        """The job-level start: open the sink, forget the checkpoint (``--fresh``), make sure
        the database holds this job's output, and return the result at once if the job
        already ran to completion.  A cluster run does this once, in the client."""
        self.sink.open()
        if self.config.fresh:
            self.store.reset()
        self._claim_sink()
        if self.store.is_complete():
            # nothing is replayed, so any batch size reads the same finished job
            for partition in self.store.partitions():
                self._resume(partition, replays=False)
            self._check_sink_holds_output()
            return RunResult(self.metrics, self.backend.name, True, already_complete=True)
        return None

    def process(
        self, progress: str | None = None, *, partitions: list[int] | None = None
    ) -> RunResult:
        """Read, compute and checkpoint until the source ends (then flush) or a stop.

        ``partitions`` restricts a file source to those partitions (a cluster worker's
        share); the job is then marked complete by the client, not here, once every
        partition is done.
        """
        if not self.config.source.startswith("kafka://"):
            # Kafka partitions are restored when assigned (the source calls _resume),
            # so a consumer never touches the state of partitions another one owns.
            for partition in self.store.known_partitions():
                if partitions is None or partition in partitions:
                    self._resume(partition)
        source = self._open_source(partitions)
        self.source = source
        total = self.config.events if self.config.source == "synthetic" else None
        last_checkpoint = time.monotonic()
        try:
            with ProgressDisplay(progress or self.config.progress, total) as display:
                for raw, decoded in self._decoded_batches(source):
                    self._process_batch(raw, decoded)
                    self._collect_written(wait=False)
                    display.update(self.metrics, self._detail() if display.enabled else "")
                    if self._stop.is_set():
                        break
                    due = self._checkpoint_due(raw.partition, last_checkpoint)
                    if due:
                        self.checkpoint(None if due is True else [raw.partition])
                        last_checkpoint = time.monotonic()
                stopped = self._stop.is_set()
                flushed_now = [] if stopped else sorted(self.processors)
                if not stopped:
                    self._flush_all()
                self.checkpoint(wait=True)
                if not stopped and self._boundary:
                    raise CheckpointError(
                        f"partitions {sorted(self._boundary)} ended before the position their "
                        f"interrupted checkpoint covered ({self._boundary}): the input shrank "
                        "since the crash (file rewritten, Kafka retention); rerun with --fresh"
                    )
                if not stopped and source.bounded and self.config.source.startswith("kafka://"):
                    # a cluster run's client checks that every partition got its flush
                    for partition in flushed_now:
                        if partition in self.positions:
                            self.store.mark_flushed(partition, self.positions[partition])
                bounded_files = source.bounded and not self.config.source.startswith("kafka://")
                if not stopped and bounded_files:
                    if partitions is None:
                        self.store.mark_complete()
                    else:
                        for partition in partitions:
                            self.store.mark_partition_done(partition)
                display.update(self.metrics, self._detail() if display.enabled else "")
        finally:
            self._abandon_inflight()
            source.close()
            if self.dead_letter_queue is not None:
                self.dead_letter_queue.close()
        return RunResult(self.metrics, self.backend.name, not stopped, stopped=stopped)

    def _check_named_job(self) -> None:
        """A job named with --job-id must read and compute what it did when it began."""
        recorded = self.store.recorded_identity()
        differs = identity_conflict(self.identity, recorded) if recorded else None
        if differs:
            raise ConfigError(
                "job_id",
                f"job {self.job_id!r} was started with another {differs} "
                f"({describe_identity(recorded or {})}); a job name stands for one source and "
                "one set of semantics: use another --job-id, or --fresh to start it over",
            )

    def _claim_sink(self) -> None:
        """Make sure the database holds this job's output (or nothing), then record the job.

        Refuses, before anything is written: a database that holds another job's output
        (the rows would mix); a database with no record of this job while its checkpoint
        says it wrote there (dropped or emptied by hand: resuming would silently leave out
        what came before); and a rerun from the start that would cut other batches than the
        rows already stored (they would be written again under other tokens).
        """
        db = self.config.database
        records = recorded_jobs(self.sink, db)
        others = [r for r in records if r.job_id != self.job_id]
        if others:
            other = others[0]
            raise JobConflictError(
                f"database {db!r} at {redact(self.identity['sink'])} holds the output of another "
                f"job ({other.job_id}: {describe_identity(other.identity)}); this run is job "
                f"{self.job_id} ({describe_identity(self.identity)}). A database holds one job's "
                "output, or the two would be counted together: write to another --database, "
                f'or drop this one first (gpu-pipeline query "DROP DATABASE {db}")'
            )
        mine = records[0] if records else None
        has_checkpoint = bool(self.store.partitions()) or self.store.is_complete()
        wrote_here = self._sink_key in self.store.claimed_sinks()
        if mine is None and has_checkpoint and wrote_here:
            raise CheckpointError(
                f"this job's checkpoint ({self.store.location}) says it already wrote to "
                f"database {db!r} at {redact(self.identity['sink'])}, but the database has no "
                "record of it: it was dropped or emptied by hand. Run again with --fresh to "
                "write the whole job again"
            )
        journaled = self.store.journal_has_entries()
        if mine is not None and not has_checkpoint and not journaled:
            # a first run that crashed before its first checkpoint replays its journal
            self._check_rerun_from_start(mine.cuts)
        if mine is None:
            record_job(self.sink, db, self.job_id, self.identity, self._cuts())
        self.store.claim_sink(self._sink_key, f"{self.identity['sink']} database {db}\n")

    @property
    def _sink_key(self) -> str:
        """Names this run's sink and database among those the job has written to."""
        where = f"{self.identity['sink']}|{self.config.database}"
        return hashlib.sha256(where.encode()).hexdigest()[:16]

    def _check_rerun_from_start(self, recorded_cuts: str) -> None:
        """A run from the start into tables that already hold this job's rows is safe only if
        it cuts the very same blocks (same tokens): files and synthetic, same batch size and
        checkpoint cadence."""
        db = self.config.database
        if not any(row_counts(self.sink, db, sorted(schema.OUTPUT_TABLES)).values()):
            return  # recorded, but nothing written yet (e.g. a run refused before reading)
        if self.config.source.startswith("kafka://"):
            raise JobConflictError(
                f"database {db!r} already holds rows of this Kafka job, but there is no "
                f"checkpoint to resume from ({self.store.location}); Kafka batches are cut by "
                "time, so reading the topic again from the start would store those rows twice. "
                "Resume with the job's --checkpoint-dir, or drop the database first "
                f'(gpu-pipeline query "DROP DATABASE {db}") and run with --fresh'
            )
        if recorded_cuts != self._cuts():
            raise JobConflictError(
                f"database {db!r} holds this job's rows written with {recorded_cuts}; running "
                f"it again from the start with {self._cuts()} would cut other blocks and store "
                "every row twice. Rerun with the same --batch-size and --checkpoint-interval "
                f'(0 or not), or drop the database first (gpu-pipeline query "DROP DATABASE {db}")'
            )

    def _check_sink_holds_output(self) -> None:
        """A complete job's tables must still hold at least what it wrote."""
        if self.store.claimed_sinks() != {self._sink_key}:
            return  # a job named with --job-id that wrote to several sinks: no single total
        c = self.metrics.counters
        expected = {
            "events": c.get("on_time", 0),
            "late_events": c.get("late", 0),
            "dead_letters": c.get("dead_letters", 0),
            "sessions": c.get("sessions", 0),
        }
        found = row_counts(self.sink, self.config.database, sorted(expected))
        short = [
            f"{t}: {found.get(t, 0):,} of {n:,}" for t, n in expected.items() if found.get(t, 0) < n
        ]
        if short:
            raise CheckpointError(
                f"this job ran to completion, but database {self.config.database!r} at "
                f"{redact(self.identity['sink'])} now holds fewer rows than it wrote "
                f"({'; '.join(short)}): it was emptied by hand. Run again with --fresh to "
                "write the whole job again"
            )

    def _checkpoint_due(self, partition: int, last_checkpoint: float) -> bool | str:
        """Whether to checkpoint after this batch of ``partition``: True for every partition,
        ``"partition"`` for this one alone, False for none.

        ``--checkpoint-interval 0`` checkpoints after every batch.  For Kafka a checkpoint is
        due once the interval has passed or :data:`CHECKPOINT_ROWS` output rows wait.  Files
        and the synthetic source ignore the clock and count rows per partition: a partition's
        checkpoints then fall at the same positions in every run, whether one process reads
        every partition or each worker of a cluster reads some, so a rerun cuts the same
        blocks and ClickHouse drops them as duplicates.
        """
        interval_ms = self.config.checkpoint_interval_ms
        if interval_ms == 0:
            return True
        if not self.config.source.startswith("kafka://"):
            return "partition" if self.outbox.rows_of(partition) >= CHECKPOINT_ROWS else False
        if self.outbox.rows >= CHECKPOINT_ROWS:
            return True
        return time.monotonic() - last_checkpoint >= interval_ms / 1000

    def _cuts(self) -> str:
        """How this run cuts batches and checkpoints (what a rerun must match)."""
        every = "batch" if self.config.checkpoint_interval_ms == 0 else f"{CHECKPOINT_ROWS} rows"
        return f"batch_size={self.config.batch_size}, checkpoint every {every}"

    def _open_source(self, partitions: list[int] | None = None) -> Source:
        if self.config.source.startswith("kafka://"):
            from gpu_pipeline.sources.kafka import KafkaSource
            from gpu_pipeline.state.journal import BatchJournal

            self.journal = BatchJournal(self.store.files.sub("journal"))
            if self.config.dead_letter_topic:
                from gpu_pipeline.sources.kafka import parse_kafka_url
                from gpu_pipeline.sources.kafka_producer import DeadLetterProducer

                bootstrap, self._topic, properties = parse_kafka_url(self.config.source, "source")
                self.dead_letter_queue = DeadLetterProducer(
                    bootstrap, self.config.dead_letter_topic, properties
                )
            return KafkaSource.from_config(
                self.config,
                job_id=self.job_id,
                journal=self.journal,
                resume=self._resume,
                on_revoke=self._on_revoke,
                member=self.member,
            )
        return open_source(self.config, partitions)

    def _resume(self, partition: int, replays: bool = True) -> int | None:
        """Restore ``partition`` from its checkpoint; its next position, or None if it has none.

        A run that ``replays`` batches after the checkpoint must cut them as the interrupted
        run did (same insert tokens), so for files it needs the same batch size.
        """
        checkpoint = self.store.load(partition)
        intent = self.store.intent(partition)
        start = checkpoint.position if checkpoint is not None else None
        if replays and intent is not None and intent[0] > (start if start is not None else -1):
            # a crash came while a checkpoint up to `intent` was being written: cut there again
            self._boundary[partition] = intent
        if checkpoint is None:
            return None
        self._since[partition] = checkpoint.position
        if (
            replays
            and checkpoint.batch_size
            and checkpoint.batch_size != self.config.batch_size
            and not self.config.source.startswith("kafka://")
        ):
            raise ConfigError(
                "batch_size",
                f"this job's checkpoint was taken with batch_size={checkpoint.batch_size}; resume "
                "with the same batch size (so replayed batches are cut identically) or use --fresh",
            )
        self.positions[partition] = checkpoint.position
        self._checkpointed[partition] = checkpoint.sequence
        self.metrics.add(**checkpoint.counters)
        self._partition_counters[partition] = dict(checkpoint.counters)
        processor = PartitionProcessor(partition, self.semantics, self.backend)
        processor.restore(checkpoint.state)
        self.processors[partition] = processor
        return checkpoint.position

    def _on_revoke(self, partitions: list[int]) -> None:
        """Kafka rebalance: checkpoint the partitions that leave, then forget them."""
        self.checkpoint(partitions, wait=True)
        for partition in partitions:
            self.processors.pop(partition, None)
            self.positions.pop(partition, None)
            # not checkpointed (a replay short of its boundary): the next owner replays it
            self.outbox.drop(partition)
            self._dirty.discard(partition)
            self._boundary.pop(partition, None)
            self._since.pop(partition, None)
            # its counters come back with its checkpoint if it is assigned here again
            for key, value in self._partition_counters.pop(partition, {}).items():
                self.metrics.counters[key] = self.metrics.counters.get(key, 0) - value
            if self.journal is not None:
                self.journal.forget(partition)

    def _processor(self, partition: int) -> PartitionProcessor:
        if partition not in self.processors:
            self.processors[partition] = PartitionProcessor(partition, self.semantics, self.backend)
        return self.processors[partition]

    def _decoded_batches(self, source: Source) -> Iterator[tuple[RawBatch, DecodeResult]]:
        """Batches with their decoding; read and decoded ahead on a thread unless Kafka."""
        batches = source.batches(self.config.batch_size, dict(self.positions))
        if self.config.source.startswith("kafka://"):
            return ((raw, self._decode_unless_idle(raw)) for raw in batches)
        return prefetch(batches, self.decoder.decode)

    def _decode_unless_idle(self, raw: RawBatch) -> DecodeResult:
        return DecodeResult.empty() if raw.idle_clock_ms is not None else self.decoder.decode(raw)

    def _process_batch(self, raw: RawBatch, decoded: DecodeResult) -> None:
        started = time.perf_counter()
        try:
            dead = self._run_batch(raw, decoded)
        finally:
            self._latency_ms[raw.partition] = (time.perf_counter() - started) * 1000
        if self.metrics_server is not None:
            self._observe_batch(raw, dead, time.perf_counter() - started)

    def _run_batch(self, raw: RawBatch, decoded: DecodeResult) -> pa.Table | None:
        """Operators of one batch (or an idle tick); its rows wait in the outbox.

        Returns the batch's dead letters (for the metrics)."""
        partition = raw.partition
        if raw.idle_clock_ms is not None:
            output = self._processor(partition).advance_idle(raw.idle_clock_ms)
            self._dirty.add(partition)
            self.outbox.add(partition, output.tables)
            self._count(partition, self._counts(output))
            return output.tables.get("dead_letters")
        output = self._processor(partition).process(raw, decoded)
        dead = output.tables.get("dead_letters")
        if dead is not None and dead.num_rows and self.dead_letter_queue is not None:
            self.dead_letter_queue.send(dead, self._topic)
        self._dirty.add(partition)
        self.outbox.add(partition, output.tables)
        counts = self._counts(output)
        counts.update(records=len(raw), batches=1)
        self._count(partition, counts)
        self.positions[partition] = raw.next_offset
        self.metrics.records_this_process += len(raw)
        crash_point("after_batch")
        boundary = self._boundary.get(partition)
        if boundary is not None and raw.next_offset >= boundary[0]:
            if raw.next_offset > boundary[0]:
                raise CheckpointError(
                    f"partition {partition}: the replay after a crash passed the position "
                    f"{boundary[0]} its interrupted checkpoint covered (now {raw.next_offset}); "
                    "the input changed since the crash; rerun with --fresh"
                )
            if not boundary[1]:
                self.checkpoint([partition])  # the interrupted checkpoint, with the same rows
        return dead

    def _flush_all(self) -> None:
        for partition in sorted(self.processors):
            output = self.processors[partition].flush()
            self.outbox.add(partition, output.tables)
            self._flushed.add(partition)
            self._dirty.add(partition)
            self._count(partition, self._counts(output))

    def _counts(self, output: BatchOutput) -> dict[str, int]:
        """The counters a batch's (or flush's) output adds."""
        c = output.counts
        return {
            "events": c.events,
            "dead_letters": _rows(output, "dead_letters"),
            "future_ts": c.future_ts,
            "duplicates": c.duplicates,
            "late": c.late,
            "on_time": c.on_time,
            "sessions": _rows(output, "sessions"),
            "window_rows": sum(_rows(output, spec.table) for spec in self.semantics.windows),
        }

    def _cut_rows(self, partition: int, sequence: int) -> tuple[str, dict[str, pa.Table]]:
        """The partition's waiting rows, one block per table, and the name of the write.

        The token of each block is ``job:partition:c<sequence>:<from>-<to>:table``; ``from``
        is where the previous checkpoint ended (``start`` before the first), ``to`` this
        one's position.  The writer records the intent ``to`` durably before inserting, so
        a replay after a crash anywhere from there to the state snapshot cuts at ``to``
        again and sends the same blocks under the same tokens.
        """
        pending = self.outbox.take(partition)
        since = self._since.get(partition, "start")
        base = f"{self.job_id}:{partition}:c{sequence}:{since}-{self.positions[partition]}"
        return base, pending

    def _count(self, partition: int, counts: dict[str, int]) -> None:
        self.metrics.add(**counts)
        mine = self._partition_counters.setdefault(partition, {})
        for key, value in counts.items():
            mine[key] = mine.get(key, 0) + value

    def checkpoint(self, partitions: list[int] | None = None, *, wait: bool = False) -> None:
        """Cut a checkpoint of ``partitions`` (default: all) and have it written.

        The previous checkpoint is made durable first (and its offsets committed); this one
        is written in the background unless ``wait`` (or a Kafka source: see the module
        docstring), which returns once it is durable.
        """
        self._collect_written(wait=True)
        cut = self._cut(partitions)
        if cut.writes:
            self._inflight = (cut, self._writer.submit(self._write, cut))
        if wait or self.config.source.startswith("kafka://"):
            self._collect_written(wait=True)

    def _cut(self, partitions: list[int] | None) -> _CutCheckpoint:
        """Take the rows and serialise the state of every partition due a checkpoint.

        A partition replaying after a crash is checkpointed only at the position its
        interrupted checkpoint covered (:meth:`_run_batch` does it when it gets there).
        """
        started = time.perf_counter()
        cut = _CutCheckpoint()
        chosen = sorted(self.processors) if partitions is None else partitions
        for partition in chosen:
            processor = self.processors.get(partition)
            if processor is None or partition not in self.positions:
                continue
            if partition not in self._dirty:
                continue  # nothing happened since its last checkpoint
            boundary = self._boundary.get(partition)
            if boundary is not None and (
                self.positions[partition] != boundary[0]
                or boundary[1] != (partition in self._flushed)
            ):
                continue
            sequence = self._checkpointed.get(partition, 0)
            token_base, tables = self._cut_rows(partition, sequence + 1)
            state = self.store.prepare(
                partition,
                PartitionCheckpoint(
                    position=self.positions[partition],
                    state=processor.snapshot(),
                    counters=dict(self._partition_counters.get(partition, {})),
                    batch_size=self.config.batch_size,
                    sequence=sequence,
                ),
            )
            cut.writes.append(
                _PartitionWrite(
                    partition,
                    self.positions[partition],
                    partition in self._flushed,
                    token_base,
                    tables,
                    state,
                )
            )
            self._checkpointed[partition] = sequence + 1
            self._since[partition] = self.positions[partition]
            self._boundary.pop(partition, None)
            self._flushed.discard(partition)
            self._dirty.discard(partition)
        cut.cut_s = time.perf_counter() - started
        return cut

    def _write(self, cut: _CutCheckpoint) -> None:
        """The checkpoint writer: per partition, intent -> rows -> state (sink -> state)."""
        started = time.perf_counter()
        for write in cut.writes:
            if write.tables:
                self.store.write_intent(write.partition, write.position, write.flushed)
                for table in sorted(write.tables):
                    rows = write.tables[table]
                    self.sink.write(table, rows, f"{write.token_base}:{table}")
                    if self.figures is not None:
                        written = self.figures.rows_written
                        written[table] = written.get(table, 0) + rows.num_rows
                crash_point("after_sink_write")
            self.store.write_prepared(write.state)
        cut.write_s = time.perf_counter() - started

    def _collect_written(self, *, wait: bool) -> None:
        """Finish the checkpoint in flight once it is durable (``wait``: block until then):
        truncate the journal and commit its positions; a failed write raises here."""
        if self._inflight is None:
            return
        cut, future = self._inflight
        if not wait and not future.done():
            return
        self._inflight = None
        future.result()
        crash_point("after_checkpoint")
        if self.journal is not None:
            for write in cut.writes:
                self.journal.truncate(write.partition, write.position)
        if self.source is not None:
            self.source.commit({w.partition: w.position for w in cut.writes})
        if self.metrics_server is not None:
            # the checkpoint's own work, not the batches computed while it was written
            self.metrics_server.checkpoint_duration.observe(cut.cut_s + cut.write_s)

    def _abandon_inflight(self) -> None:
        """On the way out (normal or not): let a write in flight end, never half-commit."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            # the run is already failing (or done): its own error is the one to raise
            with contextlib.suppress(Exception):
                inflight[1].result()

    def _detail(self) -> str:
        """The progress line: counters, then per partition lag, watermark and batch latency."""
        c = self.metrics.counters
        text = (
            f"dead {c['dead_letters']:,} (future ts {c.get('future_ts', 0):,})  "
            f"dup {c['duplicates']:,}  late {c['late']:,}"
        )
        lag_of = getattr(self.source, "lag", None)
        lags: dict[int, int] = lag_of() if lag_of is not None else {}
        parts = []
        for partition in sorted(self.processors)[:8]:
            mark = self.processors[partition].watermark.current()
            entry = f"p{partition}"
            if partition in lags:
                entry += f" lag {lags[partition]:,}"
            if mark > NEG_INF:
                entry += f" wm {_iso(mark)[11:]}"
            if partition in self._latency_ms:
                entry += f" {self._latency_ms[partition]:,.0f} ms"
            parts.append(entry)
        if len(self.processors) > 8:
            parts.append(f"+{len(self.processors) - 8} more, lag {sum(lags.values()):,}")
        return "  ".join([text, *parts])

    def describe_sink(self) -> str:
        """The sink, for logs (passwords redacted)."""
        return redact(self.sink.describe())

    def close(self) -> None:
        """Close the sink and stop serving metrics."""
        try:
            self._writer.shutdown(wait=True)
            self.sink.close()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics_server = None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rows(output: BatchOutput, table: str) -> int:
    rows: pa.Table | None = output.tables.get(table)
    return rows.num_rows if rows is not None else 0


__all__ = ["Pipeline", "RunResult", "job_id", "open_source"]

"""The run loop: source -> decode -> partition operators -> sink, with checkpoints.

Exactly-once (SPEC §2.7) rests on three facts:

1. batch boundaries are a deterministic function of the checkpointed positions and the
   batch size, so a replay after a crash cuts the same batches;
2. every operator is deterministic, so a replayed batch produces the same rows, written
   with the same ``insert_deduplication_token`` (job, partition, offset range, table), which
   ClickHouse drops as a duplicate;
3. only the checkpoint commits, in one order: sink writes -> state snapshot -> positions
   (and, for Kafka, the consumer offsets after that).
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa

from gpu_pipeline.backend import select_backend
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig, redact
from gpu_pipeline.decode.base import Decoder
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.runtime.metrics import ProgressDisplay, RunMetrics
from gpu_pipeline.runtime.partition import BatchOutput, PartitionProcessor
from gpu_pipeline.sinks.base import Sink, open_sink
from gpu_pipeline.sources.base import RawBatch, Source
from gpu_pipeline.state.checkpoint import Checkpoint, CheckpointStore


@dataclass
class RunResult:
    """How a run ended and what it counted."""

    metrics: RunMetrics
    engine: str
    completed: bool
    already_complete: bool = False
    stopped: bool = False


def open_source(config: RunConfig) -> Source:
    """The source named by ``--source``."""
    if config.source == "synthetic":
        from gpu_pipeline.sources.synthetic import SyntheticSource  # noqa: PLC0415

        return SyntheticSource(config.events, config.seed)
    if config.source.startswith("file:"):
        from gpu_pipeline.sources.files import FileSource  # noqa: PLC0415

        return FileSource(config.source[len("file:") :])
    if config.source.startswith("kafka://"):
        from gpu_pipeline.sources.kafka import KafkaSource  # noqa: PLC0415

        return KafkaSource.from_config(config)
    raise ConfigError("source", f"unsupported source {config.source!r}")


def make_decoder(backend: Backend) -> Decoder:
    """The decoder for the engine (pyarrow on the host; cuDF on the GPU when present)."""
    from gpu_pipeline.decode.json import ArrowJsonDecoder  # noqa: PLC0415

    return ArrowJsonDecoder()


def source_identity(config: RunConfig) -> dict[str, Any]:
    """What makes two runs the same job: the input's identity and the semantics."""
    identity: dict[str, Any] = {"source": config.source, "database": config.database}
    if config.source == "synthetic":
        identity.update(events=config.events, seed=config.seed)
    elif config.source.startswith("file:"):
        path = Path(config.source[len("file:") :])
        if path.exists():
            stat = path.stat()
            identity.update(path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    elif config.source.startswith("kafka://"):
        identity.update(group_id=config.group_id)
    identity["semantics"] = asdict(config.semantics())
    return identity


def job_id(config: RunConfig) -> str:
    """A short stable id of the job (names its checkpoints and insert tokens)."""
    text = json.dumps(source_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Pipeline:
    """One job: a source, an engine, a sink and the checkpoints that tie them together."""

    def __init__(self, config: RunConfig, *, sink: Sink | None = None, backend: Backend | None = None) -> None:
        self.config = config
        self.job_id = job_id(config)
        if backend is None:
            backend, self.engine_message = select_backend(config.engine, config.threads or None)
        else:
            self.engine_message = f"engine: {backend.describe()}"
        self.backend = backend
        self.semantics = config.semantics()
        self.sink = sink or open_sink(config.sink, config.database)
        self.store = CheckpointStore(Path(config.checkpoint_dir) / self.job_id, self.job_id)
        self.decoder = make_decoder(backend)
        self.processors: dict[int, PartitionProcessor] = {}
        self.positions: dict[int, int] = {}
        self.metrics = RunMetrics()
        self._stop = threading.Event()
        self._checkpoint: Checkpoint | None = None

    # ------------------------------------------------------------------ control

    def request_stop(self, *_: Any) -> None:
        """Finish the current batch, checkpoint and return (SIGINT/SIGTERM)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """Route SIGINT and SIGTERM to :meth:`request_stop` (main thread only)."""
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ run

    def run(self, progress: str | None = None) -> RunResult:
        """Run until the source ends (then flush) or a stop is requested."""
        self.sink.open()
        if self.config.fresh:
            self.store.reset()
        checkpoint = self.store.load()
        if checkpoint is not None:
            self._resume(checkpoint)
            if checkpoint.complete:
                return RunResult(self.metrics, self.backend.name, True, already_complete=True)
        else:
            checkpoint = Checkpoint(self.job_id, extra={"batch_size": self.config.batch_size})
        self._checkpoint = checkpoint
        source = open_source(self.config)
        total = self.config.events if self.config.source == "synthetic" else None
        last_checkpoint = time.monotonic()
        try:
            with ProgressDisplay(progress or self.config.progress, total) as display:
                for raw in source.batches(self.config.batch_size, dict(self.positions)):
                    self._process_batch(raw)
                    display.update(self.metrics, self._detail())
                    if self._stop.is_set():
                        break
                    if time.monotonic() - last_checkpoint >= self.config.checkpoint_interval_ms / 1000:
                        self._save_checkpoint(complete=False)
                        last_checkpoint = time.monotonic()
                stopped = self._stop.is_set()
                if not stopped:
                    self._flush_all()
                self._save_checkpoint(complete=not stopped)
                display.update(self.metrics, self._detail())
        finally:
            source.close()
        return RunResult(self.metrics, self.backend.name, not stopped, stopped=stopped)

    def _resume(self, checkpoint: Checkpoint) -> None:
        recorded = checkpoint.extra.get("batch_size")
        if recorded is not None and recorded != self.config.batch_size:
            raise ConfigError(
                "batch_size",
                f"this job's checkpoint was taken with batch_size={recorded}; resume with the same "
                "batch size (so replayed batches are cut identically) or start over with --fresh",
            )
        self.positions = dict(checkpoint.positions)
        self.metrics.counters.update(checkpoint.counters)
        for partition, state in checkpoint.states.items():
            self._processor(partition).restore(state)

    def _processor(self, partition: int) -> PartitionProcessor:
        if partition not in self.processors:
            self.processors[partition] = PartitionProcessor(partition, self.semantics, self.backend)
        return self.processors[partition]

    def _process_batch(self, raw: RawBatch) -> None:
        decoded = self.decoder.decode(raw)
        output = self._processor(raw.partition).process(decoded.events)
        if decoded.dead.num_rows:
            output.tables["dead_letters"] = decoded.dead
        first = int(raw.offsets[0]) if len(raw) else raw.next_offset
        self._write(output, f"{self.job_id}:{raw.partition}:{first}-{raw.next_offset}")
        self.positions[raw.partition] = raw.next_offset
        self.metrics.records_this_process += len(raw)
        self.metrics.add(
            records=len(raw),
            events=decoded.events.num_rows,
            dead_letters=decoded.dead.num_rows,
            batches=1,
        )

    def _flush_all(self) -> None:
        for partition in sorted(self.processors):
            output = self.processors[partition].flush()
            self._write(output, f"{self.job_id}:{partition}:flush@{self.positions.get(partition, 0)}")

    def _write(self, output: BatchOutput, token_base: str) -> None:
        for table in sorted(output.tables):
            rows = output.tables[table]
            if rows.num_rows:
                self.sink.write(table, rows, f"{token_base}:{table}")
        counts = output.counts
        self.metrics.add(duplicates=counts.duplicates, late=counts.late, on_time=counts.on_time)
        self.metrics.add(sessions=_rows(output, "sessions"))
        self.metrics.add(
            window_rows=sum(_rows(output, spec.table) for spec in self.semantics.windows)
        )

    def _save_checkpoint(self, complete: bool) -> None:
        assert self._checkpoint is not None
        checkpoint = self._checkpoint
        checkpoint.positions = dict(self.positions)
        checkpoint.states = {p: proc.snapshot() for p, proc in self.processors.items()}
        checkpoint.counters = dict(self.metrics.counters)
        checkpoint.complete = complete
        self.store.save(checkpoint)

    def _detail(self) -> str:
        c = self.metrics.counters
        return f"dead {c['dead_letters']:,}  dup {c['duplicates']:,}  late {c['late']:,}"

    def describe_sink(self) -> str:
        """The sink, for logs (passwords redacted)."""
        return redact(self.sink.describe())

    def close(self) -> None:
        """Close the sink."""
        self.sink.close()


def _rows(output: BatchOutput, table: str) -> int:
    rows: pa.Table | None = output.tables.get(table)
    return rows.num_rows if rows is not None else 0


__all__ = ["Pipeline", "RunResult", "job_id", "open_source"]

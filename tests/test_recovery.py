"""Exactly-once across crashes (SPEC §2.7): kill the pipeline anywhere, restart it, and the
ClickHouse tables equal those of one uninterrupted run, row by row.

Crashes are injected with ``GPU_PIPELINE_CRASH_AT`` (the process dies with ``os._exit(137)``
at a named point: after a batch's sink writes, between two operator state files of a
snapshot, after the state is durable but before the offsets are committed) and with a real
SIGKILL at a random moment.  Each crashed job is restarted from the same checkpoint and
chdb folders until a run exits 0.  The file source runs without a broker (fast); the same
kill points run against the real Kafka broker, whose batch cuts depend on timing and are
replayed from the batch journal.  A sink failure in the middle of an insert is injected
in-process into a real chdb sink.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from clickhouse_connect.driver import exceptions as ch_errors

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig
from gpu_pipeline.errors import SinkError
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sinks import clickhouse
from gpu_pipeline.sinks.clickhouse import ClickHouseSink, RetryPolicy, is_transient, parse_sink_url
from gpu_pipeline.sources.kafka import parse_kafka_url
from gpu_pipeline.sources.kafka_producer import produce_synthetic
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from tests.engine_harness import assert_tables_equal
from tests.kafka_broker import create_topic
from tests.pipeline_runs import (
    Job,
    Tables,
    assert_same_tables,
    committed_offsets,
    read_partitions,
    read_tables,
    terminate,
    wait_until,
)
from tests.reference import Record, ReferenceResult, canonical, reference_run

FILE_EVENTS = 3000
KAFKA_EVENTS = 2400
PARTITIONS = 3
SEED = 11


@dataclass
class Baseline:
    """An input, what the reference model makes of it, and one uninterrupted run's tables."""

    source: str
    records: dict[int, list[Record]]
    reference: ReferenceResult
    tables: Tables


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def new_job(base: Path, source: str, name: str, **kwargs: Any) -> Job:
    """A job with its own folders and database under ``base``."""
    folder = base / name
    return Job(
        source=source,
        sink_dir=folder / "ch",
        checkpoint_dir=folder / "ckpt",
        logs=folder / "logs",
        database=unique("db"),
        **kwargs,
    )


# ---------------------------------------------------------------------------- file source


@pytest.fixture(scope="module")
def file_baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """A synthetic NDJSON file, its reference tables and one uninterrupted run's tables."""
    base = tmp_path_factory.mktemp("file-baseline")
    path = base / "clicks.ndjson"
    path.write_bytes(b"".join(generate_ndjson_chunks(FILE_EVENTS, SEED)))
    lines = path.read_bytes().split(b"\n")[:-1]
    records = {0: [(offset, 0, line) for offset, line in enumerate(lines)]}
    reference = reference_run(records)
    job = new_job(base, f"file:{path}", "uninterrupted", batch_size=100)
    job.run_ok()
    tables = job.tables()
    assert_tables_equal(tables, reference.tables)
    return Baseline(f"file:{path}", records, reference, tables)


# (crash point, checkpoint interval): every kind of point, early and late, with a checkpoint
# after every batch and with several batches replayed after the crash; rows wait for the
# checkpoint, so with 1h only the run's end inserts anything.
FILE_CRASHES = [
    ("after_sink_write:1", "0"),
    ("after_sink_write:17", "0"),
    ("after_batch:12", "1h"),
    # the one insert of a run that checkpoints only at its end (every batch and the flush)
    ("after_sink_write:1", "1h"),
    ("during_snapshot:1", "0"),
    ("during_snapshot:14", "0"),
    ("after_checkpoint:2", "0"),
    ("after_checkpoint:23", "0"),
]


@pytest.mark.parametrize(("crash_at", "interval"), FILE_CRASHES)
def test_file_run_killed_at_a_crash_point_resumes_exactly(
    file_baseline: Baseline, tmp_path: Path, crash_at: str, interval: str
) -> None:
    job = new_job(
        tmp_path,
        file_baseline.source,
        "crashed",
        batch_size=100,
        options=("--checkpoint-interval", interval),
    )
    job.crash_then_recover(crash_at)
    assert_same_tables(job.tables(), file_baseline.tables)


def test_file_run_killed_over_and_over_resumes_exactly(
    file_baseline: Baseline, tmp_path: Path
) -> None:
    """Every run dies at its third batch write, so the job advances two batches per life."""
    job = new_job(
        tmp_path,
        file_baseline.source,
        "crashed",
        batch_size=400,
        options=("--checkpoint-interval", "0"),
    )
    crashes = job.crash_then_recover("after_sink_write:3", repeat=True)
    assert crashes >= 3
    assert_same_tables(job.tables(), file_baseline.tables)


def test_a_completed_file_job_rerun_changes_nothing(
    file_baseline: Baseline, tmp_path: Path
) -> None:
    """A rerun of a complete job is a no-op, and ``--fresh`` rewrites identical blocks."""
    job = new_job(tmp_path, file_baseline.source, "rerun", batch_size=100)
    job.run_ok()
    job.run_ok()
    job.with_options("--fresh").run_ok()
    assert_same_tables(job.tables(), file_baseline.tables)


# ---------------------------------------------------------------------------- a failing sink


class InjectedInsertFailure:
    """Makes inserts of the real chdb loader fail: for chosen tables, the first ``times``
    inserts of each token raise ``error``, either before the rows reach ClickHouse or after
    they were stored (the client lost the answer)."""

    def __init__(
        self, tables: set[str], error: Exception, *, after_write: bool, times: int = 1
    ) -> None:
        self.tables = tables
        self.error = error
        self.after_write = after_write
        self.times = times
        self.calls: dict[str, int] = {}
        self.raised = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = clickhouse._ChdbPythonLoader.insert
        injector = self

        def insert(loader: Any, table: str, block: pa.Table, settings: dict[str, Any]) -> None:
            name = table.rsplit(".", 1)[-1]
            token = str(settings["insert_deduplication_token"])
            seen = injector.calls[token] = injector.calls.get(token, 0) + 1
            fail = name in injector.tables and seen <= injector.times
            if fail and not injector.after_write:
                injector.raised += 1
                raise injector.error
            real(loader, table, block, settings)
            if fail:
                injector.raised += 1
                raise injector.error

        monkeypatch.setattr(clickhouse._ChdbPythonLoader, "insert", insert)


def file_config(baseline: Baseline, folder: Path, **changes: Any) -> RunConfig:
    return dataclasses.replace(
        RunConfig(),
        source=baseline.source,
        sink=f"chdb://{folder / 'ch'}",
        database=unique("db"),
        checkpoint_dir=str(folder / "ckpt"),
        batch_size=250,
        progress="never",
        **changes,
    )


def run_in_process(config: RunConfig, backend: Backend, retry: RetryPolicy) -> Tables:
    """Run a job in this process with a real chdb sink; its tables (the sink closed after)."""
    sink = ClickHouseSink(
        dataclasses.replace(parse_sink_url(config.sink, config.database), retry=retry)
    )
    pipeline = Pipeline(config, sink=sink, backend=backend)
    try:
        pipeline.run()
    finally:
        pipeline.close()
    return read_tables(Path(config.sink.removeprefix("chdb://")), config.database)


FAST_RETRY = RetryPolicy(attempts=4, first_backoff_s=0.01, max_backoff_s=0.05)


@pytest.mark.parametrize("after_write", [False, True], ids=["before-write", "after-write"])
def test_a_transient_insert_failure_is_retried_and_loses_nothing(
    file_baseline: Baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu_backend: Backend,
    after_write: bool,
) -> None:
    error = ch_errors.OperationalError("connection reset by peer (injected)")
    assert is_transient(error)
    injector = InjectedInsertFailure({"events", "sessions"}, error, after_write=after_write)
    injector.install(monkeypatch)
    tables = run_in_process(file_config(file_baseline, tmp_path), cpu_backend, FAST_RETRY)
    assert injector.raised >= 2, "no insert failed: the injection did not happen"
    failed = [t for t, n in injector.calls.items() if n > 1]
    assert failed and all(injector.calls[t] == 2 for t in failed), "each failure retried once"
    assert_same_tables(tables, file_baseline.tables)


def test_an_insert_failing_for_good_stops_the_run_and_a_restart_completes_it(
    file_baseline: Baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu_backend: Backend,
) -> None:
    """A transient error that outlasts the retries fails the run with a SinkError (after the
    rows of that insert were stored); the job's next run resumes from its checkpoint."""
    error = ch_errors.OperationalError("server went away (injected)")
    injector = InjectedInsertFailure(
        {"traffic_1m"}, error, after_write=True, times=FAST_RETRY.attempts
    )
    injector.install(monkeypatch)
    config = file_config(file_baseline, tmp_path, checkpoint_interval_ms=0)
    with pytest.raises(SinkError, match="after 4 attempts"):
        run_in_process(config, cpu_backend, FAST_RETRY)
    monkeypatch.undo()
    tables = run_in_process(config, cpu_backend, FAST_RETRY)
    assert_same_tables(tables, file_baseline.tables)


def test_a_non_transient_insert_error_is_not_retried(
    file_baseline: Baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu_backend: Backend,
) -> None:
    error = ch_errors.DatabaseError("Code: 60. Unknown table (injected)")
    assert not is_transient(error)
    injector = InjectedInsertFailure({"events"}, error, after_write=False)
    injector.install(monkeypatch)
    with pytest.raises(SinkError, match="Unknown table"):
        run_in_process(file_config(file_baseline, tmp_path), cpu_backend, FAST_RETRY)
    assert max(injector.calls.values()) == 1


# ---------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="module")
def kafka_baseline(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Baseline]:
    """A synthetic topic, its reference tables and one uninterrupted run's tables."""
    base = tmp_path_factory.mktemp("kafka-baseline")
    topic = unique("recovery")
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    url = f"kafka://{kafka_bootstrap}/{topic}"
    produce_synthetic(url, KAFKA_EVENTS, SEED, partitions=PARTITIONS)
    records = read_partitions(kafka_bootstrap, topic, PARTITIONS)
    reference = reference_run(records, Semantics(), source=f"kafka:{topic}")
    job = new_job(base, url, "uninterrupted", group_id=unique("group"), batch_size=100)
    job.run_ok()
    tables = job.tables()
    assert_tables_equal(tables, reference.tables)
    yield Baseline(url, records, reference, tables)


def kafka_job(baseline: Baseline, folder: Path, **kwargs: Any) -> Job:
    """A fresh consumer group on the baseline's topic; batches cut by time as well as size."""
    settings: dict[str, Any] = {
        "group_id": unique("group"),
        "batch_size": 70,
        "options": ("--checkpoint-interval", "0", "--max-batch-wait", "20ms"),
    }
    settings.update(kwargs)
    return new_job(folder, baseline.source, "job", **settings)


KAFKA_CRASHES = ["after_sink_write:9", "during_snapshot:7", "after_checkpoint:5"]


@pytest.mark.kafka
@pytest.mark.parametrize("crash_at", KAFKA_CRASHES)
def test_kafka_run_killed_at_a_crash_point_resumes_exactly(
    kafka_baseline: Baseline, tmp_path: Path, crash_at: str
) -> None:
    job = kafka_job(kafka_baseline, tmp_path)
    job.crash_then_recover(crash_at)
    assert_same_tables(job.tables(), kafka_baseline.tables)


@pytest.mark.kafka
def test_kafka_run_sigkilled_at_random_moments_resumes_exactly(
    kafka_baseline: Baseline, tmp_path: Path
) -> None:
    """kill -9 a streaming run twice, once it has committed a random share of the topic
    (plus a random instant), then finish the job with a bounded run."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    job = kafka_job(kafka_baseline, tmp_path, batch_size=20, until_idle=False)
    bootstrap, topic, _ = parse_kafka_url(kafka_baseline.source)
    total = sum(len(records) for records in kafka_baseline.records.values())

    def committed_at_least(needed: float) -> bool:
        offsets = committed_offsets(bootstrap, job.group_id, topic, PARTITIONS)
        return sum(max(0, offset) for offset in offsets.values()) >= needed

    for share in sorted(rng.uniform(0.1, 0.9) for _ in range(2)):
        child = job.start()
        try:
            wait_until(
                partial(committed_at_least, share * total),
                f"{share:.0%} of the topic committed (seed {seed})",
                alive=[(job, child)],
            )
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            terminate(child, signal.SIGKILL)
        assert job.wait(child) == -signal.SIGKILL, job.log_tail()
    job.with_options(*job.options, until_idle=True).run_ok()
    try:
        assert_same_tables(job.tables(), kafka_baseline.tables)
    except AssertionError as exc:
        raise AssertionError(f"kill times drawn with seed {seed}: {exc}") from None


def test_baselines_count_every_kind_of_row(file_baseline: Baseline) -> None:
    """The input exercises what recovery must keep exact: every table has rows."""
    counts = {name: t.num_rows for name, t in file_baseline.tables.items()}
    assert all(counts.values()), counts
    assert file_baseline.reference.stats["duplicates"] > 0
    events = canonical("events", file_baseline.tables["events"])
    assert events.num_rows == file_baseline.reference.stats["on_time"]

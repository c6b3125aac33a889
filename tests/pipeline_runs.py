"""Drive whole pipeline runs the way a user does, and read back what they wrote.

The pipeline-level tests run ``gpu-pipeline run`` as a child process (so that a crash, a
SIGKILL or a SIGTERM hits a real process with its own embedded ClickHouse), then open the
chdb folder in the test process once the child has exited (chdb serves a data folder to
one process at a time) and compare every table with the reference model or with another
run.  Kafka helpers produce and read topics with confluent-kafka directly, never through
the code under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from gpu_pipeline import schema
from gpu_pipeline.sinks.clickhouse import ClickHouseSink, parse_sink_url
from tests.engine_harness import assert_table_equal
from tests.reference import Record, canonical, keep_final_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
CRASH_EXIT = 137
"""Exit status of an injected crash (``os._exit(137)``, what a shell reports for kill -9)."""
RUN_TIMEOUT_S = 120.0
WAIT_S = 90.0
Tables = dict[str, pa.Table]


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Job:
    """One pipeline job: the same ``Job`` run again resumes from its checkpoints.

    ``sink_dir`` and ``checkpoint_dir`` are the job's own folders; ``options`` are extra
    ``gpu-pipeline run`` arguments.
    """

    source: str
    sink_dir: Path
    checkpoint_dir: Path
    logs: Path
    database: str = "clickstream"
    group_id: str = "gpu-pipeline"
    batch_size: int = 100
    until_idle: bool = True
    options: tuple[str, ...] = ()
    runs: list[int] = field(default_factory=list, compare=False)

    def argv(self) -> list[str]:
        """The command line of this job."""
        argv = [
            sys.executable,
            "-m",
            "gpu_pipeline.cli",
            "run",
            "--source",
            self.source,
            "--sink",
            f"chdb://{self.sink_dir}",
            "--database",
            self.database,
            "--checkpoint-dir",
            str(self.checkpoint_dir),
            "--batch-size",
            str(self.batch_size),
            "--engine",
            "cpu",
            "--progress",
            "never",
        ]
        if self.source.startswith("kafka://"):
            if self.group_id:  # empty: the default, one consumer group per job
                argv += ["--group-id", self.group_id]
            argv += ["--idle-timeout", "1s"]
            if self.until_idle:
                argv.append("--until-idle")
        return argv + list(self.options)

    def with_options(self, *options: str, until_idle: bool | None = None) -> Job:
        """The same job (same folders) with other extra options."""
        return replace(
            self,
            options=options,
            until_idle=self.until_idle if until_idle is None else until_idle,
            runs=self.runs,
        )

    def start(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        """Start one run in the background; its output goes to a numbered log file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_")}
        if "GPU_PIPELINE_CACHE_DIR" in os.environ:
            env["GPU_PIPELINE_CACHE_DIR"] = os.environ["GPU_PIPELINE_CACHE_DIR"]
        if crash_at is not None:
            env["GPU_PIPELINE_CRASH_AT"] = crash_at
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs.append(0)
        log = open(self.log_path(len(self.runs)), "wb")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
            )
        finally:
            log.close()

    def log_path(self, number: int) -> Path:
        return self.logs / f"run-{number}.log"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the latest run's output, for assertion messages."""
        if not self.runs:
            return "(never ran)"
        return self.log_path(len(self.runs)).read_text(errors="replace")[-chars:]

    def wait(self, child: subprocess.Popen[bytes], timeout_s: float = RUN_TIMEOUT_S) -> int:
        """Wait for a run started by :meth:`start`; its exit status (killed if it hangs)."""
        try:
            code = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise AssertionError(
                f"the run took over {timeout_s} s and was killed:\n{self.log_tail()}"
            ) from None
        self.runs[-1] = code
        return code

    def run(self, crash_at: str | None = None, timeout_s: float = RUN_TIMEOUT_S) -> int:
        """Run once in the foreground; the exit status."""
        return self.wait(self.start(crash_at), timeout_s)

    def run_ok(self) -> None:
        """Run once and insist on success."""
        code = self.run()
        assert code == 0, f"run exited with {code}:\n{self.log_tail()}"

    def crash_then_recover(self, crash_at: str, *, repeat: bool = False, max_runs: int = 40) -> int:
        """Run with ``GPU_PIPELINE_CRASH_AT=crash_at`` (it must crash), then restart until a
        run exits 0: without the variable, or with it again when ``repeat``.

        Returns the number of crashes.
        """
        code = self.run(crash_at)
        assert code == CRASH_EXIT, (
            f"GPU_PIPELINE_CRASH_AT={crash_at} did not crash the run (exit {code}):\n"
            f"{self.log_tail()}"
        )
        crashes = 1
        for _ in range(max_runs):
            code = self.run(crash_at if repeat else None)
            if code == 0:
                return crashes
            assert code == CRASH_EXIT, f"restart exited with {code}:\n{self.log_tail()}"
            crashes += 1
        raise AssertionError(f"no run completed within {max_runs} restarts")

    def tables(self) -> Tables:
        """Every output table of this job (read once no run of it is alive)."""
        return read_tables(self.sink_dir, self.database)


def terminate(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a child that is still running (never to anything else)."""
    if child.poll() is None:
        os.kill(child.pid, sig)


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout_s: float = WAIT_S,
    alive: Sequence[tuple[Job, subprocess.Popen[bytes]]] = (),
) -> None:
    """Poll ``condition``; fail naming ``what`` on timeout or when a watched run dies."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for job, child in alive:
            code = child.poll()
            if code is not None:
                raise AssertionError(
                    f"waiting for {what}: the run exited with {code}:\n{job.log_tail()}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- tables


def read_tables(sink_dir: Path, database: str) -> Tables:
    """Every output table of a chdb folder, versioned tables through ``FINAL``, sorted."""
    sink = ClickHouseSink(parse_sink_url(f"chdb://{sink_dir}", database))
    sink.open()
    try:
        tables: Tables = {}
        for name, table_schema in schema.OUTPUT_TABLES.items():
            columns = ", ".join(f"`{column}`" for column in table_schema.names)
            final = " FINAL" if name in schema.VERSIONED_TABLES else ""
            rows = sink.query(f"SELECT {columns} FROM {database}.{name}{final}")
            tables[name] = canonical(name, rows)
        return tables
    finally:
        sink.close()


def combine(parts: Iterable[Tables]) -> Tables:
    """Tables written by several processes into separate folders, as one store would hold
    them: rows unioned, versioned tables reduced to each window row's highest version."""
    parts = list(parts)
    combined: Tables = {}
    for name in schema.OUTPUT_TABLES:
        table = pa.concat_tables([part[name] for part in parts])
        if name in schema.VERSIONED_TABLES:
            table = keep_final_versions(name, table)
        combined[name] = canonical(name, table)
    return combined


def assert_same_tables(actual: Mapping[str, pa.Table], expected: Mapping[str, pa.Table]) -> None:
    """Every table equal to another run's, row by row, every column (dead letters' wording and
    ``source`` included)."""
    for name in schema.OUTPUT_TABLES:
        assert_table_equal(name, actual[name], expected[name])


def row_counts(tables: Mapping[str, pa.Table]) -> dict[str, int]:
    """Rows per table, for messages."""
    return {name: table.num_rows for name, table in tables.items()}


# ---------------------------------------------------------------------------- Kafka


def produce(
    bootstrap: str, topic: str, messages: Sequence[tuple[int, bytes | None]]
) -> list[tuple[int, int]]:
    """Send ``(partition, value)`` pairs in order; the acknowledged ``(partition, offset)`` s."""
    acked: list[tuple[int, int]] = []
    failures: list[str] = []

    def delivered(error: KafkaError | None, message: object) -> None:
        if error is not None:
            failures.append(error.str())
        else:
            acked.append((message.partition(), message.offset()))  # type: ignore[attr-defined]

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "enable.idempotence": True,
            "message.max.bytes": 10 << 20,
        }
    )
    for partition, value in messages:
        while True:
            try:
                producer.produce(topic, value, partition=partition, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(WAIT_S) == 0, "not every message was delivered"
    assert not failures, failures[:3]
    return acked


def split_message(offset: int, value: bytes | None) -> list[Record]:
    """The records of one message as the Kafka source frames them: one per line (a trailing
    newline adds none), and one empty record for an empty or null value."""
    data = value or b""
    if data.endswith(b"\n"):
        data = data[:-1]
    return [(offset, seq, line) for seq, line in enumerate(data.split(b"\n"))]


def read_partitions(bootstrap: str, topic: str, partitions: int) -> dict[int, list[Record]]:
    """Every record of the topic, per partition in offset order, with its message timestamp
    (the reference's input)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
            "fetch.message.max.bytes": 10 << 20,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: dict[int, list[Record]] = {p: [] for p in range(partitions)}
    at_end: set[int] = set()
    deadline = time.monotonic() + WAIT_S
    try:
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"topic {topic} was not read to its end"
            for message in consumer.consume(10_000, 0.2):
                error = message.error()
                partition = message.partition() or 0
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                    continue
                assert error is None, error
                stamp = max(0, message.timestamp()[1])
                records[partition] += [
                    (*record, stamp)
                    for record in split_message(message.offset() or 0, message.value())
                ]
                at_end.discard(partition)
    finally:
        consumer.close()
    return records


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The high watermark (next offset) of every partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{topic}"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1 where none), read without joining the group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 10)
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


def group_caught_up(bootstrap: str, group: str, topic: str, partitions: int) -> Callable[[], bool]:
    """A condition: the group has committed every partition up to its end."""

    def check() -> bool:
        ends = end_offsets(bootstrap, topic, partitions)
        return committed_offsets(bootstrap, group, topic, partitions) == ends

    return check


def produce_keyed(bootstrap: str, topic: str, lines: Sequence[bytes]) -> None:
    """Send NDJSON lines one per message, keyed by ``user_id`` as ``gpu-pipeline generate``
    does (null key for a line without one), with the client's default partitioner."""
    from gpu_pipeline.sources.kafka_producer import user_key

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
    )
    for line in lines:
        while True:
            try:
                producer.produce(topic, line, user_key(line))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(WAIT_S) == 0, "not every message was delivered"


def group_assignment(bootstrap: str, group: str) -> list[list[int]]:
    """The partitions each member of ``group`` holds now (one sorted list per member)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group])[group].result(10)
    return sorted(
        sorted(tp.partition for tp in member.assignment.topic_partitions)
        for member in description.members
    )

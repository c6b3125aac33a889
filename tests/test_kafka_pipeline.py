"""The whole pipeline on the real Kafka broker and the real embedded ClickHouse.

Each test produces into its own topic, runs ``gpu-pipeline run --source kafka://…`` as a
child process with its own consumer group, checkpoint folder and chdb folder, then reads
the topic back with confluent-kafka and compares every ClickHouse table (versioned tables
through ``FINAL``) with the reference model run on those very partitions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sources.kafka_producer import produce_synthetic
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from tests.engine_harness import assert_tables_equal, engine_run, without_ingest_lag
from tests.kafka_broker import create_topic, owns_broker, restart_broker
from tests.pipeline_runs import (
    REPO_ROOT,
    Job,
    combine,
    group_assignment,
    group_caught_up,
    produce,
    produce_keyed,
    read_partitions,
    terminate,
    wait_until,
)
from tests.reference import Record, ReferenceResult, keep_final_versions, reference_run

pytestmark = pytest.mark.kafka

PARTITIONS = 3
EVENTS = 3000


@dataclass
class Topic:
    """A topic, its records per partition (read back from the broker) and their reference."""

    bootstrap: str
    name: str
    partitions: int
    records: dict[int, list[Record]]
    reference: ReferenceResult

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}/{self.name}"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def new_topic(bootstrap: str, partitions: int) -> str:
    name = unique("pipeline")
    create_topic(bootstrap, name, partitions)
    return name


def read_topic(bootstrap: str, name: str, partitions: int) -> Topic:
    """What the topic now holds, and the reference tables of that input."""
    records = read_partitions(bootstrap, name, partitions)
    reference = reference_run(records, Semantics(), source=f"kafka:{name}")
    return Topic(bootstrap, name, partitions, records, reference)


def new_job(folder: Path, topic: Topic | str, **kwargs: object) -> Job:
    """A job with its own consumer group, folders and database (unless given)."""
    url = topic.url if isinstance(topic, Topic) else topic
    settings: dict[str, object] = {
        "group_id": unique("group"),
        "database": unique("db"),
        "checkpoint_dir": folder / "ckpt",
    }
    settings.update(kwargs)
    return Job(source=url, sink_dir=folder / "ch", logs=folder / "logs", **settings)  # type: ignore[arg-type]


def synthetic_lines(events: int, seed: int) -> list[bytes]:
    data = b"".join(generate_ndjson_chunks(events, seed))
    return data.split(b"\n")[:-1]


@pytest.fixture(scope="module")
def synthetic(kafka_bootstrap: str) -> Topic:
    """The synthetic clickstream produced into a 3-partition topic, keyed by user."""
    name = new_topic(kafka_bootstrap, PARTITIONS)
    produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", EVENTS, 5, partitions=PARTITIONS)
    return read_topic(kafka_bootstrap, name, PARTITIONS)


def cli_query(job: Job, sql: str) -> list[dict[str, object]]:
    """``gpu-pipeline query --format json`` in a child process (the run has exited)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_pipeline.cli",
            "query",
            "--sink",
            f"chdb://{job.sink_dir}",
            "--database",
            job.database,
            "--format",
            "json",
            sql,
        ],
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- round trip


def test_round_trip_equals_the_reference_and_the_engine(
    synthetic: Topic, tmp_path: Path, cpu_backend: Backend
) -> None:
    job = new_job(tmp_path, synthetic, batch_size=150)
    job.run_ok()
    tables = job.tables()

    assert_tables_equal(tables, synthetic.reference.tables)
    engine = engine_run(synthetic.records, Semantics(), cpu_backend, 150, source=synthetic.name)
    assert_tables_equal(tables, engine.tables)

    counts = cli_query(
        job,
        f"SELECT partition, count() AS n FROM {job.database}.events "
        "GROUP BY partition ORDER BY partition",
    )
    expected = synthetic.reference.tables["events"]["partition"].value_counts().to_pylist()
    assert {row["partition"]: row["n"] for row in counts} == {
        item["values"]: item["counts"] for item in expected
    }


def as_partition(tables: dict[str, pa.Table], partition: int) -> dict[str, pa.Table]:
    """A file run's tables (partition 0) relabelled as ``partition``."""
    relabelled = {}
    for name, table in tables.items():
        index = table.schema.get_field_index("partition")
        column = pa.array([partition] * table.num_rows, pa.int32())
        relabelled[name] = table.set_column(index, table.schema.field(index), column)
    return relabelled


def only_partition(tables: dict[str, pa.Table], partition: int) -> dict[str, pa.Table]:
    return {
        name: table.filter(pc.equal(table["partition"], partition))
        for name, table in tables.items()
    }


def test_each_partition_equals_its_stream_run_from_a_file(synthetic: Topic, tmp_path: Path) -> None:
    """Partition p's rows of a Kafka run are what a run over a file of p's messages writes."""
    job = new_job(tmp_path / "kafka", synthetic, batch_size=200)
    job.run_ok()
    kafka_tables = job.tables()
    for partition, records in synthetic.records.items():
        assert [r[0] for r in records] == list(range(len(records))), "offsets with gaps"
        assert records, f"partition {partition} got no events: the test proves little"
        path = tmp_path / f"p{partition}.ndjson"
        path.write_bytes(b"".join(r[2] + b"\n" for r in records))
        from_file = Job(
            source=f"file:{path}",
            sink_dir=tmp_path / f"file{partition}" / "ch",
            checkpoint_dir=tmp_path / f"file{partition}" / "ckpt",
            logs=tmp_path / f"file{partition}" / "logs",
            database=unique("db"),
            batch_size=130,
        )
        from_file.run_ok()
        # a file has no message timestamps: everything but the ingest lag must agree
        assert_tables_equal(
            without_ingest_lag(only_partition(kafka_tables, partition)),
            as_partition(from_file.tables(), partition),
        )


# ---------------------------------------------------------------------------- SIGTERM


def written_before_end(reference: ReferenceResult) -> dict[str, pa.Table]:
    """What a run writes before end of input: every event, late event and dead letter, the
    sessions the watermark closed, the window rows the watermark wrote (final version), and
    the quality counts of all but a suspect held to the end."""
    closed = {
        (c.partition, c.session_id) for c in reference.session_closes if c.closed_after is not None
    }
    sessions = reference.tables["sessions"]
    keep = [(r["partition"], r["session_id"]) in closed for r in sessions.to_pylist()]
    tables = dict(reference.tables)
    tables["sessions"] = sessions.filter(pa.array(keep, pa.bool_()))
    for name in schema.VERSIONED_TABLES:
        rows = [w.row for w in reference.window_writes if w.table == name and w.written_after]
        table = pa.Table.from_pylist(rows, schema=schema.OUTPUT_TABLES[name])
        tables[name] = keep_final_versions(name, table)
    tables["quality_1m"] = reference.quality_before_end
    return tables


def test_sigterm_stops_without_flushing_and_a_restart_completes(
    synthetic: Topic, tmp_path: Path
) -> None:
    job = new_job(
        tmp_path,
        synthetic,
        batch_size=100,
        until_idle=False,
        options=("--checkpoint-interval", "0"),
    )
    child = job.start()
    wait_until(
        group_caught_up(synthetic.bootstrap, job.group_id, synthetic.name, PARTITIONS),
        "the streaming run to commit every partition to its end",
        alive=[(job, child)],
    )
    terminate(child)
    assert job.wait(child, 60) == 0, job.log_tail()
    assert "stopped" in job.log_tail()

    stopped = job.tables()
    assert_tables_equal(stopped, written_before_end(synthetic.reference))
    assert stopped["sessions"].num_rows < synthetic.reference.tables["sessions"].num_rows

    job.with_options(until_idle=True).run_ok()
    assert_tables_equal(job.tables(), synthetic.reference.tables)


# ---------------------------------------------------------------------------- broker restart


def test_the_run_rides_out_a_broker_restart(kafka_bootstrap: str, tmp_path: Path) -> None:
    if not owns_broker():
        pytest.skip("the broker belongs to KAFKA_BOOTSTRAP's owner; a restart needs our own")
    name = new_topic(kafka_bootstrap, PARTITIONS)
    lines = synthetic_lines(2000, 8)
    produce_keyed(kafka_bootstrap, name, lines[:1000])
    job = new_job(
        tmp_path,
        f"kafka://{kafka_bootstrap}/{name}",
        batch_size=100,
        until_idle=False,
        options=("--checkpoint-interval", "0"),
    )
    child = job.start()
    try:
        caught_up = group_caught_up(kafka_bootstrap, job.group_id, name, PARTITIONS)
        wait_until(caught_up, "the first half", alive=[(job, child)])
        restart_broker()
        produce_keyed(kafka_bootstrap, name, lines[1000:])
        wait_until(caught_up, "the second half, after the restart", alive=[(job, child)])
        terminate(child)
        assert job.wait(child, 60) == 0, job.log_tail()
    finally:
        terminate(child)
        job.wait(child, 60)
    job.with_options(until_idle=True).run_ok()
    topic = read_topic(kafka_bootstrap, name, PARTITIONS)
    assert_tables_equal(job.tables(), topic.reference.tables)


# ---------------------------------------------------------------------------- rebalance


def test_a_second_process_joins_and_leaves_and_nothing_is_lost_or_doubled(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two processes of one job (same ``--job-id``, group and checkpoint folder, each its
    own chdb folder): the second joins mid-run and takes partitions with their state, then
    leaves and gives them back.  The two folders together hold exactly the reference tables.

    The processes use KIP-848's ``group.protocol=consumer``: the default classic protocol
    makes each process a static member named after its checkpoint folder, and two static
    members with one name fence each other.
    """
    partitions = 4
    name = new_topic(kafka_bootstrap, partitions)
    url = f"kafka://{kafka_bootstrap}/{name}?group.protocol=consumer"
    lines = synthetic_lines(EVENTS, 9)
    job_name = unique("job")
    shared = {
        "group_id": unique("group"),
        "database": unique("db"),
        "checkpoint_dir": tmp_path / "ckpt",
        "batch_size": 50,
        "until_idle": False,
        "options": ("--checkpoint-interval", "0", "--job-id", job_name),
    }
    first = new_job(tmp_path / "first", url, **shared)
    second = new_job(tmp_path / "second", url, **shared)
    group = str(shared["group_id"])
    caught_up = group_caught_up(kafka_bootstrap, group, name, partitions)

    produce_keyed(kafka_bootstrap, name, lines[:1000])
    a = first.start()
    b = None
    try:
        wait_until(caught_up, "phase 1", alive=[(first, a)])
        b = second.start()
        wait_until(
            lambda: (
                len(group_assignment(kafka_bootstrap, group)) == 2
                and all(group_assignment(kafka_bootstrap, group))
            ),
            "the second process to get partitions",
            alive=[(first, a), (second, b)],
        )
        produce_keyed(kafka_bootstrap, name, lines[1000:2000])
        wait_until(caught_up, "phase 2", alive=[(first, a), (second, b)])
        terminate(b)
        assert second.wait(b, 60) == 0, second.log_tail()
        wait_until(
            lambda: group_assignment(kafka_bootstrap, group) == [list(range(partitions))],
            "the first process to get every partition back",
            alive=[(first, a)],
        )
        produce_keyed(kafka_bootstrap, name, lines[2000:])
        wait_until(caught_up, "phase 3", alive=[(first, a)])
        terminate(a)
        assert first.wait(a, 60) == 0, first.log_tail()
    finally:
        for job, child in ((first, a), (second, b)):
            if child is not None and child.poll() is None:
                terminate(child)
                job.wait(child, 60)

    # End of input: a bounded run of the same job flushes what is still open.
    first.with_options("--checkpoint-interval", "0", "--job-id", job_name, until_idle=True).run_ok()
    topic = read_topic(kafka_bootstrap, name, partitions)
    second_tables = second.tables()
    assert second_tables["events"].num_rows, "the second process processed nothing"
    assert_tables_equal(combine([first.tables(), second_tables]), topic.reference.tables)


# ---------------------------------------------------------------------------- bad input


def event(i: int, partition: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"ok-{partition}-{i}",
            "user_id": 100 + partition,
            "ts": 1_795_600_000_000 + 1000 * i,
            "event_type": "page_view",
            "page": f"/p/{i}",
        }
    )


def bad_messages(partition: int) -> list[tuple[str, bytes | None]]:
    """Every kind of bad payload, each followed by a valid event."""
    huge = orjson.dumps(
        {
            "event_id": f"huge-{partition}",
            "user_id": 1,
            "ts": 1_795_600_000_000,
            "event_type": "page_view",
            "referrer": "x" * (2 << 20),
        }
    )
    bad_utf8 = (
        b'{"event_id":"bad-\xff\xfe","user_id":3,"ts":1795600000000,"event_type":"page_view"}'
    )
    return [
        ("garbage", bytes(range(256)).replace(b"\n", b"")),
        ("empty", b""),
        ("null", None),
        ("invalid utf-8", bad_utf8),
        ("truncated", b'{"event_id":"t","user_id":'),
        ("not an object", b"[1,2,3]"),
        ("2 MB", huge),
        ("binary zeros", b"\x00" * 64),
    ]


def test_bad_payloads_become_dead_letters_and_the_run_goes_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    partitions = 2
    name = new_topic(kafka_bootstrap, partitions)
    messages: list[tuple[int, bytes | None]] = []
    sent_bad: dict[tuple[int, int], tuple[str, bytes]] = {}
    valid: list[bytes] = []
    for partition in range(partitions):
        offset = 0
        for i, (kind, payload) in enumerate(bad_messages(partition)):
            sent_bad[(partition, offset)] = (kind, payload or b"")
            good = event(i, partition)
            messages += [(partition, payload), (partition, good)]
            valid.append(good)
            offset += 2
        # Several events in one message, the middle one bad: its neighbours still count.
        lines = [event(100, partition), b"{oops", event(101, partition)]
        valid += [lines[0], lines[2]]
        messages.append((partition, b"\n".join(lines) + b"\n"))
        sent_bad[(partition, offset)] = ("bad line of an NDJSON message", b"{oops")
    acked = produce(kafka_bootstrap, name, messages)
    assert len(acked) == len(messages)

    job = new_job(tmp_path, f"kafka://{kafka_bootstrap}/{name}", batch_size=4)
    job.run_ok()
    tables = job.tables()
    topic = read_topic(kafka_bootstrap, name, partitions)
    assert_tables_equal(tables, topic.reference.tables)

    dead = {(r["partition"], r["offset"]): r for r in tables["dead_letters"].to_pylist()}
    assert set(dead) == set(sent_bad)
    for position, (kind, raw) in sent_bad.items():
        row = dead[position]
        assert row["raw"] == raw, kind
        assert row["error"], kind
        assert row["source"] == f"kafka:{name}", kind
        assert row["seq"] == (1 if raw == b"{oops" else 0), kind
    ids = set(tables["events"]["event_id"].to_pylist())
    assert {orjson.loads(v)["event_id"] for v in valid} <= ids

"""``quality_1m``: data-quality counts per minute, checked three ways.

* Engine vs reference model, on random streams with source timestamps and at every batch
  cut around the one place where a record's minute could depend on batching (a dead letter
  right after a suspect the event-time guard holds across batches).
* A real run into chdb: ``quality_1m_total`` against counts computed independently, from
  the input file and from the rows the other tables hold.
* Through a real Kafka broker with message timestamps set to a known delay after each
  event's time: the ingest-lag figures must be exactly those delays.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from tests.engine_harness import assert_tables_equal, engine_run
from tests.pipeline_runs import Job, read_partitions, read_tables
from tests.reference import Record, reference_run, validate_record
from tests.streams import BASE_TS_MS, StreamCase, record_streams

MINUTE = 60_000
DAY = 86_400_000


def _event(i: int, ts_ms: int, **extra: object) -> bytes:
    body = {"event_id": f"e{i}", "user_id": i % 3, "ts": ts_ms, "event_type": "page_view"}
    return json.dumps({**body, **extra}).encode()


def _stamped(case: StreamCase, seed: int) -> dict[int, list[Record]]:
    """The case's records with a source timestamp each (some missing: 0)."""
    rng = random.Random(seed)
    return {
        p: [
            (o, s, raw, rng.choice((0, BASE_TS_MS + rng.randrange(-MINUTE, 10 * MINUTE))))
            for o, s, raw in records
        ]
        for p, records in case.partitions.items()
    }


@settings(max_examples=80, deadline=None)
@given(case=record_streams(), batch_size=st.integers(1, 12), seed=st.integers(0, 1000))
def test_quality_counts_match_the_reference_with_source_timestamps(
    backend: Backend, case: StreamCase, batch_size: int, seed: int
) -> None:
    partitions = _stamped(case, seed)
    expected = reference_run(partitions, case.semantics)
    actual = engine_run(partitions, case.semantics, backend, batch_size)
    assert_tables_equal(actual.tables, expected.tables)
    assert (expected.tables["quality_1m"].num_rows > 0) == (case.records > 0)


@pytest.mark.parametrize("confirmed", [True, False], ids=["suspect-confirmed", "suspect-refuted"])
def test_a_dead_letter_after_a_held_suspect_lands_in_the_same_minute_at_every_cut(
    backend: Backend, confirmed: bool
) -> None:
    """Records: steady events, a far-future suspect, a dead letter, then the event that
    decides the suspect.  Every batch size cuts somewhere else around the suspect (it is held
    across batches when it ends one); the dead letter must land in the minute of the events
    before the suspect, never in the suspect's."""
    base = BASE_TS_MS
    lines = [_event(i, base + i * 20_000) for i in range(6)]
    suspect_ts = base + 2 * DAY
    lines.append(_event(6, suspect_ts))
    lines.append(b'{"event_id": "broken"')
    lines.append(_event(7, suspect_ts + 1000 if confirmed else base + 130_000))
    lines.append(b"not json")
    records = {0: [(o, 0, raw) for o, raw in enumerate(lines)]}
    expected = reference_run(records, Semantics())
    quality = {_epoch_ms(r["minute"]): r for r in expected.tables["quality_1m"].to_pylist()}
    first_dead = quality[(base + 100_000) // MINUTE * MINUTE]
    assert first_dead["dead_letters"] >= 1, quality
    in_suspect_minute = quality.get(suspect_ts // MINUTE * MINUTE, {"dead_letters": 0})
    assert in_suspect_minute["dead_letters"] == (1 if confirmed else 0), quality
    for batch_size in range(1, len(lines) + 1):
        actual = engine_run(records, Semantics(), backend, batch_size)
        assert_tables_equal(actual.tables, expected.tables)
        restored = engine_run(records, Semantics(), backend, batch_size, restore_every_batch=True)
        assert_tables_equal(restored.tables, expected.tables)


def test_dead_letters_before_the_partition_has_a_clock_land_in_1970(backend: Backend) -> None:
    lines = [b"garbage", _event(0, BASE_TS_MS), b"{}", _event(1, BASE_TS_MS + 1)]
    records = {0: [(o, 0, raw) for o, raw in enumerate(lines)]}
    expected = reference_run(records, Semantics())
    rows = {_epoch_ms(r["minute"]): r for r in expected.tables["quality_1m"].to_pylist()}
    # the first event is a suspect (nothing to compare it with), so "{}" still has no clock
    assert rows[0]["dead_letters"] == 2 and rows[0]["records"] == 2
    actual = engine_run(records, Semantics(), backend, 1)
    assert_tables_equal(actual.tables, expected.tables)


# ---------------------------------------------------------------------------- a real run


def _minute_of(ts_ms: int) -> int:
    return ts_ms // MINUTE * MINUTE


def _sql_rows(job: Job, sql: str) -> list[dict[str, object]]:
    from gpu_pipeline.sinks.clickhouse import ClickHouseSink, parse_sink_url

    sink = ClickHouseSink(parse_sink_url(f"chdb://{job.sink_dir}", job.database))
    sink.open()
    try:
        return sink.query(sql).to_pylist()
    finally:
        sink.close()


def _epoch_ms(value: object) -> int:
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)  # type: ignore[arg-type, attr-defined]


def test_quality_totals_equal_counts_made_from_the_input_and_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "clicks.ndjson"
    path.write_bytes(b"".join(generate_ndjson_chunks(30_000, 5)))
    lines = path.read_bytes().split(b"\n")[:-1]
    job = Job(
        source=f"file:{path}",
        sink_dir=tmp_path / "ch",
        checkpoint_dir=tmp_path / "ckpt",
        logs=tmp_path / "logs",
        database="quality",
        batch_size=777,
    )
    job.run_ok()
    db = job.database
    total = {
        _epoch_ms(r["minute"]): r for r in _sql_rows(job, f"SELECT * FROM {db}.quality_1m_total")
    }

    def per_minute(table: str, extra: str = "") -> dict[int, dict[str, object]]:
        sql = (
            f"SELECT intDiv(toUnixTimestamp64Milli(ts), {MINUTE}) * {MINUTE} AS m, "
            f"count() AS n{extra} FROM {db}.{table} GROUP BY m"
        )
        return {_epoch_ms(r["m"]): r for r in _sql_rows(job, sql)}

    fields = schema.QUALITY_FIELDS
    presence = "".join(f", countIf({f} IS NOT NULL) AS with_{f}" for f in fields)
    on_time = per_minute("events", presence)
    late = per_minute("late_events")
    # duplicates are dropped, so they are the valid lines no table holds, by their own ts
    stored = {
        int(r["offset"])
        for table in ("events", "late_events", "dead_letters")
        for r in _sql_rows(job, f"SELECT `offset` FROM {db}.{table}")
    }
    duplicates: Counter[int] = Counter()
    for offset, raw in enumerate(lines):
        if offset not in stored:
            event = validate_record(raw)
            assert not isinstance(event, str), (offset, event)
            duplicates[_minute_of(event.ts_ms)] += 1
    assert sum(duplicates.values()) > 100, "the stream has too few duplicates to prove much"

    for minute, row in on_time.items():
        q = total[minute]
        assert q["on_time"] == row["n"], minute
        for f in fields:
            assert q[f"{f}_completeness"] == pytest.approx(row[f"with_{f}"] / row["n"]), (minute, f)
    for minute in set(total) - set(on_time):
        assert total[minute]["on_time"] == 0
    assert {m: r["late"] for m, r in total.items() if r["late"]} == {
        m: r["n"] for m, r in late.items()
    }
    assert {m: r["duplicates"] for m, r in total.items() if r["duplicates"]} == dict(duplicates)
    for minute, q in total.items():
        assert q["events"] == q["duplicates"] + q["late"] + q["on_time"], minute
        assert q["records"] == q["events"] + q["dead_letters"], minute
        assert q["lag_events"] == 0 and q["avg_lag_ms"] is None  # a file has no record times
    dead = _sql_rows(job, f"SELECT count() AS n FROM {db}.dead_letters")[0]["n"]
    assert dead > 10
    assert sum(q["dead_letters"] for q in total.values()) == dead
    assert sum(q["records"] for q in total.values()) == len(lines)
    rates = [q["dead_letter_rate"] for q in total.values() if q["dead_letters"]]
    assert rates and all(0 < rate <= 1 for rate in rates)


# ---------------------------------------------------------------------------- Kafka


@pytest.mark.kafka
def test_ingest_lag_is_the_message_time_minus_the_event_time(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    from tests.kafka_broker import create_topic
    from tests.test_kafka_pipeline import new_job, unique

    topic = unique("quality")
    create_topic(kafka_bootstrap, topic, 2)
    lines = b"".join(generate_ndjson_chunks(3000, 9)).split(b"\n")[:-1]
    delay: dict[tuple[int, int], int] = {}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent: dict[int, int] = defaultdict(int)
    for i, line in enumerate(lines):
        event = validate_record(line)
        partition = i % 2
        lag = 500 + (i % 7) * 250  # a known, varied delay per message
        stamp = event.ts_ms + lag if not isinstance(event, str) else BASE_TS_MS
        delay[(partition, sent[partition])] = lag
        sent[partition] += 1
        producer.produce(topic, line, partition=partition, timestamp=stamp)
        producer.poll(0)
    assert producer.flush(30) == 0

    job = new_job(tmp_path, f"kafka://{kafka_bootstrap}/{topic}", batch_size=250)
    job.run_ok()
    tables = read_tables(job.sink_dir, job.database)
    records = read_partitions(kafka_bootstrap, topic, 2)
    assert_tables_equal(tables, reference_run(records, Semantics(), source=f"kafka:{topic}").tables)

    expected: dict[int, list[int]] = defaultdict(list)
    for row in tables["events"].to_pylist():
        expected[_minute_of(_epoch_ms(row["ts"]))].append(delay[(row["partition"], row["offset"])])
    total = {
        _epoch_ms(r["minute"]): r
        for r in _sql_rows(job, f"SELECT * FROM {job.database}.quality_1m_total")
    }
    assert len(expected) > 5
    for minute, lags in expected.items():
        q = total[minute]
        assert q["lag_events"] == len(lags) == q["on_time"], minute
        assert q["avg_lag_ms"] == pytest.approx(sum(lags) / len(lags)), minute
        assert q["max_lag_ms"] == max(lags), minute

"""The ClickHouse sink against the real embedded engine (chdb), and a server where one is given.

chdb hosts one data folder per process, so every sink a test opens is closed by its fixture.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from gpu_pipeline import schema
from gpu_pipeline.errors import ConfigError, SinkError
from gpu_pipeline.sinks import ddl
from gpu_pipeline.sinks.base import open_sink
from gpu_pipeline.sinks.clickhouse import (
    ClickHouseSink,
    Loader,
    RetryPolicy,
    call_with_retries,
    parse_sink_url,
)

DB = "clickstream"
T0 = 1_795_608_000_123  # 2026-11-25T12:00:00.123Z
MAX_I64 = 2**63 - 1
MAX_U64 = 2**64 - 1

ORDER_BY = {
    "events": "`offset`",
    "late_events": "`offset`",
    "dead_letters": "`offset`",
    "sessions": "session_id",
    "traffic_1m": "window_start, event_type, `partition`",
    "product_5m": "window_start, product_id, `partition`",
    "quality_1m": "minute, `partition`",
}


# ---- sample rows ------------------------------------------------------------------------


def _event_columns() -> dict[str, pa.Array]:
    return {
        "event_id": pa.array(["e-1", "é-ü-😀", "x" * 64]),
        "user_id": pa.array([0, 42, MAX_I64], pa.int64()),
        "ts": pa.array([0, T0, T0 + 59_999], schema.TS),
        "event_type": pa.array(["page_view", "purchase", "add_to_cart"]),
        "page": pa.array(["/", None, "/prodükt/😀?q='x'\\"]),
        "product_id": pa.array([None, 7, MAX_I64], pa.int64()),
        "category": pa.array([None, "shoes", "büch"]),
        "price": pa.array([None, 19.99, 0.0]),
        "quantity": pa.array([1, 3, 1_000_000], pa.int32()),
        "country": pa.array([None, "DE", "JP"]),
        "device": pa.array(["mobile", None, "tablet"]),
        "referrer": pa.array([None, "https://ex.com/a b", ""]),
    }


def _positions(n: int, first: int = 0) -> dict[str, pa.Array]:
    return {
        "partition": pa.array([i % 2 for i in range(n)], pa.int32()),
        "offset": pa.array(range(first, first + n), pa.int64()),
        "seq": pa.array([0] * n, pa.int32()),
    }


def sample_rows(table: str) -> pa.Table:
    """A few rows of ``table`` with edge values: nulls, unicode, extreme ids, epoch 0."""
    columns: dict[str, pa.Array]
    if table == "events":
        columns = {
            **_event_columns(),
            "session_id": pa.array([0, 1, MAX_U64], pa.uint64()),
            **_positions(3),
        }
    elif table == "late_events":
        columns = {
            **_event_columns(),
            "watermark": pa.array([T0, T0 + 1, T0 + 2], schema.TS),
            "reason": pa.array(["ts more than 60 s behind the watermark"] * 3),
            **_positions(3),
        }
    elif table == "dead_letters":
        columns = {
            "raw": pa.array(
                [b"\xff\xfe not utf-8 \x00\x80", b"", '{"ü": 1}'.encode()], pa.binary()
            ),
            "error": pa.array(["invalid JSON", "empty record", "missing field 'event_id'"]),
            "source": pa.array(["file:a.ndjson", "kafka://h:9092/t", "file:a.ndjson"]),
            **_positions(3),
        }
    elif table == "sessions":
        columns = _session_columns()
    elif table == "quality_1m":
        counts = [f.name for f in schema.QUALITY_1M if f.name not in ("minute", "partition")]
        columns = {
            "minute": pa.array([0, T0 - T0 % 60_000, T0 - T0 % 60_000], schema.TS),
            **{
                name: pa.array([0, MAX_I64, -17 if name == "lag_ms_max" else 3], pa.int64())
                for name in counts
            },
            "partition": pa.array([0, 0, 5], pa.int32()),
        }
    elif table == "traffic_1m":
        columns = _traffic_columns(
            starts=[0, T0 - 123, T0 - 123],
            types=["page_view", "purchase", "purchase"],
            partitions=[0, 0, 1],
            events=[1, 5, 2],
            versions=[0, 0, MAX_U64],
        )
    else:
        columns = _product_columns(
            starts=[0, T0 - 123],
            products=[MAX_I64, 7],
            partitions=[3, 0],
            views=[9, 0],
            versions=[0, 2],
        )
    return pa.table(columns, schema=schema.OUTPUT_TABLES[table])


def _session_columns() -> dict[str, pa.Array]:
    return {
        "user_id": pa.array([1, MAX_I64], pa.int64()),
        "session_id": pa.array([5, MAX_U64], pa.uint64()),
        "session_start": pa.array([0, T0], schema.TS),
        "session_end": pa.array([1, T0 + 1_800_000], schema.TS),
        "events": pa.array([1, 12], pa.int64()),
        "page_views": pa.array([1, 4], pa.int64()),
        "product_views": pa.array([0, 4], pa.int64()),
        "add_to_carts": pa.array([0, 2], pa.int64()),
        "purchases": pa.array([0, 2], pa.int64()),
        "revenue": pa.array([0.0, 59.97], pa.float64()),
        "landing_page": pa.array(["/start", None]),
        "exit_page": pa.array([None, "/dänke"]),
        "partition": pa.array([0, 1], pa.int32()),
    }


def _traffic_columns(
    starts: list[int],
    types: list[str],
    partitions: list[int],
    events: list[int],
    versions: list[int],
) -> dict[str, pa.Array]:
    return {
        "window_start": pa.array(starts, schema.TS),
        "window_end": pa.array([s + 60_000 for s in starts], schema.TS),
        "event_type": pa.array(types),
        "events": pa.array(events, pa.int64()),
        "users": pa.array([max(e - 1, 1) for e in events], pa.int64()),
        "revenue": pa.array([e * 1.5 for e in events], pa.float64()),
        "partition": pa.array(partitions, pa.int32()),
        "version": pa.array(versions, pa.uint64()),
    }


def _product_columns(
    starts: list[int],
    products: list[int],
    partitions: list[int],
    views: list[int],
    versions: list[int],
) -> dict[str, pa.Array]:
    return {
        "window_start": pa.array(starts, schema.TS),
        "window_end": pa.array([s + 300_000 for s in starts], schema.TS),
        "product_id": pa.array(products, pa.int64()),
        "views": pa.array(views, pa.int64()),
        "add_to_carts": pa.array([v // 2 for v in views], pa.int64()),
        "purchases": pa.array([v // 3 for v in views], pa.int64()),
        "revenue": pa.array([v * 2.25 for v in views], pa.float64()),
        "users": pa.array(views, pa.int64()),
        "partition": pa.array(partitions, pa.int32()),
        "version": pa.array(versions, pa.uint64()),
    }


def big_sessions(n: int) -> pa.Table:
    """``n`` session rows, all in one month (so one table partition)."""
    ids = np.arange(n, dtype=np.int64)
    count = pa.array(ids % 7, pa.int64())
    return pa.table(
        {
            "user_id": pa.array(ids),
            "session_id": pa.array(ids.astype(np.uint64) * 11),
            "session_start": pa.array(T0 + ids, schema.TS),
            "session_end": pa.array(T0 + ids * 2, schema.TS),
            "events": count,
            "page_views": count,
            "product_views": count,
            "add_to_carts": count,
            "purchases": count,
            "revenue": pa.array(ids * 0.5),
            "landing_page": pa.nulls(n, pa.string()),
            "exit_page": pa.array(np.where(ids % 2 == 0, "/a", "/b")),
            "partition": pa.array(np.zeros(n, np.int32)),
        },
        schema=schema.SESSIONS,
    )


# ---- fixtures -----------------------------------------------------------------------------


SinkFactory = Callable[..., ClickHouseSink]


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator[SinkFactory]:
    """Open sinks on one chdb folder; all are closed at teardown."""
    opened: list[ClickHouseSink] = []

    def make(loader: Loader = "python", insert_block_rows: int = 2_097_152) -> ClickHouseSink:
        config = parse_sink_url(f"chdb://{tmp_path / 'ch'}", insert_block_rows=insert_block_rows)
        sink = ClickHouseSink(dataclasses.replace(config, chdb_loader=loader))
        opened.append(sink)
        sink.open()
        return sink

    yield make
    for sink in opened:
        sink.close()


@pytest.fixture(params=["python", "arrow"])
def sink(request: pytest.FixtureRequest, make_sink: SinkFactory) -> ClickHouseSink:
    """A chdb sink, once per bulk-load path."""
    loader: Loader = request.param
    return make_sink(loader)


def count(sink: ClickHouseSink, table: str, final: bool = False) -> int:
    suffix = " FINAL" if final else ""
    return int(sink.query(f"SELECT count() AS n FROM {DB}.{table}{suffix}")["n"][0].as_py())


def read_back(sink: ClickHouseSink, table: str) -> pa.Table:
    return sink.query(f"SELECT * FROM {DB}.{table} ORDER BY {ORDER_BY[table]}")


# ---- schema -------------------------------------------------------------------------------


def test_open_twice_is_idempotent_and_everything_is_commented(make_sink: SinkFactory) -> None:
    sink = make_sink()
    sink.open()
    sink.close()
    sink.open()
    make_sink()  # a second sink on the same folder re-runs the DDL
    tables = sink.query(
        f"SELECT name, engine, comment FROM system.tables WHERE database = '{DB}' ORDER BY name"
    ).to_pylist()
    names = {row["name"] for row in tables}
    assert names == set(schema.OUTPUT_TABLES) | set(ddl.view_names()) | {ddl.JOBS_TABLE}
    assert all(row["comment"] for row in tables), tables
    in_tables = ", ".join(repr(t) for t in schema.OUTPUT_TABLES)
    columns = sink.query(
        f"SELECT table, name, comment FROM system.columns WHERE database = '{DB}' "
        f"AND table IN ({in_tables}) ORDER BY table, position"
    ).to_pylist()
    assert [c["name"] for c in columns if c["table"] == "events"] == schema.EVENTS.names
    assert len(columns) == sum(len(s) for s in schema.OUTPUT_TABLES.values())
    assert all(c["comment"] for c in columns), [c for c in columns if not c["comment"]]


def test_engines_follow_the_spec(make_sink: SinkFactory) -> None:
    sink = make_sink()
    rows = sink.query(
        f"SELECT name, engine_full FROM system.tables WHERE database = '{DB}' AND engine != 'View'"
    ).to_pylist()
    engines = {row["name"]: row["engine_full"] for row in rows}
    for table in schema.OUTPUT_TABLES:
        expected = (
            "ReplacingMergeTree(version)" if table in schema.VERSIONED_TABLES else "MergeTree"
        )
        assert engines[table].startswith(expected + " "), engines[table]
        assert "non_replicated_deduplication_window = 10000" in engines[table]


# ---- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("table", sorted(schema.OUTPUT_TABLES))
def test_round_trip(sink: ClickHouseSink, table: str) -> None:
    rows = sample_rows(table)
    sink.write(table, rows, f"rt-{table}")
    back = read_back(sink, table)
    assert back.schema == rows.schema
    assert back.equals(rows), (back.to_pylist(), rows.to_pylist())


def test_dead_letter_bytes_survive_exactly(sink: ClickHouseSink) -> None:
    raw = bytes(range(256)) + b"\xc3\x28\xed\xa0\x80"
    rows = pa.table(
        {"raw": pa.array([raw], pa.binary()), "error": ["bad"], "source": ["s"], **_positions(1)},
        schema=schema.DEAD_LETTERS,
    )
    sink.write("dead_letters", rows, "bytes")
    back = sink.query(f"SELECT raw, length(raw) AS n FROM {DB}.dead_letters")
    assert back["raw"].type == pa.binary()
    assert back["raw"][0].as_py() == raw
    assert back["n"][0].as_py() == len(raw)


def test_timestamps_read_back_in_utc(sink: ClickHouseSink) -> None:
    sink.write("events", sample_rows("events"), "utc")
    back = sink.query(f"SELECT ts, toString(ts) AS text FROM {DB}.events ORDER BY ts")
    assert back["ts"].type == pa.timestamp("ms", tz="UTC")
    assert back["text"].to_pylist() == [
        "1970-01-01 00:00:00.000",
        "2026-11-25 12:00:00.123",
        "2026-11-25 12:01:00.122",
    ]


def test_text_columns_stay_strings(sink: ClickHouseSink) -> None:
    sink.write("dead_letters", sample_rows("dead_letters").slice(1), "text")
    back = sink.query(f"SELECT raw, error FROM {DB}.dead_letters ORDER BY `offset`")
    assert back["raw"].type == pa.string()  # valid UTF-8 only: no reason to hand out bytes
    assert back["raw"].to_pylist() == ["", '{"ü": 1}']


# ---- idempotency --------------------------------------------------------------------------


def test_same_token_stores_once_other_token_twice(sink: ClickHouseSink) -> None:
    rows = sample_rows("events")
    sink.write("events", rows, "batch-1:events")
    sink.write("events", rows, "batch-1:events")
    assert count(sink, "events") == 3
    sink.write("events", rows, "batch-2:events")
    assert count(sink, "events") == 6


def test_empty_write_is_a_no_op(sink: ClickHouseSink) -> None:
    sink.write("events", schema.EVENTS.empty_table(), "empty")
    parts = sink.query(f"SELECT count() AS n FROM system.parts WHERE database = '{DB}'")
    assert parts["n"][0].as_py() == 0


def test_table_larger_than_a_default_block_is_one_part_and_dedups(sink: ClickHouseSink) -> None:
    default_block = int(
        sink.query("SELECT value FROM system.settings WHERE name = 'max_insert_block_size'")[
            "value"
        ][0].as_py()
    )
    rows = big_sessions(default_block + 150_000)
    sink.write("sessions", rows, "big")
    sink.write("sessions", rows, "big")
    assert count(sink, "sessions") == rows.num_rows
    parts = sink.query(
        f"SELECT count() AS n FROM system.parts WHERE database = '{DB}' AND table = 'sessions' "
        "AND active"
    )
    assert parts["n"][0].as_py() == 1


def test_many_chunk_tables_load_whole(sink: ClickHouseSink) -> None:
    rows = big_sessions(250_000)
    chunked = pa.concat_tables([rows.slice(0, 10), rows.slice(10, 100_000), rows.slice(100_010)])
    sink.write("sessions", chunked, "chunks")
    sink.write("sessions", chunked, "chunks")
    assert sink.query(f"SELECT * FROM {DB}.sessions ORDER BY session_id").equals(rows)
    parts = sink.query(f"SELECT count() AS n FROM system.parts WHERE database = '{DB}' AND active")
    assert parts["n"][0].as_py() == 1


def test_replay_after_a_partial_write_completes_it_exactly(make_sink: SinkFactory) -> None:
    sink = make_sink(insert_block_rows=1_000)
    rows = big_sessions(3_500)
    sink.write("sessions", rows.slice(0, 2_000), "crashed")  # blocks 0 and 1 landed, then kill -9
    sink.write("sessions", rows, "crashed")  # the restart replays the whole write
    sink.write("sessions", rows, "crashed")
    back = sink.query(f"SELECT * FROM {DB}.sessions ORDER BY session_id")
    assert back.equals(rows)


def test_replacing_final_keeps_the_highest_version(sink: ClickHouseSink) -> None:
    def traffic(events: int, version: int) -> pa.Table:
        columns = _traffic_columns([T0 - 123], ["search"], [0], [events], [version])
        return pa.table(columns, schema=schema.TRAFFIC_1M)

    sink.write("traffic_1m", traffic(5, 0), "w:0")
    sink.write("traffic_1m", traffic(7, 1), "w:1")
    sink.write("traffic_1m", traffic(5, 0), "w:0")  # replay of the older write
    sink.write("traffic_1m", traffic(6, 0), "w:other")  # an older version, newly written
    back = sink.query(f"SELECT events, version FROM {DB}.traffic_1m FINAL").to_pylist()
    assert back == [{"events": 7, "version": 1}]
    assert count(sink, "traffic_1m") in (1, 3)  # before / after a background merge


def test_total_views_sum_partitions_over_final(sink: ClickHouseSink) -> None:
    traffic = _traffic_columns(
        starts=[T0 - 123] * 4,
        types=["purchase", "purchase", "purchase", "search"],
        partitions=[0, 0, 1, 1],
        events=[2, 4, 3, 1],
        versions=[0, 1, 0, 0],
    )
    sink.write("traffic_1m", pa.table(traffic, schema=schema.TRAFFIC_1M), "t")
    totals = sink.query(
        f"SELECT event_type, events, users, revenue, partitions FROM {DB}.traffic_1m_total "
        "ORDER BY event_type"
    ).to_pylist()
    assert totals == [
        {"event_type": "purchase", "events": 7, "users": 5, "revenue": 10.5, "partitions": 2},
        {"event_type": "search", "events": 1, "users": 1, "revenue": 1.5, "partitions": 1},
    ]
    products = _product_columns(
        starts=[T0 - 123] * 3,
        products=[7, 7, 7],
        partitions=[0, 0, 2],
        views=[3, 6, 9],
        versions=[0, 1, 0],
    )
    sink.write("product_5m", pa.table(products, schema=schema.PRODUCT_5M), "p")
    totals = sink.query(f"SELECT * FROM {DB}.product_5m_total").to_pylist()
    assert len(totals) == 1
    row = totals[0]
    assert (row["views"], row["add_to_carts"], row["purchases"], row["users"]) == (15, 7, 5, 15)
    assert (row["revenue"], row["partitions"]) == (33.75, 2)
    assert row["window_end"].timestamp() * 1000 == T0 - 123 + 300_000


def test_daily_views(sink: ClickHouseSink) -> None:
    sink.write("events", sample_rows("events"), "e")
    sink.write("sessions", sample_rows("sessions"), "s")
    funnel = sink.query(f"SELECT * FROM {DB}.funnel_daily ORDER BY day").to_pylist()
    assert [str(row["day"]) for row in funnel] == ["1970-01-01", "2026-11-25"]
    assert funnel[1]["purchase_users"] == 1 and funnel[1]["add_to_cart_users"] == 1
    assert funnel[1]["revenue"] == pytest.approx(59.97)
    days = sink.query(f"SELECT * FROM {DB}.sessions_daily ORDER BY day").to_pylist()
    assert [row["sessions"] for row in days] == [1, 1]
    assert days[1]["avg_duration_s"] == 1800.0 and days[1]["conversion_rate"] == 1.0
    assert days[0]["bounce_rate"] == 1.0


# ---- the documentation ------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tables.md"


def test_documented_queries_run_and_return_rows(make_sink: SinkFactory) -> None:
    sink = make_sink()
    for table in schema.OUTPUT_TABLES:
        sink.write(table, sample_rows(table), f"docs-{table}")
    queries = re.findall(r"```sql\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert len(queries) >= 10
    for sql in queries:
        assert sink.query(sql).num_rows > 0, sql


def test_documented_columns_match_the_ddl() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for table, arrow_schema in schema.OUTPUT_TABLES.items():
        section = text.split(f"### {table}\n", 1)[1].split("\n### ", 1)[0]
        documented = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section, re.M)
        assert documented == [(f.name, ddl.column_type(f)) for f in arrow_schema], table


# ---- bad writes, bad URLs, locks, retries -------------------------------------------------


def test_write_refuses_rows_that_break_the_contract(make_sink: SinkFactory) -> None:
    sink = make_sink()
    with pytest.raises(SinkError, match="unknown table"):
        sink.write("nope", sample_rows("events"), "t")
    with pytest.raises(SinkError, match="expected"):
        sink.write("sessions", sample_rows("events"), "t")
    rows = sample_rows("sessions")
    nulls = rows.set_column(0, pa.field("user_id", pa.int64()), pa.array([None, 1], pa.int64()))
    with pytest.raises(SinkError, match="'user_id' has nulls"):
        sink.write("sessions", nulls, "t")
    with pytest.raises(SinkError, match="token"):
        sink.write("sessions", rows, "")
    loose = rows.cast(pa.schema([f.with_nullable(True) for f in schema.SESSIONS]))
    sink.write("sessions", loose, "loose")
    assert read_back(sink, "sessions").equals(rows)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "clickhouse://h:9000",
        "chdb://",
        "chdb://x?y=1",
        "http://",
        "https://user:secret@host:notaport",
        "http://user:secret@host:8123/db",
        "http://user:secret@host:8123?x=1",
        "/just/a/path",
    ],
)
def test_bad_sink_url_names_the_option(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_sink(url)
    assert info.value.option == "sink"
    assert "secret" not in str(info.value)


def test_bad_database_names_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        parse_sink_url("chdb://x", database="a;DROP TABLE b")
    assert info.value.option == "database"


def test_server_urls_parse_and_never_show_the_password() -> None:
    config = parse_sink_url("https://alice:p%40ss@ch.example.com")
    assert (config.kind, config.host, config.port) == ("https", "ch.example.com", 8443)
    assert (config.username, config.password) == ("alice", "p@ss")
    sink = ClickHouseSink(config)
    assert "p@ss" not in sink.describe() and "p@ss" not in repr(config)
    assert sink.describe().startswith("https://alice@ch.example.com:8443 (ClickHouse server")
    default = parse_sink_url("http://ch:8124")
    assert (default.username, default.password, default.port) == ("default", "", 8124)


def test_relative_chdb_path_is_resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_sink_url("chdb://gpu_pipeline_data/clickhouse")
    assert config.path == str(tmp_path / "gpu_pipeline_data" / "clickhouse")
    assert ClickHouseSink(config).describe().startswith(f"chdb://{config.path} (embedded")


def test_describe_names_the_engine_version(make_sink: SinkFactory) -> None:
    assert "(embedded ClickHouse 2" in make_sink().describe()


def test_closed_sink_refuses_work(make_sink: SinkFactory) -> None:
    sink = make_sink()
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="not open"):
        sink.query("SELECT 1")


def test_second_process_on_the_folder_gets_a_clear_error(make_sink: SinkFactory) -> None:
    sink = make_sink()
    script = textwrap.dedent(
        f"""
        from gpu_pipeline.errors import SinkError
        from gpu_pipeline.sinks.base import open_sink
        try:
            open_sink({sink.config.safe_url!r})
        except SinkError as exc:
            print("SinkError:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert "SinkError:" in done.stdout, done.stdout + done.stderr
    assert "in use by another process (PID: " in done.stdout
    assert count(sink, "events") == 0  # this process keeps working


def test_second_folder_in_one_process_gets_a_clear_error(
    make_sink: SinkFactory, tmp_path: Path
) -> None:
    make_sink()
    with pytest.raises(SinkError, match="one data folder per process"):
        open_sink(f"chdb://{tmp_path / 'other'}")


def test_retries_transient_errors_with_backoff() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("connection reset by peer")
        return "ok"

    policy = RetryPolicy(attempts=5, first_backoff_s=0.1, max_backoff_s=0.15)
    assert call_with_retries(flaky, policy, "insert", sleep=sleeps.append) == "ok"
    assert sleeps == [0.1, 0.15]


def test_gives_up_after_the_attempts_without_leaking_the_password() -> None:
    sleeps: list[float] = []

    def down() -> None:
        raise OperationalError("cannot reach http://u:hunter2@h:8123")

    with pytest.raises(SinkError, match="after 3 attempts") as info:
        call_with_retries(
            down,
            RetryPolicy(attempts=3),
            "insert",
            lambda m: m.replace("hunter2", "***"),
            sleep=sleeps.append,
        )
    assert "hunter2" not in str(info.value)
    assert len(sleeps) == 2


def test_permanent_errors_are_not_retried() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise DatabaseError("Code: 60. Unknown table", code=60)

    with pytest.raises(SinkError, match="Unknown table"):
        call_with_retries(broken, RetryPolicy(), "query", sleep=lambda _s: None)
    assert calls == [1]


def test_bad_retry_policy_names_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        RetryPolicy(attempts=0)
    assert info.value.option == "sink.retry_attempts"


# ---- a real server ------------------------------------------------------------------------


@pytest.fixture
def server_sink() -> Iterator[ClickHouseSink]:
    url = os.environ.get("CLICKHOUSE_URL")
    if not url:
        pytest.skip("CLICKHOUSE_URL is not set: no ClickHouse server to test against")
    database = f"gpu_pipeline_test_{uuid.uuid4().hex[:12]}"
    sink = ClickHouseSink(parse_sink_url(url, database))
    sink.open()
    try:
        yield sink
    finally:
        sink.query(f"DROP DATABASE IF EXISTS {database}")
        sink.close()


@pytest.mark.clickhouse_server
@pytest.mark.parametrize("table", sorted(schema.OUTPUT_TABLES))
def test_server_round_trip_and_dedup(server_sink: ClickHouseSink, table: str) -> None:
    rows = sample_rows(table)
    server_sink.write(table, rows, f"srv-{table}")
    server_sink.write(table, rows, f"srv-{table}")
    database = server_sink.config.database
    back = server_sink.query(f"SELECT * FROM {database}.{table} ORDER BY {ORDER_BY[table]}")
    assert back.schema == rows.schema
    assert back.equals(rows)


# ---- TLS and passwords for a server -------------------------------------------------------------


def test_https_tls_options_parse_from_the_query(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    for path in (ca, cert, key):
        path.write_text("PEM")
    config = parse_sink_url(
        f"https://alice:pw@ch.example.com/?ca_cert={ca}&client_cert={cert}"
        f"&client_cert_key={key}&server_host_name=ch.internal"
    )
    assert (config.ca_cert, config.client_cert, config.client_cert_key) == (
        str(ca),
        str(cert),
        str(key),
    )
    assert config.server_host_name == "ch.internal" and config.verify is True
    assert config.safe_url == "https://alice@ch.example.com:8443"  # the job id ignores TLS files
    assert parse_sink_url("https://ch:9440?verify=false").verify is False
    assert parse_sink_url("https://ch?ca_cert=certifi").ca_cert == "certifi"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://u:secret@ch/?ca=/etc/ca.pem", "unknown parameter 'ca'"),
        ("http://u:secret@ch/?ca_cert=certifi", "use an https:// URL"),
        ("https://u:secret@ch/?ca_cert=/no/such/ca.pem", "is not a readable file"),
        ("https://u:secret@ch/?verify=maybe", "verify must be true or false"),
        ("https://u:secret@ch/?verify=1&verify=0", "given twice"),
        ("https://u@ch/?password=secret", "unknown parameter 'password'"),
    ],
)
def test_bad_tls_options_name_the_sink_and_hide_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_sink_url(url)
    assert info.value.option == "sink"
    assert "secret" not in str(info.value)


class _FakeClient:
    server_version = "25.8.1"

    def __init__(self, **arguments: object) -> None:
        self.arguments = arguments

    def command(self, sql: str) -> None:
        """DDL: nothing to do."""

    def close(self) -> None:
        """Nothing to release."""


def _capture_clients(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    import clickhouse_connect

    made: list[dict[str, object]] = []

    def get_client(**arguments: object) -> _FakeClient:
        made.append(arguments)
        return _FakeClient(**arguments)

    monkeypatch.setattr(clickhouse_connect, "get_client", get_client)
    return made


def test_https_sink_hands_tls_options_and_the_env_password_to_the_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM")
    made = _capture_clients(monkeypatch)
    monkeypatch.setenv("GPU_PIPELINE_CLICKHOUSE_PASSWORD", "from-env")
    sink = ClickHouseSink(parse_sink_url(f"https://writer@ch.example.com:8443/?ca_cert={ca}"))
    sink.open()
    sink.close()
    assert len(made) == 1
    arguments = made[0]
    assert arguments["interface"] == "https"
    assert (arguments["host"], arguments["port"]) == ("ch.example.com", 8443)
    assert (arguments["username"], arguments["password"]) == ("writer", "from-env")
    assert (arguments["ca_cert"], arguments["verify"]) == (str(ca), True)
    assert "client_cert" not in arguments  # only what the URL set: the library's defaults hold
    assert "from-env" not in sink.describe()


def test_plain_http_sink_gets_no_tls_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _capture_clients(monkeypatch)
    monkeypatch.delenv("GPU_PIPELINE_CLICKHOUSE_PASSWORD", raising=False)
    monkeypatch.delenv("GPU_PIPELINE_CLICKHOUSE_PASSWORD_FILE", raising=False)
    sink = ClickHouseSink(parse_sink_url("http://ch.example.com"))
    sink.open()
    sink.close()
    assert made[0]["interface"] == "http" and made[0]["password"] == ""
    assert not {"ca_cert", "verify", "client_cert"} & set(made[0])


class _HttpsServer:
    """An HTTPS server (Python's ``ssl``) that answers every request like a ClickHouse server
    refusing the user, and remembers the Authorization headers it got."""

    def __init__(self, cert: Path, key: Path) -> None:
        import http.server
        import ssl
        import threading

        seen: list[str] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._refuse()

            def do_POST(self) -> None:
                self._refuse()

            def _refuse(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                body = b"Code: 516. DB::Exception: refused. (AUTHENTICATION_FAILED)\n"
                self.send_response(403)
                self.send_header("X-ClickHouse-Exception-Code", "516")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def https_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[_HttpsServer, Path, Path]]:
    from tests.kafka_broker import make_tls_files, tls_tools_missing

    missing = tls_tools_missing()
    if missing:
        pytest.skip(missing)
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    server = _HttpsServer(tls.server_cert, tls.server_key)
    try:
        yield server, tls.ca, tls.other_ca
    finally:
        server.close()


def _connect_error(url: str) -> str:
    sink = ClickHouseSink(
        dataclasses.replace(parse_sink_url(url), retry=RetryPolicy(attempts=2, first_backoff_s=0))
    )
    with pytest.raises(SinkError) as info:
        sink.open()
    return str(info.value)


def test_https_with_the_ca_verifies_the_server(
    https_server: tuple[_HttpsServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real TLS handshake: with the CA it succeeds (the request reaches the server, which
    refuses the user with ClickHouse's code 516) and the password from the environment
    travels inside it; the message never shows it."""
    server, ca, _ = https_server
    monkeypatch.setenv("GPU_PIPELINE_CLICKHOUSE_PASSWORD", "tls-secret")
    before = len(server.seen)
    message = _connect_error(f"https://writer@127.0.0.1:{server.port}/?ca_cert={ca}")
    assert "516" in message and "AUTHENTICATION_FAILED" in message, message
    assert "CERTIFICATE_VERIFY_FAILED" not in message
    import base64

    assert server.seen[before:] == ["Basic " + base64.b64encode(b"writer:tls-secret").decode()]
    assert "tls-secret" not in message


@pytest.mark.parametrize("trust", ["system store", "another CA", "wrong host name"])
def test_https_without_the_ca_fails_verification_at_once(
    https_server: tuple[_HttpsServer, Path, Path], trust: str
) -> None:
    server, ca, other_ca = https_server
    query = {
        "system store": "",
        "another CA": f"?ca_cert={other_ca}",
        "wrong host name": f"?ca_cert={ca}&server_host_name=not-this-host.example",
    }[trust]
    before = len(server.seen)
    message = _connect_error(f"https://writer:pw@127.0.0.1:{server.port}/{query}")
    sign = "doesn't match" if trust == "wrong host name" else "CERTIFICATE_VERIFY_FAILED"
    assert sign in message, message
    assert "ca_cert=" in message  # says how to fix it
    assert "after 2 attempts" not in message  # a refused certificate is not retried
    assert len(server.seen) == before  # nothing was sent: no password left the process

"""ClickHouse DDL for the output tables (SPEC §3) and the dashboard views.

Column types are derived from the Arrow schemas in :mod:`gpu_pipeline.schema`, so the
tables cannot drift from what the pipeline writes, and a round trip through ClickHouse
returns the very Arrow types it was given (``Int64`` ids because every id is below 2^63,
``UInt64`` session ids and versions, ``DateTime64(3, 'UTC')`` timestamps, ``Nullable`` exactly
where the Arrow field is nullable).  Every statement is idempotent.

Every table carries ``non_replicated_deduplication_window`` so that inserts with an
``insert_deduplication_token`` are deduplicated on a plain (non-replicated) MergeTree too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.errors import ConfigError

DEDUP_WINDOW_BLOCKS = 10_000
"""Insert blocks each table remembers for token deduplication.  Only the writes of the last,
uncommitted batch are ever replayed, so this is many times what replays need."""

LOW_CARDINALITY: frozenset[str] = frozenset(
    {"event_type", "country", "device", "category", "reason", "source"}
)
"""String columns with few distinct values: dictionary-encoded on disk and in memory."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_EVENT_COLUMN_COMMENTS: dict[str, str] = {
    "event_id": "Producer event id; unique per logical event, repeated by producer retries",
    "user_id": "User id (0 <= x < 2^63)",
    "ts": "Event time (UTC, millisecond precision)",
    "event_type": "page_view, product_view, search, add_to_cart, remove_from_cart, "
    "checkout or purchase",
    "page": "URL path of the page, if given",
    "product_id": "Product id; present for product_view, add_to_cart, remove_from_cart, purchase",
    "category": "Product category, if given",
    "price": "Unit price; present for add_to_cart and purchase",
    "quantity": "Number of units (default 1)",
    "country": "Two-letter country code, if given",
    "device": "desktop, mobile or tablet, if given",
    "referrer": "Referrer, if given",
}
_POSITION_COMMENTS: dict[str, str] = {
    "partition": "Source partition (Kafka partition; 0 for a file)",
    "offset": "Source position: Kafka offset, or 0-based line number of a file",
    "seq": "Index of the event inside its source record (several NDJSON events per message)",
}
_WINDOW_COMMENTS: dict[str, str] = {
    "window_start": "Window start (inclusive, UTC, aligned to the Unix epoch)",
    "window_end": "Window end (exclusive, UTC)",
    "revenue": "Sum of price * quantity over the purchase events of this row",
    "users": "Exact number of distinct user_id among the counted events of this partition",
    "partition": "Source partition; rows are partial per partition and add up across them",
    "version": "Write number of this window: 1 on the first write, +1 per later on-time event",
}

COLUMN_COMMENTS: dict[str, dict[str, str]] = {
    "events": {
        **_EVENT_COLUMN_COMMENTS,
        "session_id": "Deterministic id of the session this event belongs to",
        **_POSITION_COMMENTS,
    },
    "late_events": {
        **_EVENT_COLUMN_COMMENTS,
        "watermark": "Watermark of the partition when the event arrived",
        "reason": "Why the event is too late",
        **_POSITION_COMMENTS,
    },
    "dead_letters": {
        "raw": "The record exactly as received (bytes, not necessarily valid UTF-8)",
        "error": "Why the record is invalid, naming the field",
        "source": "Source the record came from",
        **_POSITION_COMMENTS,
    },
    "sessions": {
        "user_id": "User id",
        "session_id": "Deterministic id from (user_id, first ts, first event_id)",
        "session_start": "Minimum ts of the session's events",
        "session_end": "Maximum ts of the session's events",
        "events": "Number of on-time events in the session",
        "page_views": "Number of page_view events",
        "product_views": "Number of product_view events",
        "add_to_carts": "Number of add_to_cart events",
        "purchases": "Number of purchase events",
        "revenue": "Sum of price * quantity over the purchase events",
        "landing_page": "page of the event with the minimum ts (ties: earlier arrival)",
        "exit_page": "page of the event with the maximum ts (ties: later arrival)",
        "partition": "Source partition",
    },
    "traffic_1m": {
        **_WINDOW_COMMENTS,
        "event_type": "Event type (the window key)",
        "events": "Number of on-time events of this type in the window",
    },
    "product_5m": {
        **_WINDOW_COMMENTS,
        "product_id": "Product id (the window key)",
        "views": "Number of product_view events",
        "add_to_carts": "Number of add_to_cart events",
        "purchases": "Number of purchase events",
    },
    "quality_1m": {
        "minute": "Minute (UTC): an event's own ts; a dead letter's partition clock where it "
        "arrived (1970-01-01 before the partition has one)",
        "records": "Records of this minute: events + dead_letters",
        "dead_letters": "Invalid records (decoder and event-time guard)",
        "events": "Valid events the event-time guard let through: duplicates + late + on_time",
        "duplicates": "Events dropped as duplicates",
        "late": "Events written to late_events",
        "on_time": "Events written to events",
        **{f"with_{name}": f"On-time events that carry {name}" for name in schema.QUALITY_FIELDS},
        "lag_events": "On-time events whose record has a source timestamp (Kafka)",
        "lag_ms_sum": "Sum over those events of source timestamp - ts (ingest lag, ms)",
        "lag_ms_max": "Largest ingest lag among those events (0 when lag_events = 0)",
        "partition": "Source partition; rows are partial sums that add up (quality_1m_total)",
    },
}


@dataclass(frozen=True)
class TableSpec:
    """Engine, layout and description of one output table."""

    name: str
    engine: str
    partition_by: str | None
    order_by: str
    comment: str


TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "events",
        "MergeTree",
        "toYYYYMM(ts)",
        "(event_type, ts, user_id)",
        "One row per on-time accepted event (SPEC §3)",
    ),
    TableSpec(
        "sessions",
        "MergeTree",
        "toYYYYMM(session_start)",
        "(session_start, user_id)",
        "One row per closed session, written once when it closes",
    ),
    TableSpec(
        "traffic_1m",
        "ReplacingMergeTree(version)",
        "toYYYYMM(window_start)",
        "(window_start, window_end, event_type, `partition`)",
        "1-minute tumbling windows per event_type and partition; read with FINAL "
        "(or traffic_1m_total)",
    ),
    TableSpec(
        "product_5m",
        "ReplacingMergeTree(version)",
        "toYYYYMM(window_start)",
        "(window_start, window_end, product_id, `partition`)",
        "5-minute windows sliding by 1 minute per product_id and partition; read with FINAL "
        "(or product_5m_total)",
    ),
    TableSpec(
        "late_events",
        "MergeTree",
        "toYYYYMM(ts)",
        "(ts, `partition`, `offset`, seq)",
        "Events that arrived later than the allowed lateness behind the watermark",
    ),
    TableSpec(
        "dead_letters",
        "MergeTree",
        None,
        "(source, `partition`, `offset`, seq)",
        "Invalid records with their raw bytes and the reason",
    ),
    TableSpec(
        "quality_1m",
        "MergeTree",
        "toYYYYMM(minute)",
        "(minute, `partition`)",
        "Data-quality counts per minute, as partial sums per partition; read quality_1m_total",
    ),
)


@dataclass(frozen=True)
class ViewSpec:
    """A dashboard view over the output tables."""

    name: str
    select: str
    comment: str


def _views(db: str) -> tuple[ViewSpec, ...]:
    """The dashboard views of database ``db`` (see docs/tables.md)."""
    return (
        ViewSpec(
            "traffic_1m_total",
            f"SELECT window_start, window_end, event_type, sum(events) AS events, "
            f"sum(users) AS users, sum(revenue) AS revenue, count() AS partitions "
            f"FROM {db}.traffic_1m FINAL GROUP BY window_start, window_end, event_type",
            "traffic_1m summed over partitions (latest version of every row)",
        ),
        ViewSpec(
            "product_5m_total",
            f"SELECT window_start, window_end, product_id, sum(views) AS views, "
            f"sum(add_to_carts) AS add_to_carts, sum(purchases) AS purchases, "
            f"sum(revenue) AS revenue, sum(users) AS users, count() AS partitions "
            f"FROM {db}.product_5m FINAL GROUP BY window_start, window_end, product_id",
            "product_5m summed over partitions (latest version of every row)",
        ),
        ViewSpec(
            "quality_1m_total",
            _quality_total(db),
            "Data quality per minute over all partitions: validity (dead-letter rate), "
            "uniqueness (duplicate rate), completeness of optional fields, freshness "
            "(ingest lag)",
        ),
        ViewSpec(
            "funnel_daily",
            f"SELECT toDate(ts) AS day, "
            f"uniqExactIf(user_id, event_type = 'page_view') AS page_view_users, "
            f"uniqExactIf(user_id, event_type = 'product_view') AS product_view_users, "
            f"uniqExactIf(user_id, event_type = 'add_to_cart') AS add_to_cart_users, "
            f"uniqExactIf(user_id, event_type = 'checkout') AS checkout_users, "
            f"uniqExactIf(user_id, event_type = 'purchase') AS purchase_users, "
            f"countIf(event_type = 'purchase') AS purchases, "
            f"sumIf(price * quantity, event_type = 'purchase') AS revenue "
            f"FROM {db}.events GROUP BY day",
            "Distinct users reaching each funnel step per UTC day",
        ),
        ViewSpec(
            "sessions_daily",
            f"SELECT toDate(session_start) AS day, count() AS sessions, "
            f"uniqExact(user_id) AS users, avg(events) AS avg_events, "
            f"avg(dateDiff('millisecond', session_start, session_end)) / 1000 "
            f"AS avg_duration_s, countIf(purchases > 0) / count() AS conversion_rate, "
            f"countIf(events = 1) / count() AS bounce_rate, sum(revenue) AS revenue "
            f"FROM {db}.sessions GROUP BY day",
            "Closed sessions per UTC day of their start",
        ),
    )


def _quality_total(db: str) -> str:
    """quality_1m_total: the partial sums added up per minute, then the rates (an inner
    query, so that the sums' names do not shadow the columns they sum)."""
    sums = ", ".join(f"sum({c}) AS n_{c}" for c in schema.QUALITY_SUMS)
    inner = (
        f"SELECT minute, {sums}, maxIf(lag_ms_max, lag_events > 0) AS n_lag_max, "
        f"uniqExact(`partition`) AS n_partitions FROM {db}.quality_1m GROUP BY minute"
    )

    def rate(part: str, whole: str) -> str:
        return f"if(n_{whole} = 0, NULL, n_{part} / n_{whole})"

    completeness = ", ".join(
        f"{rate(f'with_{name}', 'on_time')} AS {name}_completeness"
        for name in schema.QUALITY_FIELDS
    )
    return (
        "SELECT minute, n_records AS records, n_dead_letters AS dead_letters, "
        "n_events AS events, n_duplicates AS duplicates, n_late AS late, "
        "n_on_time AS on_time, "
        f"{rate('dead_letters', 'records')} AS dead_letter_rate, "
        f"{rate('duplicates', 'events')} AS duplicate_rate, "
        f"{rate('late', 'events')} AS late_rate, {completeness}, "
        f"n_lag_events AS lag_events, {rate('lag_ms_sum', 'lag_events')} AS avg_lag_ms, "
        "if(n_lag_events = 0, NULL, n_lag_max) AS max_lag_ms, n_partitions AS partitions "
        f"FROM ({inner})"
    )


def check_identifier(name: str, option: str) -> str:
    """Return ``name`` if it is a plain ClickHouse identifier, else raise ConfigError(option)."""
    if not _IDENTIFIER.match(name):
        raise ConfigError(option, f"{name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def quote_string(text: str) -> str:
    """A ClickHouse single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def column_type(field: pa.Field) -> str:
    """The ClickHouse type that reads back as ``field``'s Arrow type."""
    base = _base_type(field.type)
    typ = f"Nullable({base})" if field.nullable else base
    if field.name in LOW_CARDINALITY and base == "String":
        typ = f"LowCardinality({typ})"
    return typ


def _base_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_timestamp(arrow_type):
        if arrow_type.unit != "ms" or arrow_type.tz != "UTC":
            raise TypeError(f"timestamps must be ms UTC, got {arrow_type}")
        return "DateTime64(3, 'UTC')"
    simple = {
        pa.string(): "String",
        pa.binary(): "String",
        pa.int32(): "Int32",
        pa.int64(): "Int64",
        pa.uint64(): "UInt64",
        pa.float64(): "Float64",
    }
    if arrow_type not in simple:
        raise TypeError(f"no ClickHouse mapping for Arrow type {arrow_type}")
    return simple[arrow_type]


def create_table(db: str, spec: TableSpec) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one output table, with comments on everything."""
    comments = COLUMN_COMMENTS[spec.name]
    columns = []
    for field in schema.OUTPUT_TABLES[spec.name]:
        if field.name not in comments:
            raise KeyError(f"column {spec.name}.{field.name} has no comment")
        columns.append(
            f"    `{field.name}` {column_type(field)} COMMENT {quote_string(comments[field.name])}"
        )
    partition = f"PARTITION BY {spec.partition_by}\n" if spec.partition_by else ""
    return (
        f"CREATE TABLE IF NOT EXISTS {db}.{spec.name}\n(\n"
        + ",\n".join(columns)
        + f"\n)\nENGINE = {spec.engine}\n{partition}ORDER BY {spec.order_by}\n"
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}\n"
        f"COMMENT {quote_string(spec.comment)}"
    )


JOBS_TABLE = "pipeline_jobs"
"""The job record: which job's output the database holds (see gpu_pipeline.sinks.jobs)."""


def create_jobs_table(db: str) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the job record (one row per job)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {db}.{JOBS_TABLE}\n(\n"
        "    `job_id` String COMMENT 'Job id: hash of source, sink, database and semantics',\n"
        "    `identity` String COMMENT 'The job identity as JSON (no secrets)',\n"
        "    `cuts` String COMMENT 'How its first run cut batches and checkpoints',\n"
        "    `recorded_at` DateTime64(3, 'UTC') COMMENT 'When the job first wrote here'\n"
        ")\nENGINE = ReplacingMergeTree\nORDER BY job_id\n"
        f"COMMENT {quote_string('The gpu-pipeline job whose output this database holds')}"
    )


def create_view(db: str, view: ViewSpec) -> str:
    """``CREATE OR REPLACE VIEW``: idempotent, and upgrades the definition in place."""
    return (
        f"CREATE OR REPLACE VIEW {db}.{view.name} AS {view.select} "
        f"COMMENT {quote_string(view.comment)}"
    )


def schema_statements(db: str) -> list[str]:
    """Every statement that creates database ``db`` with its tables and views, in order."""
    check_identifier(db, "database")
    statements = [
        f"CREATE DATABASE IF NOT EXISTS {db} "
        f"COMMENT {quote_string('gpu-pipeline clickstream output (SPEC §3)')}"
    ]
    statements += [create_table(db, spec) for spec in TABLES]
    statements.append(create_jobs_table(db))
    statements += [create_view(db, view) for view in _views(db)]
    return statements


def view_names() -> tuple[str, ...]:
    """Names of the dashboard views."""
    return tuple(view.name for view in _views("db"))

"""The event schema (SPEC §1) and the Arrow schemas of every output table (SPEC §3).

These schemas are the contract between the decoder, the operators, the reference
model and the sinks: every stage produces and consumes exactly these columns.
Timestamps are UTC milliseconds everywhere.
"""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "checkout",
    "purchase",
)
"""Valid ``event_type`` values; an event's type code is its index here (int8)."""

EVENT_TYPE_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}

NEEDS_PRODUCT_ID: frozenset[str] = frozenset(
    {"product_view", "add_to_cart", "remove_from_cart", "purchase"}
)
NEEDS_PRICE: frozenset[str] = frozenset({"add_to_cart", "purchase"})
DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet")

MAX_EVENT_ID_CHARS = 64
MAX_TS_MS = 10_413_791_999_999
"""2299-12-31T23:59:59.999Z: the latest accepted event time (the end of ClickHouse DateTime64)."""
MAX_PRICE = 1e9
"""Largest accepted unit price; larger values are dead letters (keeps revenue sums exact)."""
MAX_QUANTITY = 1_000_000
MAX_LINE_REVENUE = 1e12
"""Largest accepted ``price * quantity``; revenue is summed in exact integer micro-units."""
REVENUE_SCALE = 1_000_000
"""Revenue is accumulated as int64 micro-units (round(price * quantity * 1e6)) so that sums are
exact and identical on every engine and batch split; it is reported as Float64 units."""

TS = pa.timestamp("ms", tz="UTC")

# Decoded, validated events of one partition in arrival order.  ``offset`` is the source
# position (Kafka offset, or the 0-based line number in a file) and ``seq`` the index of the
# event inside its Kafka message (0 unless a message carries several NDJSON events).
EVENT_FIELDS: list[pa.Field] = [
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("ts", TS, nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("page", pa.string()),
    pa.field("product_id", pa.int64()),
    pa.field("category", pa.string()),
    pa.field("price", pa.float64()),
    pa.field("quantity", pa.int32(), nullable=False),
    pa.field("country", pa.string()),
    pa.field("device", pa.string()),
    pa.field("referrer", pa.string()),
]
POSITION_FIELDS: list[pa.Field] = [
    pa.field("partition", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("seq", pa.int32(), nullable=False),
]
DECODED_EVENTS = pa.schema(EVENT_FIELDS + POSITION_FIELDS)

EVENTS = pa.schema(
    EVENT_FIELDS + [pa.field("session_id", pa.uint64(), nullable=False)] + POSITION_FIELDS
)

LATE_EVENTS = pa.schema(
    EVENT_FIELDS
    + [
        pa.field("watermark", TS, nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
    + POSITION_FIELDS
)

DEAD_LETTERS = pa.schema(
    [
        pa.field("raw", pa.binary(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
    + POSITION_FIELDS
)

SESSIONS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("session_id", pa.uint64(), nullable=False),
        pa.field("session_start", TS, nullable=False),
        pa.field("session_end", TS, nullable=False),
        pa.field("events", pa.int64(), nullable=False),
        pa.field("page_views", pa.int64(), nullable=False),
        pa.field("product_views", pa.int64(), nullable=False),
        pa.field("add_to_carts", pa.int64(), nullable=False),
        pa.field("purchases", pa.int64(), nullable=False),
        pa.field("revenue", pa.float64(), nullable=False),
        pa.field("landing_page", pa.string()),
        pa.field("exit_page", pa.string()),
        pa.field("partition", pa.int32(), nullable=False),
    ]
)

TRAFFIC_1M = pa.schema(
    [
        pa.field("window_start", TS, nullable=False),
        pa.field("window_end", TS, nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("events", pa.int64(), nullable=False),
        pa.field("users", pa.int64(), nullable=False),
        pa.field("revenue", pa.float64(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("version", pa.uint64(), nullable=False),
    ]
)

PRODUCT_5M = pa.schema(
    [
        pa.field("window_start", TS, nullable=False),
        pa.field("window_end", TS, nullable=False),
        pa.field("product_id", pa.int64(), nullable=False),
        pa.field("views", pa.int64(), nullable=False),
        pa.field("add_to_carts", pa.int64(), nullable=False),
        pa.field("purchases", pa.int64(), nullable=False),
        pa.field("revenue", pa.float64(), nullable=False),
        pa.field("users", pa.int64(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("version", pa.uint64(), nullable=False),
    ]
)

QUALITY_FIELDS: tuple[str, ...] = ("page", "category", "country", "device", "referrer")
"""Optional event fields whose presence ``quality_1m`` counts (completeness)."""
QUALITY_SUMS: tuple[str, ...] = (
    "records",
    "dead_letters",
    "events",
    "duplicates",
    "late",
    "on_time",
    *(f"with_{name}" for name in QUALITY_FIELDS),
    "lag_events",
    "lag_ms_sum",
)
"""Columns of ``quality_1m`` that add up across rows of one minute and partition
(``lag_ms_max`` is a maximum)."""

QUALITY_1M = pa.schema(
    [
        pa.field("minute", TS, nullable=False),
        *(pa.field(name, pa.int64(), nullable=False) for name in QUALITY_SUMS),
        pa.field("lag_ms_max", pa.int64(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
    ]
)
"""Partial data-quality counts of one partition and minute (gpu_pipeline.operators.quality)."""

OUTPUT_TABLES: dict[str, pa.Schema] = {
    "events": EVENTS,
    "sessions": SESSIONS,
    "traffic_1m": TRAFFIC_1M,
    "product_5m": PRODUCT_5M,
    "late_events": LATE_EVENTS,
    "dead_letters": DEAD_LETTERS,
    "quality_1m": QUALITY_1M,
}
"""Every table the pipeline writes, by name."""

VERSIONED_TABLES: frozenset[str] = frozenset({"traffic_1m", "product_5m"})
"""Window tables: every write of a row is a new version (read with FINAL)."""
ADDITIVE_TABLES: frozenset[str] = frozenset({"quality_1m"})
"""Tables of partial sums: rows of one key add up (read through their ``_total`` view)."""

"""The NDJSON decoder agrees with the per-record validator, record for record."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gpu_pipeline import schema
from gpu_pipeline.decode.base import DecodeResult, TypedBatch
from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.decode.validate import Rejected, event_type_codes, revenue_micros, validate_record
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.sources.base import RawBatch
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks

GOOD = (
    b'{"event_id":"e1","user_id":7,"ts":"2026-11-25T12:00:00.1Z","event_type":"purchase",'
    b'"product_id":3,"price":19.99,"quantity":3,"country":"DE","device":"mobile"}'
)


def assert_matches_validator(raw: RawBatch, result: DecodeResult) -> None:
    """Every record is where the validator puts it, with the same values or error field."""
    verdicts = [validate_record(raw.record(i)) for i in range(len(raw))]
    good = [i for i, v in enumerate(verdicts) if not isinstance(v, Rejected)]
    dead = [i for i, v in enumerate(verdicts) if isinstance(v, Rejected)]
    events = result.events
    assert events.schema == schema.DECODED_EVENTS
    assert result.dead.schema == schema.DEAD_LETTERS
    assert events.column("offset").to_pylist() == [int(raw.offsets[i]) for i in good]
    assert events.column("seq").to_pylist() == [int(raw.seqs[i]) for i in good]
    assert set(events.column("partition").to_pylist()) <= {raw.partition}
    ts_ms = events.column("ts").cast(pa.int64())
    rows = events.set_column(2, "ts", ts_ms).select([f.name for f in schema.EVENT_FIELDS])
    assert rows.to_pylist() == [verdicts[i] for i in good]
    letters = result.dead.to_pylist()
    assert [d["offset"] for d in letters] == [int(raw.offsets[i]) for i in dead]
    assert [d["raw"] for d in letters] == [raw.record(i) for i in dead]
    assert [d["error"] for d in letters] == [verdicts[i].error for i in dead]  # type: ignore[union-attr]
    assert all(d["source"] == raw.source for d in letters)


def generated(events: int, seed: int) -> RawBatch:
    data = b"".join(generate_ndjson_chunks(events, seed))
    return RawBatch.from_lines(0, data.split(b"\n")[:-1], source="synthetic")


@pytest.mark.parametrize(
    ("events", "threads", "chunk_bytes"),
    [(40_000, 1, 2 << 20), (40_000, 2, 300_000), (5_000, 2, 20_000)],
)
def test_generated_stream_decodes_like_the_validator(
    events: int, threads: int, chunk_bytes: int
) -> None:
    raw = generated(events, 21)
    decoder = ArrowJsonDecoder(threads=threads, chunk_bytes=chunk_bytes)
    try:
        result = decoder.decode(raw)
    finally:
        decoder.close()
    assert result.dead.num_rows > events // 2_000
    assert_matches_validator(raw, result)


def test_values_are_normalised() -> None:
    raw = RawBatch.from_lines(
        3,
        [
            GOOD,
            b'{"event_id":"e2","user_id":0,"ts":1795564800000,"event_type":"page_view",'
            b'"quantity":null,"page":null,"extra":{"nested":[1,2,{"x":null}]}}',
        ],
        first_offset=41,
    )
    result = ArrowJsonDecoder(threads=1).decode(raw)
    rows = result.events.to_pylist()
    assert [r["ts"].isoformat() for r in rows] == [
        "2026-11-25T12:00:00.100000+00:00",
        "2026-11-25T00:00:00+00:00",
    ]
    assert [r["quantity"] for r in rows] == [3, 1]
    assert rows[0]["price"] == 19.99 and rows[1]["price"] is None
    assert [(r["partition"], r["offset"], r["seq"]) for r in rows] == [(3, 41, 0), (3, 42, 0)]
    assert revenue_micros(result.events).tolist() == [59_970_000, 0]
    assert event_type_codes(result.events).tolist() == [6, 0]


def test_any_buffer_layout_and_positions_are_kept() -> None:
    """Records need not be newline-separated in order (Kafka batches are not)."""
    lines = generated(3_000, 5)
    records = [lines.record(i) for i in range(len(lines))]
    buffer = b"".join(b"##" + r for r in reversed(records))
    ends = np.cumsum([2 + len(r) for r in reversed(records)])[::-1]
    starts = ends - np.array([len(r) for r in records])
    raw = RawBatch(
        partition=5,
        buffer=buffer,
        starts=starts.astype(np.int64),
        ends=ends.astype(np.int64),
        offsets=np.repeat(np.arange(1_500, dtype=np.int64) * 10, 2),
        seqs=np.tile(np.array([0, 1], dtype=np.int32), 1_500),
        source="kafka://t",
        next_offset=15_000,
    )
    assert [raw.record(i) for i in range(len(raw))] == records
    result = ArrowJsonDecoder(threads=2, chunk_bytes=50_000).decode(raw)
    assert_matches_validator(raw, result)


def test_empty_batch_gives_empty_tables() -> None:
    result = ArrowJsonDecoder().decode(RawBatch.from_lines(0, []))
    assert result.events.num_rows == 0 and result.events.schema == schema.DECODED_EVENTS
    assert result.dead.num_rows == 0 and result.dead.schema == schema.DEAD_LETTERS


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"threads": "2"}, {"chunk_bytes": 0}])
def test_bad_options_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ArrowJsonDecoder(**kwargs)  # type: ignore[arg-type]


def test_revenue_rounds_half_to_even_in_micro_units() -> None:
    table = pa.table(
        {
            "event_type": ["purchase", "purchase", "add_to_cart", "purchase"],
            "price": [0.0000005, 0.0000015, 5.0, 1e9],
            "quantity": pa.array([1, 1, 2, 1000], pa.int32()),
        }
    )
    assert revenue_micros(table).tolist() == [0, 2, 0, 10**18]


def typed(rows: pa.Table) -> TypedBatch:
    n = rows.num_rows
    return TypedBatch(
        partition=0,
        buffer=b"",
        starts=np.zeros(n, dtype=np.int64),
        ends=np.zeros(n, dtype=np.int64),
        offsets=np.arange(n, dtype=np.int64),
        seqs=np.zeros(n, dtype=np.int32),
        source="file:x.parquet",
        next_offset=n,
        rows=rows.to_batches()[0],
    )


def test_typed_rows_follow_the_same_rules() -> None:
    rows = pa.table(
        {
            "event_id": ["a", "b", "c", "d", "e", "x" * 65],
            "user_id": pa.array([1, 2, 3, 4, 5, 6], pa.int32()),
            "ts": pa.array(
                [
                    "2026-11-25T00:00:00Z",
                    "2026-02-29T00:00:00Z",
                    None,
                    "1970-01-01T00:00:00Z",
                    "2299-12-31T23:59:59.999Z",
                    "2026-11-25T00:00:00Z",
                ]
            ),
            "event_type": ["purchase", "page_view", "page_view", "click", "page_view", "search"],
            "price": pa.array([1.5, None, None, None, None, None], pa.float32()),
            "product_id": pa.array([None, None, None, None, None, None], pa.int64()),
            "quantity": pa.array([2.0, None, None, None, None, None]),
        }
    )
    result = ArrowJsonDecoder().decode(typed(rows))
    errors = [e.split(":")[0] for e in result.dead.column("error").to_pylist()]
    assert result.dead.column("offset").to_pylist() == [0, 1, 2, 3, 5]
    assert errors == ["product_id", "ts", "ts", "event_type", "event_id"]
    assert result.events.column("offset").to_pylist() == [4]
    bad_type = rows.set_column(6, "quantity", pa.array([2.0, None, 1.5, None, 3.0, None]))
    bad_type = bad_type.set_column(5, "product_id", pa.array([9, None, None, None, None, None]))
    letters = ArrowJsonDecoder().decode(typed(bad_type)).dead.to_pylist()
    assert letters[0]["error"] == "quantity: expected an integer, got double"
    assert b'"quantity": 2.0' in letters[0]["raw"]

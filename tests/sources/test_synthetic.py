"""The synthetic clickstream: deterministic, realistic, and dirty in the specified amounts."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gpu_pipeline import schema
from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.decode.validate import Rejected, validate_record
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.sources.synthetic import (
    CORRUPTIONS,
    SyntheticSource,
    generate_arrow,
    generate_ndjson_chunks,
    write_ndjson,
)

RATE_EVENTS = 150_000
SECOND = 1000


def stream(events: int, seed: int, chunk_events: int = 65536) -> bytes:
    return b"".join(generate_ndjson_chunks(events, seed, chunk_events))


@cache
def rate_sample() -> tuple[list[bytes], list[dict | Rejected]]:
    lines = stream(RATE_EVENTS, 11).split(b"\n")[:-1]
    return lines, [validate_record(line) for line in lines]


@pytest.mark.parametrize("chunk_events", [1, 997, 4096, 1 << 20])
def test_same_events_and_seed_give_the_same_bytes_whatever_the_chunk_size(
    chunk_events: int,
) -> None:
    events = 3_000 if chunk_events == 1 else 40_000
    assert stream(events, 5, chunk_events) == stream(events, 5)


def test_chunks_hold_the_requested_number_of_lines() -> None:
    chunks = list(generate_ndjson_chunks(10_000, 2, 3_000))
    assert [c.count(b"\n") for c in chunks] == [3_000, 3_000, 3_000, 1_000]
    assert all(c.endswith(b"\n") for c in chunks)


def test_different_seeds_give_different_streams() -> None:
    a, b = stream(5_000, 1), stream(5_000, 2)
    assert a != b
    ids_a, ids_b = (
        {v["event_id"] for v in map(validate_record, x.split(b"\n")[:-1]) if isinstance(v, dict)}
        for x in (a, b)
    )
    assert ids_a and not ids_a & ids_b


@pytest.mark.parametrize("events", [0, 1, 7, 12_345])
def test_exactly_the_requested_number_of_lines(events: int) -> None:
    data = stream(events, 3)
    assert data.count(b"\n") == events
    assert (data == b"") == (events == 0)
    lines = data.split(b"\n")[:-1]
    assert all(line.strip(b" \t\r") for line in lines), "no blank lines"


@pytest.mark.parametrize(
    ("events", "seed", "chunk_events"),
    [(-1, 0, 10), (1.5, 0, 10), (10, "x", 10), (10, 0, 0), (True, 0, 10)],
)
def test_bad_options_raise_config_error(events: object, seed: object, chunk_events: object) -> None:
    with pytest.raises(ConfigError):
        list(generate_ndjson_chunks(events, seed, chunk_events))  # type: ignore[arg-type]


def test_rates_of_invalid_records_and_retries() -> None:
    lines, verdicts = rate_sample()
    invalid = [line for line, v in zip(lines, verdicts, strict=True) if isinstance(v, Rejected)]
    assert 0.0005 < len(invalid) / len(lines) < 0.002
    kinds = Counter(v.field for v in verdicts if isinstance(v, Rejected))
    assert len(kinds) >= 6, kinds
    first_seen: dict[str, bytes] = {}
    retries = 0
    for line, verdict in zip(lines, verdicts, strict=True):
        if isinstance(verdict, Rejected):
            continue
        event_id = verdict["event_id"]
        if event_id in first_seen:
            retries += 1
            assert first_seen[event_id] == line, "a retry repeats the same bytes"
        else:
            first_seen[event_id] = line
    assert 0.015 < retries / len(lines) < 0.025


def _lateness_ms(verdicts: list[dict | Rejected]) -> tuple[np.ndarray, list[int]]:
    """Running max of valid ts before each first occurrence, minus its ts."""
    seen: set[str] = set()
    running = -(2**62)
    behind: list[int] = []
    gaps_after_retry: list[int] = []
    for verdict in verdicts:
        if isinstance(verdict, Rejected):
            continue
        if verdict["event_id"] in seen:
            gaps_after_retry.append(running - verdict["ts"])
        else:
            seen.add(verdict["event_id"])
            behind.append(running - verdict["ts"])
        running = max(running, verdict["ts"])
    return np.asarray(behind[1:]), gaps_after_retry


def test_rates_of_disorder_late_and_too_late_events() -> None:
    _, verdicts = rate_sample()
    behind, retry_delays = _lateness_ms(verdicts)
    out_of_order = np.mean((behind > 0) & (behind <= 5 * SECOND))
    late = np.mean((behind > 5 * SECOND) & (behind <= 65 * SECOND))
    too_late = np.mean(behind > 65 * SECOND)
    assert out_of_order > 0.05
    assert 0.003 < late < 0.008
    assert 0.0005 < too_late < 0.002
    retry_delays_s = np.asarray(retry_delays) / SECOND
    assert np.mean(retry_delays_s < 10) > 0.5, "most retries come a few events later"
    assert np.mean(retry_delays_s > 60) > 0.15, "some retries come much later"
    assert np.all(retry_delays_s < 3600), "retries stay within the dedup TTL"


def test_realistic_funnel_users_sessions_and_catalogue() -> None:
    _, verdicts = rate_sample()
    valid = [v for v in verdicts if not isinstance(v, Rejected)]
    types = Counter(v["event_type"] for v in valid)
    assert set(types) == set(schema.EVENT_TYPES)
    funnel = ["page_view", "product_view", "add_to_cart", "checkout", "purchase"]
    assert [types[t] for t in funnel] == sorted((types[t] for t in funnel), reverse=True)
    per_user = np.sort(np.array(list(Counter(v["user_id"] for v in valid).values())))[::-1]
    top = per_user[: max(1, len(per_user) // 100)].sum() / per_user.sum()
    assert top > 0.05, "heavy-tailed activity: the top 1% of users do more than 5%"
    by_user: dict[int, list[int]] = {}
    for v in valid:
        by_user.setdefault(v["user_id"], []).append(v["ts"])
    gaps = np.concatenate([np.diff(sorted(ts)) for ts in by_user.values() if len(ts) > 1])
    assert np.mean(gaps > 30 * 60 * SECOND) > 0.01
    assert np.mean(gaps < 30 * 60 * SECOND) > 0.5
    products = Counter(v["product_id"] for v in valid if v["product_id"] is not None)
    counts = np.sort(np.array(list(products.values())))[::-1]
    assert counts[0] > 10 * np.median(counts), "Zipf-popular products"
    priced = [v for v in valid if v["event_type"] == "purchase"]
    assert all(v["price"] > 0 and v["category"] and v["product_id"] for v in priced)
    assert {v["device"] for v in valid} == set(schema.DEVICES)
    assert len({v["country"] for v in valid}) > 10
    int_ts = sum(re.search(rb'"ts":[0-9]', line) is not None for line in rate_sample()[0])
    assert 0.005 < int_ts / RATE_EVENTS < 0.02, "about 1% of events carry ts as epoch ms"


def test_event_time_starts_at_the_epoch_and_advances() -> None:
    _, verdicts = rate_sample()
    ts = np.array([v["ts"] for v in verdicts if not isinstance(v, Rejected)])
    assert ts.min() >= 1_795_564_800_000  # 2026-11-25T00:00:00Z
    span_h = (ts.max() - ts.min()) / 3_600_000
    assert 2 < span_h < 8


def test_every_corruption_kind_yields_a_dead_letter() -> None:
    line = stream(200, 4).split(b"\n")[0]
    for h in range(3 * len(CORRUPTIONS)):
        from gpu_pipeline.sources.synthetic import corrupt_line

        assert isinstance(validate_record(corrupt_line(line, h)), Rejected), h


def test_arrow_output_is_the_decoded_valid_stream() -> None:
    events = 20_000
    arrow = pa.Table.from_batches(list(generate_arrow(events, 9)))
    data = stream(events, 9)
    from gpu_pipeline.sources.base import RawBatch

    raw = RawBatch.from_lines(0, data.split(b"\n")[:-1])
    decoded = ArrowJsonDecoder(threads=1).decode(raw).events
    assert arrow.schema == pa.schema(schema.EVENT_FIELDS)
    assert decoded.select(arrow.column_names).equals(arrow)


def test_source_yields_lines_at_their_offsets_and_resumes() -> None:
    data = stream(5_000, 6).split(b"\n")[:-1]
    source = SyntheticSource(5_000, 6)
    batches = list(source.batches(1_300, {}))
    assert [len(b) for b in batches] == [1_300, 1_300, 1_300, 1_100]
    records = [b.record(i) for b in batches for i in range(len(b))]
    assert records == data
    offsets = np.concatenate([b.offsets for b in batches])
    assert offsets.tolist() == list(range(5_000))
    assert [b.next_offset for b in batches] == [1_300, 2_600, 3_900, 5_000]
    resumed = list(source.batches(1_000, {0: 2_222}))
    assert resumed[0].offsets[0] == 2_222
    assert [r for b in resumed for r in (b.record(i) for i in range(len(b)))] == data[2_222:]
    assert list(source.batches(1_000, {0: 5_000})) == []


def test_write_ndjson_plain_and_gzip(tmp_path: Path) -> None:
    seen: list[int] = []
    plain, packed = tmp_path / "a.ndjson", tmp_path / "a.ndjson.gz"
    assert write_ndjson(plain, 70_000, 8, seen.append) == 70_000
    assert seen[-1] == 70_000 and seen == sorted(seen)
    write_ndjson(packed, 70_000, 8)
    assert plain.read_bytes() == stream(70_000, 8)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()

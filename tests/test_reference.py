"""The reference model against hand-worked examples of every rule, and its own invariants.

The expected values below were worked out by hand from the contract (docs/semantics.md),
not by running the model.  Unless a test says otherwise the parameters are D = 5 s,
L = 60 s, TTL = 10 min, G = 30 s with the default windows, and T0 = 2026-11-25T12:00:00Z,
which is a multiple of every window size.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings

from gpu_pipeline import schema
from gpu_pipeline.hashing import session_id
from gpu_pipeline.semantics import Semantics, WindowSpec
from tests.reference import (
    ReferenceResult,
    canonical,
    closed_sessions_before_end,
    keep_final_versions,
    reference_run,
    reference_window_versions_trace,
    validate_record,
    window_starts,
)
from tests.streams import CORRUPTIONS, VALID_EDGES, StreamCase, make_event, random_stream
from tests.streams import record_streams as streams

T0 = 1_795_608_000_000
D, L, TTL, G = 5_000, 60_000, 600_000, 30_000
SEM = Semantics(
    max_out_of_orderness_ms=D, allowed_lateness_ms=L, dedup_ttl_ms=TTL, session_gap_ms=G
)
MIN = 60_000


def ev(event_id: str, ts: int | str, user: int = 1, kind: str = "page_view", **extra: Any) -> bytes:
    """One event as JSON bytes; product events get product 7 and price 1 unless given."""
    event: dict[str, Any] = {"event_id": event_id, "user_id": user, "ts": ts, "event_type": kind}
    if kind in schema.NEEDS_PRODUCT_ID:
        event["product_id"] = 7
    if kind in schema.NEEDS_PRICE:
        event["price"] = 1.0
    event.update(extra)
    return json.dumps(event).encode()


def run(*records: bytes, sem: Semantics = SEM) -> ReferenceResult:
    """Partition 0 holding the records at offsets 0, 1, 2, ..."""
    return reference_run({0: [(i, 0, raw) for i, raw in enumerate(records)]}, sem)


def column(result: ReferenceResult, table: str, name: str) -> list[Any]:
    return result.tables[table].column(name).to_pylist()


def ms(values: list[Any]) -> list[int]:
    """Timestamps read back from Arrow as epoch milliseconds."""
    return [int(value.timestamp() * 1000) for value in values]


def rows(result: ReferenceResult, table: str, *names: str) -> list[tuple[Any, ...]]:
    """Selected columns of a table in canonical order, timestamps as epoch ms."""
    data = canonical(table, result.tables[table]).to_pylist()
    return [
        tuple(
            int(row[n].timestamp() * 1000) if hasattr(row[n], "timestamp") else row[n]
            for n in names
        )
        for row in data
    ]


# ----------------------------------------------------------------------------- watermark


def test_first_event_is_never_late_and_sets_the_watermark() -> None:
    result = run(ev("a", T0 + 100_000), ev("b", T0))
    # W(b) = T0 + 100 s - D = T0 + 95 s; b is 95 s behind it, more than L = 60 s.
    assert column(result, "events", "event_id") == ["a"]
    assert column(result, "late_events", "event_id") == ["b"]
    assert ms(column(result, "late_events", "watermark")) == [T0 + 95_000]
    assert column(result, "late_events", "reason") == [
        "ts is 95000 ms behind the watermark; allowed lateness is 60000 ms"
    ]


def test_watermark_counts_duplicates_and_late_events_but_not_dead_letters() -> None:
    result = run(
        ev("a", T0),
        ev("a", T0 + 200_000),  # duplicate, yet it moves the watermark to T0 + 195 s
        ev("x", T0 + 900_000, kind="nope"),  # dead letter: does not move it
        ev("b", T0 + 130_000),  # W = T0 + 195 s, W - L = T0 + 135 s: too late
        ev("c", T0 + 135_000),  # exactly W - L: on time
    )
    assert column(result, "events", "event_id") == ["a", "c"]
    assert column(result, "late_events", "event_id") == ["b"]
    assert ms(column(result, "late_events", "watermark")) == [T0 + 195_000]
    assert result.stats["duplicates"] == 1
    assert result.stats["dead_letters"] == 1


def test_partitions_have_independent_watermarks_and_dedup() -> None:
    result = reference_run(
        {
            0: [(0, 0, ev("a", T0 + 1_000_000)), (1, 0, ev("b", T0))],
            1: [(0, 0, ev("b", T0)), (1, 0, ev("a", T0 + 1_000_000))],
        },
        SEM,
    )
    assert rows(result, "events", "partition", "event_id") == [(0, "a"), (1, "b"), (1, "a")]
    assert rows(result, "late_events", "partition", "event_id") == [(0, "b")]
    assert result.stats["duplicates"] == 0


# ----------------------------------------------------------------------------- lateness


@pytest.mark.parametrize(("ts", "late"), [(T0 + 35_000, False), (T0 + 34_999, True)])
def test_too_late_starts_one_ms_beyond_allowed_lateness(ts: int, late: bool) -> None:
    result = run(ev("a", T0 + 100_000), ev("b", ts))  # W(b) = T0 + 95 s, W - L = T0 + 35 s
    assert ("b" in column(result, "late_events", "event_id")) is late
    assert ("b" in column(result, "events", "event_id")) is not late
    if late:
        assert column(result, "late_events", "reason") == [
            "ts is 60001 ms behind the watermark; allowed lateness is 60000 ms"
        ]


def test_too_late_events_touch_no_session_and_no_window() -> None:
    result = run(ev("a", T0 + 100_000, user=1), ev("b", T0, user=2, kind="purchase"))
    assert column(result, "sessions", "user_id") == [1]
    assert column(result, "traffic_1m", "event_type") == ["page_view"]
    assert result.tables["product_5m"].num_rows == 0


# ----------------------------------------------------------------------------- dedup


@pytest.mark.parametrize(("push", "duplicate"), [(T0 + TTL + D - 1, True), (T0 + TTL + D, False)])
def test_dedup_ttl_expires_exactly_when_the_watermark_reaches_ts_plus_ttl(
    push: int, duplicate: bool
) -> None:
    # After "p", W = push - D: T0 + TTL - 1 (still a duplicate) or exactly T0 + TTL (expired).
    result = run(ev("a", T0), ev("p", push), ev("a", push, page="/again"))
    expected = ["a", "p"] if duplicate else ["a", "p", "a"]
    assert column(result, "events", "event_id") == expected
    assert result.stats["duplicates"] == int(duplicate)


def test_first_copy_wins_and_later_copies_are_written_nowhere() -> None:
    result = run(ev("a", T0, page="/first"), ev("a", T0 + 1, page="/second"), ev("a", T0 - 1))
    assert column(result, "events", "page") == ["/first"]
    assert result.stats["duplicates"] == 2
    assert result.tables["late_events"].num_rows == 0
    assert column(result, "sessions", "events") == [1]


def test_a_copy_of_a_too_late_event_is_a_duplicate() -> None:
    result = run(ev("x", T0 + 100_000), ev("late", T0), ev("late", T0 + 100_000))
    assert column(result, "late_events", "event_id") == ["late"]
    assert column(result, "events", "event_id") == ["x"]
    assert result.stats["duplicates"] == 1


def test_a_dead_letter_does_not_make_its_id_seen() -> None:
    result = run(ev("z", T0, user=-5), ev("z", T0))
    assert column(result, "events", "event_id") == ["z"]
    assert result.stats["duplicates"] == 0


def test_an_id_accepted_again_after_expiry_is_deduplicated_against_the_new_copy() -> None:
    result = run(
        ev("a", T0),
        ev("p", T0 + TTL + D),  # W = T0 + TTL: the first "a" has expired
        ev("a", T0 + TTL + D),  # accepted again
        ev("a", T0 + TTL + D),  # duplicate of the second copy
    )
    assert column(result, "events", "event_id") == ["a", "p", "a"]
    assert result.stats["duplicates"] == 1


# ----------------------------------------------------------------------------- sessions


def test_session_splits_at_a_gap_of_g_plus_one_not_g() -> None:
    result = run(ev("a", T0), ev("b", T0 + G), ev("c", T0 + 2 * G + 1))
    first = session_id(1, T0, "a")
    second = session_id(1, T0 + 2 * G + 1, "c")
    assert rows(result, "sessions", "session_id", "session_start", "session_end", "events") == [
        (first, T0, T0 + G, 2),
        (second, T0 + 2 * G + 1, T0 + 2 * G + 1, 1),
    ]
    assert column(result, "events", "session_id") == [first, first, second]


def test_out_of_order_event_joins_the_open_session_and_the_id_keeps_the_first_arrival() -> None:
    result = run(
        ev("a", T0 + 50_000, page="/later"),
        ev("b", T0 + 5_000, page="/earlier"),  # W = T0 + 45 s: on time, before the start
    )
    sid = session_id(1, T0 + 50_000, "a")
    assert column(result, "events", "session_id") == [sid, sid]
    assert rows(
        result, "sessions", "session_id", "session_start", "session_end", "landing_page"
    ) == [(sid, T0 + 5_000, T0 + 50_000, "/earlier")]


def test_users_have_separate_sessions_even_when_interleaved() -> None:
    result = run(ev("a", T0, user=1), ev("b", T0 + 1, user=2), ev("c", T0 + 2, user=1))
    assert rows(result, "sessions", "user_id", "events") == [(1, 2), (2, 1)]


def test_landing_and_exit_page_ties_go_to_earlier_and_later_arrival() -> None:
    result = run(
        ev("a", T0, page="/a"),
        ev("b", T0, page="/b"),
        ev("c", T0 + 1_000, page="/c"),
        ev("d", T0 + 1_000, page="/d"),
    )
    assert rows(result, "sessions", "landing_page", "exit_page") == [("/a", "/d")]


def test_exit_page_is_null_when_the_last_event_has_no_page() -> None:
    result = run(ev("a", T0, page="/a"), ev("b", T0 + 1_000))
    assert rows(result, "sessions", "landing_page", "exit_page") == [("/a", None)]


def test_session_counts_and_revenue_by_event_type() -> None:
    result = run(
        ev("a", T0),
        ev("b", T0 + 1, kind="product_view"),
        ev("c", T0 + 2, kind="add_to_cart", price=5.0),
        ev("d", T0 + 3, kind="purchase", price=2.5, quantity=2),
        ev("e", T0 + 4, kind="checkout"),
    )
    assert rows(
        result,
        "sessions",
        "events",
        "page_views",
        "product_views",
        "add_to_carts",
        "purchases",
        "revenue",
    ) == [(5, 1, 1, 1, 1, 5.0)]


def test_session_closes_when_the_watermark_passes_end_plus_gap_plus_lateness() -> None:
    # Closes once W > T0 + G + L = T0 + 90 s, i.e. after a valid event with ts > T0 + 95 s.
    result = run(ev("a", T0, user=1), ev("b", T0 + 95_000, user=2), ev("c", T0 + 95_001, user=2))
    closed = closed_sessions_before_end(result)
    assert [(c.user_id, c.closed_after, c.watermark_ms) for c in closed] == [
        (1, (2, 0), T0 + 90_001)
    ]
    at_end = [c for c in result.session_closes if c.closed_after is None]
    assert [c.user_id for c in at_end] == [2]
    assert result.stats["sessions_closed_by_watermark"] == 1


# ----------------------------------------------------------------------------- windows


def test_tumbling_window_membership_at_exact_boundaries() -> None:
    result = run(
        ev("a", T0 - 1, user=1),
        ev("b", T0, user=2),
        ev("c", T0 + MIN - 1, user=2),
        ev("d", T0 + MIN, user=3),
    )
    assert rows(result, "traffic_1m", "window_start", "window_end", "events", "users") == [
        (T0 - MIN, T0, 1, 1),
        (T0, T0 + MIN, 2, 1),
        (T0 + MIN, T0 + 2 * MIN, 1, 1),
    ]


def test_hopping_window_membership_at_exact_boundaries() -> None:
    assert window_starts(T0, SEM.windows[1]) == [T0 - k * MIN for k in range(5)]
    assert window_starts(T0 - 1, SEM.windows[1]) == [T0 - k * MIN for k in range(1, 6)]
    result = run(ev("a", T0, kind="product_view"), ev("b", T0 - 1, kind="product_view", user=2))
    got = rows(result, "product_5m", "window_start", "window_end", "views", "users")
    expected = [(T0 - 5 * MIN, T0, 1, 1)]
    expected += [(T0 - k * MIN, T0 + (5 - k) * MIN, 2, 2) for k in (4, 3, 2, 1)]
    expected += [(T0, T0 + 5 * MIN, 1, 1)]
    assert got == expected


def test_traffic_rows_are_per_event_type_and_revenue_counts_purchases_only() -> None:
    result = run(
        ev("a", T0, user=1),
        ev("b", T0 + 1, user=2),
        ev("c", T0 + 2, user=1, kind="add_to_cart", price=3.0),
        ev("d", T0 + 3, user=1, kind="purchase", price=4.0),
    )
    assert rows(result, "traffic_1m", "event_type", "events", "users", "revenue") == [
        ("add_to_cart", 1, 1, 0.0),
        ("page_view", 2, 2, 0.0),
        ("purchase", 1, 1, 4.0),
    ]


def test_product_users_count_every_event_with_the_product() -> None:
    single = Semantics(
        max_out_of_orderness_ms=D,
        allowed_lateness_ms=L,
        dedup_ttl_ms=TTL,
        session_gap_ms=G,
        windows=(WindowSpec("product_5m", 5 * MIN, 5 * MIN, "product_id"),),
    )
    result = run(
        ev("a", T0, user=1, product_id=7),  # a page view with a product: counts in users only
        ev("b", T0 + 1, user=2, kind="product_view"),
        ev("c", T0 + 2, user=3, kind="add_to_cart", price=2.0),
        ev("d", T0 + 3, user=3, kind="purchase", price=2.0, quantity=3),
        ev("e", T0 + 4, user=4),  # no product: not counted
        sem=single,
    )
    assert rows(
        result, "product_5m", "product_id", "views", "add_to_carts", "purchases", "revenue", "users"
    ) == [(7, 1, 1, 1, 6.0, 3)]
    assert result.tables["traffic_1m"].num_rows == 0


def test_version_counts_one_write_at_the_end_plus_one_per_later_arrival() -> None:
    result = run(
        ev("a", T0 + 30_000),  # W = -inf: before the end of [T0, T0 + 1 min)
        ev("p", T0 + MIN + D, kind="search"),  # W becomes exactly T0 + 1 min: written, v1
        ev("c", T0 + 10_000),  # W(c) = end: counts as after the end, v2
        ev("d", T0 + 20_000),  # v3
    )
    page_views = [
        (start, events, version)
        for start, kind, events, version in rows(
            result, "traffic_1m", "window_start", "event_type", "events", "version"
        )
        if kind == "page_view"
    ]
    assert page_views == [(T0, 3, 3)]
    writes = [
        (w.version, w.row["events"], w.written_after)
        for w in result.window_writes
        if w.table == "traffic_1m" and w.key == "page_view"
    ]
    assert writes == [(1, 1, (1, 0)), (2, 2, (2, 0)), (3, 3, (3, 0))]


def test_arrivals_before_the_watermark_reaches_the_end_share_the_first_version() -> None:
    result = run(ev("a", T0 + 30_000), ev("p", T0 + MIN + D - 1, kind="search"), ev("c", T0))
    versions = rows(result, "traffic_1m", "event_type", "events", "version")
    assert ("page_view", 2, 1) in versions


def test_an_event_creating_a_window_after_its_end_gets_version_one() -> None:
    # W = T0 + 90 s when "b" arrives; "b" is the first event of [T0, T0 + 1 min).
    result = run(ev("a", T0 + 95_000, kind="search"), ev("b", T0 + 40_000))
    assert ("page_view", T0, 1) in rows(
        result, "traffic_1m", "event_type", "window_start", "version"
    )


# ----------------------------------------------------------------------------- revenue


def test_revenue_is_summed_exactly_in_micro_units() -> None:
    assert 0.1 * 3 != 0.3 and 0.1 + 0.2 != 0.3  # why micro-units are needed
    result = run(
        ev("a", T0, kind="purchase", price=0.1, quantity=3),
        ev("b", T0 + 1, kind="purchase", price=0.1),
        ev("c", T0 + 2, kind="purchase", price=0.2),
    )
    assert column(result, "sessions", "revenue") == [0.6]
    assert rows(result, "traffic_1m", "revenue") == [(0.6,)]
    assert set(column(result, "product_5m", "revenue")) == {0.6}
    one = run(ev("a", T0, kind="purchase", price=0.1, quantity=3))
    assert column(one, "sessions", "revenue") == [0.3]


@pytest.mark.parametrize(
    ("price", "micros"), [(0.0000005, 0), (0.0000015, 2), (2.675, 2_675_000), (1e-7, 0)]
)
def test_revenue_rounds_each_unit_price_half_to_even(price: float, micros: int) -> None:
    result = run(ev("a", T0, kind="purchase", price=price))
    assert column(result, "sessions", "revenue") == [micros / 1e6]


# ----------------------------------------------------------------------------- records


def test_events_rows_carry_every_field_with_defaults() -> None:
    raw = (
        b'{"event_id": "a", "user_id": 9, "ts": "2026-11-25T12:00:00.5Z", '
        b'"event_type": "search", "page": null, "country": "DE", "unknown": [1, {"x": 2}]}'
    )
    result = reference_run({2: [(41, 1, raw)]}, SEM)
    row = result.tables["events"].to_pylist()[0]
    assert int(row.pop("ts").timestamp() * 1000) == T0 + 500
    assert row == {
        "event_id": "a",
        "user_id": 9,
        "event_type": "search",
        "page": None,
        "product_id": None,
        "category": None,
        "price": None,
        "quantity": 1,
        "country": "DE",
        "device": None,
        "referrer": None,
        "session_id": session_id(9, T0 + 500, "a"),
        "partition": 2,
        "offset": 41,
        "seq": 1,
    }


def test_dead_letters_keep_raw_bytes_error_source_and_position() -> None:
    bad = [b'{"event_id": "a", "user_id": "1"}', b"\xff\xfe", b""]
    records = [(10, 0, bad[0]), (10, 1, bad[1]), (11, 0, bad[2])]
    result = reference_run({3: records}, SEM, source="file:clicks.ndjson")
    got = result.tables["dead_letters"].to_pylist()
    assert [(r["raw"], r["partition"], r["offset"], r["seq"]) for r in got] == [
        (bad[0], 3, 10, 0),
        (bad[1], 3, 10, 1),
        (bad[2], 3, 11, 0),
    ]
    assert [r["error"].split(":")[0] for r in got] == ["user_id", "record", "record"]
    assert got[0]["error"] == "user_id: expected an integer, got string"
    assert {r["source"] for r in got} == {"file:clicks.ndjson"}


VALID = {"event_id": "a", "user_id": 1, "ts": T0, "event_type": "page_view"}


def _with(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}).encode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b" \t\r\n", "record"),
        (b"{} x", "record"),
        (b'{"a": NaN}', "record"),
        (b'{"a": -Infinity}', "record"),
        (b'{"a": "\\udc00"}', "record"),
        (b'{"a": ' + b"[" * 512 + b"]" * 512 + b"}", "record"),
        (b"[]", "record"),
        (b'{"event_id": "a", "event_id": "b"}', "record"),
        (b'{"user_id": "x", "user_id": 1, "ts": "bad"}', "record"),
        (b'{"ts": "bad", "user_id": "x"}', "event_id"),
        (_with(event_id="a" * 65), "event_id"),
        (_with(event_id=None), "event_id"),
        (_with(user_id=1.0, ts="bad"), "user_id"),
        (_with(user_id=2**63), "user_id"),
        (_with(user_id=False), "user_id"),
        (_with(ts="2026-11-25T12:00:00.Z"), "ts"),
        (_with(ts="2026-11-25T12:00:00.000000Z"), "ts"),
        (_with(ts="2026-11-25T12:00:00Z\n"), "ts"),
        (_with(ts="２026-11-25T12:00:00Z"), "ts"),
        (_with(ts="1969-12-31T23:59:59.999Z"), "ts"),
        (_with(ts="0000-01-01T00:00:00Z"), "ts"),
        (_with(ts=10_413_792_000_000), "ts"),
        (_with(ts="2300-01-01T00:00:00Z"), "ts"),
        (_with(ts=True), "ts"),
        (_with(event_type="PAGE_VIEW"), "event_type"),
        (_with(page="p" * 4097, product_id="x"), "page"),
        (_with(event_type="remove_from_cart"), "product_id"),
        (_with(product_id=True), "product_id"),
        (_with(category=1), "category"),
        (_with(event_type="purchase", product_id=1), "price"),
        (_with(price=float("inf")), "record"),
        (_with(price=1e300)[:-1] + b"00}", "price"),
        (_with(user_id=10**5000 // 10**4000), "user_id"),
        (_with(price=-(10**5000 // 10**4000)), "price"),
        (b'{"event_id": "a", "user_id": 1, "ts": 1e400, "event_type": "search"}', "ts"),
        (_with(price=1e9 * (1 + 2**-52)), "price"),
        (_with(price=-0.0, quantity=0), "quantity"),
        (_with(price=1e9, quantity=1001), "quantity"),
        (_with(quantity=True), "quantity"),
        (_with(country="D1"), "country"),
        (_with(country="ÄÖ"), "country"),
        (_with(device="Desktop"), "device"),
        (_with(referrer=1), "referrer"),
    ],
)
def test_validation_names_the_first_failing_field(raw: bytes, field: str) -> None:
    result = validate_record(raw)
    assert isinstance(result, str), "expected a dead letter"
    assert result.split(":")[0] == field, result


@pytest.mark.parametrize(
    "raw",
    [
        _with(ts="1970-01-01T00:00:00Z"),
        _with(ts="2299-12-31T23:59:59.999Z"),
        _with(ts=0),
        _with(ts="2024-02-29T23:59:59.9Z"),
        _with(event_id="ü" * 64),
        _with(user_id=2**63 - 1),
        _with(page="p" * 4096, referrer="", category=None),
        _with(price=1e9, quantity=1000),
        _with(price=0, event_type="purchase", product_id=0),
        _with(price=-0.0),
        _with(device=None, country=None, quantity=None),
        _with(extra={"event_id": 5, "deep": [[[None]]]}),
        _with(a=1e308, b=10**300, c=1e-400),
        _with(a=1e300)[:-1] + b', "b": 1e400, "c": -1' + b"0" * 5000 + b"}",
        b'{"a": ' + b"[" * 511 + b"]" * 511 + b', "event_id": "a", "user_id": 1, "ts": 0, '
        b'"event_type": "search"}',
        b'  {"event_id":"a","user_id":1,"ts":0,"event_type":"search","e":"\\ud83d\\ude00"}\t',
    ],
)
def test_records_at_the_limits_are_valid(raw: bytes) -> None:
    result = validate_record(raw)
    assert not isinstance(result, str), result


def test_timestamp_strings_read_fraction_digits_as_milliseconds() -> None:
    def ts_of(text: str) -> int:
        event = validate_record(_with(ts=text))
        assert not isinstance(event, str), event
        return event.ts_ms

    assert ts_of("2026-11-25T12:00:00Z") == T0
    assert ts_of("2026-11-25T12:00:00.1Z") == T0 + 100
    assert ts_of("2026-11-25T12:00:00.12Z") == T0 + 120
    assert ts_of("2026-11-25T12:00:00.123Z") == T0 + 123
    assert ts_of("2299-12-31T23:59:59.999Z") == 10_413_791_999_999


@pytest.mark.parametrize(("field", "corrupt"), CORRUPTIONS)
def test_every_stream_corruption_is_a_dead_letter_naming_its_field(
    field: str, corrupt: Any
) -> None:
    rng = random.Random(field)
    for event_type in schema.EVENT_TYPES:
        event = make_event(rng, "e1", 1, T0, event_type)
        result = validate_record(corrupt(rng, event))
        assert isinstance(result, str) and result.split(":")[0] == field, (event, result)


@pytest.mark.parametrize("edge", VALID_EDGES)
def test_every_stream_edge_record_is_valid(edge: Any) -> None:
    rng = random.Random(7)
    for event_type in schema.EVENT_TYPES:
        result = validate_record(edge(rng, make_event(rng, "e1", 1, T0, event_type)))
        assert not isinstance(result, str), result


# ----------------------------------------------------------------------------- invariants


def _check_invariants(case: StreamCase) -> None:
    result = reference_run(case.partitions, case.semantics)
    stats, tables = result.stats, result.tables
    assert stats["records"] == case.records == stats["events"] + stats["dead_letters"]
    assert stats["events"] == stats["duplicates"] + stats["late"] + stats["on_time"]
    assert tables["events"].num_rows == stats["on_time"]
    assert tables["late_events"].num_rows == stats["late"]
    for name, table_schema in schema.OUTPUT_TABLES.items():
        assert tables[name].schema == table_schema
    sessions = tables["sessions"]
    assert sum(sessions.column("events").to_pylist()) == stats["on_time"]
    assert set(tables["events"].column("session_id").to_pylist()) == set(
        sessions.column("session_id").to_pylist()
    )
    assert sorted(c.session_id for c in result.session_closes) == sorted(
        sessions.column("session_id").to_pylist()
    )
    # Final versions are what the write log ends with, row for row.
    for name in schema.VERSIONED_TABLES:
        written = [w.row for w in result.window_writes if w.table == name]
        final = keep_final_versions(name, pa.Table.from_pylist(written, schema=tables[name].schema))
        assert canonical(name, final).equals(canonical(name, tables[name]))
    for spec in case.semantics.windows:
        keyed = [e for e in tables["events"].to_pylist() if e[spec.key] is not None]
        table = tables[spec.table]
        if spec.table == "traffic_1m":
            total = sum(table.column("events").to_pylist())
            assert total == len(keyed) * spec.windows_per_event
        else:
            views = [e for e in keyed if e["event_type"] == "product_view"]
            assert sum(table.column("views").to_pylist()) == len(views) * spec.windows_per_event


@settings(max_examples=200, deadline=None)
@given(case=streams())
def test_invariants_on_adversarial_streams(case: StreamCase) -> None:
    _check_invariants(case)


@settings(max_examples=60, deadline=None)
@given(case=streams())
def test_partitions_are_processed_independently(case: StreamCase) -> None:
    together = reference_run(case.partitions, case.semantics)
    for name in schema.OUTPUT_TABLES:
        apart = [
            reference_run({p: records}, case.semantics).tables[name]
            for p, records in case.partitions.items()
        ]
        merged = pa.concat_tables([together.tables[name].slice(0, 0), *apart])
        assert canonical(name, merged).equals(canonical(name, together.tables[name]))


def test_random_streams_are_deterministic_and_reach_every_rule() -> None:
    sem = Semantics(
        max_out_of_orderness_ms=D, allowed_lateness_ms=L, dedup_ttl_ms=TTL, session_gap_ms=G
    )
    stream = random_stream(11, 3000, partitions=2, semantics=sem, users=6)
    assert stream == random_stream(11, 3000, partitions=2, semantics=sem, users=6)
    result = reference_run(stream, sem)
    for counter in ("dead_letters", "duplicates", "late", "sessions_closed_by_watermark"):
        assert result.stats[counter] > 0, counter
    reasons = set(column(result, "late_events", "reason"))
    assert f"ts is {L + 1} ms behind the watermark; allowed lateness is {L} ms" in reasons
    assert max(column(result, "traffic_1m", "version")) > 1
    assert max(column(result, "sessions", "events")) > 1
    _check_invariants(StreamCase(sem, stream))


def test_the_window_trace_is_the_write_log_of_a_run() -> None:
    records = {0: [(0, 0, ev("a", T0)), (1, 0, ev("b", T0 + 2 * MIN))]}
    trace = reference_window_versions_trace(records, SEM)
    assert trace == reference_run(records, SEM).window_writes
    first = [w for w in trace if w.table == "traffic_1m" and w.window_start_ms == T0]
    assert [(w.version, w.written_after) for w in first] == [(1, (1, 0))]

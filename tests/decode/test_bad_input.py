"""Bad input never crashes, never drops a good neighbour, and every path applies one set of rules.

Three oracles must agree record for record: the decoder (fast columnar path plus slow
path), the per-record validator, and the reference model in ``tests/reference.py``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.json as pj
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_pipeline import schema
from gpu_pipeline.decode.json import ArrowJsonDecoder, check_columns, parse_schema
from gpu_pipeline.decode.validate import FIELD_ORDER, Rejected, validate_record
from gpu_pipeline.sources.base import RawBatch
from tests.decode.test_json import GOOD, assert_matches_validator
from tests.reference import validate_record as reference_validate

DECODERS = {size: ArrowJsonDecoder(threads=1, chunk_bytes=size) for size in (64, 1 << 20)}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ADVERSARIAL: list[bytes] = [
    b"",
    b"   ",
    b"\t\r",
    b"\xff\xfe",
    b'{"event_id":"\xc3\x28"}',
    b'{"event_id":"e","user_id":1,"ts":"2026-11-25T00:00:00Z","event_type":"page_view","p":"\xed\xa0\x80"}',
    b"null",
    b"[]",
    b'"text"',
    b"42",
    b"{}",
    b"{}{}",
    b'{"event_id":"a"} {"event_id":"b"}',
    b"{",
    b'{"event_id":"x",}',
    b"\xef\xbb\xbf" + GOOD,
    GOOD + b" x",
    GOOD[:-1] + b',"price":NaN}',
    GOOD[:-1] + b',"extra":Infinity}',
    GOOD[:-1] + b',"extra":[1,-Infinity]}',
    GOOD[:-1] + b',"extra":{"deep":NaN}}',
    GOOD[:-1] + b',"event_id":"dup"}',
    GOOD[:-1] + b',"zz":1,"zz":2}',
    GOOD[:-1] + b',"nested":{"k":1,"k":2}}',
    GOOD[:-1] + b',"extra":' + b"[" * 600 + b"]" * 600 + b"}",
    GOOD[:-1] + b',"extra":' + b"[" * 510 + b"]" * 510 + b"}",
    GOOD[:-1] + b',"s":"\\ud800"}',
    GOOD[:-1] + b',"s":"\\ud83d\\ude00"}',
    GOOD.replace(b'"user_id":7', b'"user_id":7.0'),
    GOOD.replace(b'"user_id":7', b'"user_id":7e0'),
    GOOD.replace(b'"user_id":7', b'"user_id":true'),
    GOOD.replace(b'"user_id":7', b'"user_id":"7"'),
    GOOD.replace(b'"user_id":7', b'"user_id":-0'),
    GOOD.replace(b'"user_id":7', b'"user_id":9223372036854775807'),
    GOOD.replace(b'"user_id":7', b'"user_id":9223372036854775808'),
    GOOD.replace(b'"user_id":7', b'"user_id":' + b"9" * 5000),
    GOOD.replace(b'"user_id":7', b'"user_id":null'),
    GOOD.replace(b'"user_id":7', b'"user_id":{"a":1}'),
    GOOD.replace(b'"price":19.99', b'"price":1e400'),
    GOOD.replace(b'"price":19.99', b'"price":' + b"1" * 400),
    GOOD.replace(b'"price":19.99', b'"price":-0.0'),
    GOOD.replace(b'"price":19.99', b'"price":-0.01'),
    GOOD.replace(b'"price":19.99', b'"price":1000000000'),
    GOOD.replace(b'"price":19.99', b'"price":1000000000.0001'),
    GOOD.replace(b'"price":19.99', b'"price":false'),
    GOOD.replace(b'"price":19.99,"quantity":3', b'"price":1e9,"quantity":1000'),
    GOOD.replace(b'"price":19.99,"quantity":3', b'"price":1e9,"quantity":1001'),
    GOOD.replace(b'"quantity":3', b'"quantity":0'),
    GOOD.replace(b'"quantity":3', b'"quantity":1000001'),
    GOOD.replace(b'"quantity":3', b'"quantity":3000000000'),
    GOOD.replace(b'"quantity":3', b'"quantity":2.0'),
    GOOD.replace(b',"product_id":3', b""),
    GOOD.replace(b'"product_id":3', b'"product_id":-3'),
    GOOD.replace(b'"country":"DE"', b'"country":"de"'),
    GOOD.replace(b'"country":"DE"', b'"country":"DEU"'),
    GOOD.replace(b'"country":"DE"', b'"country":"\xc3\x84E"'),
    GOOD.replace(b'"country":"DE"', b'"country":null'),
    GOOD.replace(b'"device":"mobile"', b'"device":"Mobile"'),
    GOOD.replace(b'"device":"mobile"', b'"device":1'),
    GOOD.replace(b'"event_type":"purchase"', b'"event_type":"click"'),
    GOOD.replace(b'"event_type":"purchase"', b'"event_type":"page_view"'),
    GOOD.replace(b'"event_type":"purchase"', b'"event\\u005ftype":"page_view"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":""'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + "é".encode() * 64 + b'"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + "é".encode() * 65 + b'"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + "😀".encode() * 64 + b'"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + b"\\ud83d\\ude00" * 65 + b'"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"a\\u0000b"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"a\x01b"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"a\nb"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":\n"e1"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":\r"e1"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id" : "e1"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":12'),
    GOOD + b"\r",
    b" \t" + GOOD + b" \r\n ",
    *(
        GOOD.replace(b'"2026-11-25T12:00:00.1Z"', ts)
        for ts in (
            b'"2299-12-31T23:59:59.999Z"',
            b'"1970-01-01T00:00:00Z"',
            b'"1969-12-31T23:59:59.999Z"',
            b'"0000-01-01T00:00:00Z"',
            b'"2024-02-29T00:00:00.5Z"',
            b'"2000-02-29T23:59:59.12Z"',
            b'"2100-02-29T00:00:00Z"',
            b'"2023-02-29T00:00:00Z"',
            b'"2026-04-31T00:00:00Z"',
            b'"2026-13-01T00:00:00Z"',
            b'"2026-00-01T00:00:00Z"',
            b'"2026-11-25T24:00:00Z"',
            b'"2026-11-25T23:60:00Z"',
            b'"2026-11-25T23:59:60Z"',
            b'"2026-11-25T12:00:00.1234Z"',
            b'"2026-11-25T12:00:00.Z"',
            b'"2026-11-25t12:00:00Z"',
            b'"2026-11-25T12:00:00z"',
            b'"2026-11-25T12:00:00+00:00"',
            b'"2026-11-25 12:00:00Z"',
            b'" 2026-11-25T12:00:00Z"',
            b'"2026-11-25T12:00:00Z\\n"',
            '"２026-11-25T12:00:00Z"'.encode(),
            b'"2026-11-25T12:00:00.\\u0031Z"',
            b"1795564800000",
            b"0",
            b"-1",
            b"10413791999999",
            b"10413792000000",
            b"1795564800000.0",
            b"1.7e12",
            b" 1795564800000",
            b"true",
            b"null",
        )
    ),
]


@pytest.mark.parametrize("chunk_bytes", sorted(DECODERS))
def test_adversarial_records_between_good_neighbours(chunk_bytes: int) -> None:
    records = [r for bad in ADVERSARIAL for r in (GOOD.replace(b'"e1"', b'"n"'), bad)]
    raw = RawBatch.from_lines(2, records, first_offset=1_000, source="test")
    result = DECODERS[chunk_bytes].decode(raw)
    assert_matches_validator(raw, result)
    assert result.events.num_rows >= len(ADVERSARIAL), "no good neighbour is dropped"


@pytest.mark.parametrize("record", ADVERSARIAL)
def test_adversarial_record_alone(record: bytes) -> None:
    raw = RawBatch.from_lines(0, [record])
    assert_matches_validator(raw, DECODERS[1 << 20].decode(raw))


@pytest.mark.parametrize("record", ADVERSARIAL)
def test_validator_agrees_with_the_reference_model(record: bytes) -> None:
    assert_same_verdict(record)


def assert_same_verdict(record: bytes) -> None:
    ours = validate_record(record)
    theirs = reference_validate(record)
    if isinstance(ours, Rejected):
        assert isinstance(theirs, str), (record, ours.error)
        assert theirs.split(":")[0] == ours.field, (record, ours.error, theirs)
    else:
        assert not isinstance(theirs, str), (record, theirs)
        assert theirs.fields() == {**ours, "ts": theirs.fields()["ts"]}
        assert theirs.ts_ms == ours["ts"]


# --------------------------------------------------------------------------------------------
# Random records


def ts_text(moment: datetime, digits: int) -> str:
    fraction = f"{moment.microsecond // 1000:03d}"[:digits]
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if digits else "") + "Z"


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
TS_VALUES = st.one_of(
    st.builds(
        ts_text,
        st.datetimes(
            min_value=datetime(1969, 12, 31), max_value=datetime(2299, 12, 31, 23, 59, 59)
        ),
        st.integers(0, 3),
    ),
    st.integers(-5, 253_402_300_800_005),
    st.sampled_from([0, 10_413_791_999_999, 10_413_792_000_000, -1]),
    st.text(max_size=26),
    ANY_JSON,
)


def text_of(length: int) -> st.SearchStrategy[str]:
    return st.text(min_size=length, max_size=length)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.one_of(text_of(1), text_of(64), text_of(65), st.text(max_size=70), ANY_JSON),
    "user_id": st.one_of(st.integers(0, 2**63 - 1), st.integers(-(2**64), 2**64), ANY_JSON),
    "ts": TS_VALUES,
    "event_type": st.one_of(st.sampled_from([*schema.EVENT_TYPES, "click", ""]), ANY_JSON),
    "page": st.one_of(st.text(max_size=10), st.sampled_from(["x" * 4096, "é" * 4097]), ANY_JSON),
    "product_id": st.one_of(st.integers(0, 2**63 - 1), st.integers(-(2**64), 2**64), ANY_JSON),
    "category": st.one_of(st.text(max_size=10), ANY_JSON),
    "price": st.one_of(
        st.floats(min_value=0, max_value=2e9),
        st.integers(-5, 2 * 10**9),
        st.sampled_from([1e9, 1e9 + 1e-6, 0.0, -0.0, 5e-324]),
        ANY_JSON,
    ),
    "quantity": st.one_of(st.integers(-2, 2_000_000), ANY_JSON),
    "country": st.one_of(st.sampled_from(["US", "de", "D", "DEU", "Ä", "ÄB"]), ANY_JSON),
    "device": st.one_of(st.sampled_from([*schema.DEVICES, "TV", "Mobile"]), ANY_JSON),
    "referrer": st.one_of(st.text(max_size=10), ANY_JSON),
}
VALID_TS = st.one_of(
    st.builds(
        ts_text,
        st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2299, 12, 31, 23, 59, 59)),
        st.integers(0, 3),
    ),
    st.integers(0, 10_413_791_999_999),
)
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.text(min_size=1, max_size=64),
    "user_id": st.integers(0, 2**63 - 1),
    "ts": VALID_TS,
    "event_type": st.sampled_from(schema.EVENT_TYPES),
    "page": st.one_of(st.none(), st.text(max_size=12)),
    "product_id": st.integers(0, 2**63 - 1),
    "category": st.one_of(st.none(), st.text(max_size=12)),
    "price": st.one_of(st.floats(min_value=0, max_value=1e6), st.integers(0, 10**9)),
    "quantity": st.one_of(st.none(), st.integers(1, 1000)),
    "country": st.one_of(st.none(), st.sampled_from(["US", "DE", "JP", "ZZ"])),
    "device": st.one_of(st.none(), st.sampled_from(schema.DEVICES)),
    "referrer": st.one_of(st.none(), st.text(max_size=12)),
}


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """A JSON object that is valid, valid but for one field, or anything, serialised in
    one of several styles, sometimes damaged at the byte level."""
    mode = draw(st.sampled_from(["valid", "one bad field", "anything"]))
    bad_field = draw(st.sampled_from(FIELD_ORDER))
    obj: dict[str, Any] = {}
    for name in FIELD_ORDER:
        if draw(st.integers(0, 19)) == 0:
            continue
        adversarial = mode == "anything" or (mode == "one bad field" and name == bad_field)
        obj[name] = draw((FIELDS if adversarial else VALID_FIELDS)[name])
    obj.update(draw(st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=2)))
    text = json.dumps(
        obj,
        allow_nan=True,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    data = text.encode("utf-8")
    damage = draw(st.integers(0, 20))
    if damage == 1 and obj:
        key = draw(st.sampled_from(sorted(obj)))
        data = b"{" + json.dumps({key: None})[1:-1].encode() + b"," + data[1:]
    elif damage == 2:
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == 3:
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n"]))
            + data[at:]
        )
    elif damage == 4:
        data = draw(st.sampled_from([b"", b" ", b"null", b"[1]", b"{}{}", b"\xef\xbb\xbf{}"]))
    return data


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batch=st.lists(records(), min_size=1, max_size=12),
    chunk_bytes=st.sampled_from(sorted(DECODERS)),
)
def test_random_records_decode_like_the_validator(batch: list[bytes], chunk_bytes: int) -> None:
    raw = RawBatch.from_lines(1, batch, first_offset=7)
    assert_matches_validator(raw, DECODERS[chunk_bytes].decode(raw))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records())
def test_random_records_agree_with_the_reference_model(record: bytes) -> None:
    assert_same_verdict(record)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records())
def test_columnar_rules_agree_with_the_validator(record: bytes) -> None:
    """Where Arrow parses a record, the vectorised rules name the validator's field."""
    verdict = validate_record(record)
    if isinstance(verdict, Rejected) and verdict.field == "record":
        return
    obj = json.loads(record)
    int_ts = isinstance(obj.get("ts"), int) and not isinstance(obj.get("ts"), bool)
    try:
        table = pj.read_json(
            pa.BufferReader(record),
            parse_options=pj.ParseOptions(
                explicit_schema=parse_schema(int_ts=int_ts), unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid:
        return  # a JSON type the field does not take: Arrow rejects it, the slow path decides
    columns = {name: table.column(name).combine_chunks() for name in FIELD_ORDER}
    errors, ts_ms = check_columns(columns, int_ts=int_ts)
    field = None if errors[0] < 0 else FIELD_ORDER[errors[0]]
    if isinstance(verdict, Rejected):
        assert field == verdict.field, (record, verdict.error)
    else:
        assert field is None, (record, field)
        assert ts_ms[0] == verdict["ts"]


def test_ts_strings_at_calendar_boundaries() -> None:
    """Every day boundary of a leap cycle and both ends of the range parse exactly."""
    moments = [datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=d) for d in range(0, 1461 * 2, 7)]
    moments += [datetime(2299, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)]
    lines = [
        GOOD.replace(b"2026-11-25T12:00:00.1Z", ts_text(m - timedelta(milliseconds=1), 3).encode())
        for m in moments[1:]
    ]
    raw = RawBatch.from_lines(0, lines)
    result = DECODERS[1 << 20].decode(raw)
    assert result.dead.num_rows == 0
    got = result.events.column("ts").cast(pa.int64()).to_pylist()
    assert got == [math.floor((m - EPOCH) / timedelta(milliseconds=1)) - 1 for m in moments[1:]]

"""The native decoder (kernels/decode.cu + the exact path for what it leaves) decodes exactly
like the validator and like the Arrow decoder, record for record, on adversarial, random and
generated input; and its kernel really does decide the ordinary records itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.decode.native import NativeJsonDecoder, kernel_outputs
from gpu_pipeline.decode.validate import Rejected, validate_record
from gpu_pipeline.sources.base import RawBatch
from tests.decode.test_bad_input import ADVERSARIAL, records
from tests.decode.test_json import GOOD, assert_matches_validator, generated

NATIVE = NativeJsonDecoder(exact=ArrowJsonDecoder(threads=1, chunk_bytes=64))
ARROW = ArrowJsonDecoder(threads=1)

EDGES: list[bytes] = [
    GOOD[:-1] + b',"query":"desk lamp"}',
    GOOD[:-1] + b',"query":"a","x":1,"y":-2.5e-3,"z":true,"w":false,"v":null}',
    GOOD[:-1] + b',"a":1,"b":2,"c":3,"d":4,"e":5}',
    GOOD[:-1] + b',"q":"x","q":"y"}',
    GOOD[:-1] + b',"q":01}',
    GOOD[:-1] + b',"q":1.}',
    GOOD[:-1] + b',"q":-}',
    GOOD[:-1] + b',"q":1e}',
    GOOD[:-1] + b',"q":tru}',
    GOOD[:-1] + b',"q":nul}',
    GOOD[:-1] + b',"q":"\\"quoted\\""}',
    GOOD[:-1] + b',"q":[]}',
    GOOD[:-1] + b',"page":null,"category":null,"referrer":null}',
    GOOD.replace(b',"country":"DE"', b""),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + b"x" * 64 + b'"'),
    GOOD.replace(b'"event_id":"e1"', b'"event_id":"' + b"x" * 65 + b'"'),
    GOOD[:-1] + b',"page":"' + b"p" * 4096 + b'"}',
    GOOD[:-1] + b',"page":"' + b"p" * 4097 + b'"}',
    GOOD[:-1] + b',"referrer":""}',
    GOOD.replace(b"}", b',"extra_\\u0041":1}'),
    *(
        GOOD.replace(b'"price":19.99', b'"price":' + price)
        for price in (
            b"0",
            b"0.0",
            b"0e0",
            b"0.5",
            b"0.05",
            b"10.0",
            b"1e9",
            b"1E+9",
            b"1e-7",
            b"123456789012345",
            b"0.123456789012345",
            b"0.1234567890123456",
            b"1.7976931348623157",
            b"999999999.9999999",
            b"1000000000",
            b"1000000000.0",
            b"1000000000.000001",
            b"4e-23",
            b"1e22",
            b"5e-324",
            b"00.5",
            b"2.",
            b".5",
            b"+1",
        )
    ),
    *(
        GOOD.replace(b'"quantity":3', b'"quantity":' + q)
        for q in (b"1", b"1000000", b"1000001", b"0", b"9223372036854775807", b"1e0")
    ),
    GOOD.replace(b'"price":19.99,"quantity":3', b'"price":1000000,"quantity":1000000'),
    GOOD.replace(b'"price":19.99,"quantity":3', b'"price":1000000.0000001,"quantity":1000000'),
    *(
        GOOD.replace(b'"user_id":7', b'"user_id":' + u)
        for u in (
            b"0",
            b"9223372036854775807",
            b"9223372036854775808",
            b"18446744073709551616",
            b"00",
            b"1" + b"0" * 19,
        )
    ),
    *(
        GOOD.replace(b'"event_type":"purchase",', b'"event_type":"' + t + b'",')
        for t in (
            b"page_view",
            b"product_view",
            b"search",
            b"add_to_cart",
            b"remove_from_cart",
            b"checkout",
            b"purchase ",
            b"PURCHASE",
        )
    ),
    GOOD.replace(b',"product_id":3', b',"product_id":null'),
    GOOD.replace(b',"price":19.99', b""),
    GOOD.replace(b'"event_type":"purchase"', b'"event_type":"search"').replace(
        b',"product_id":3,"price":19.99', b""
    ),
    GOOD.replace(b'"device":"mobile"', b'"device":"tablet"'),
    GOOD.replace(b'"device":"mobile"', b'"device":"desktop"'),
    GOOD.replace(b'"device":"mobile"', b'"device":"tv"'),
    GOOD.replace(b'"device":"mobile"', b'"device":null'),
    GOOD.replace(b'"country":"DE"', b'"country":"D"'),
    GOOD.replace(b'"country":"DE"', b'"country":"D["'),
    b'{ "event_id" : "e" , "user_id" : 1 , "ts" : 0 , "event_type" : "page_view" }',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view"}\t ',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view"}}',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view",}',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view"',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view" "x":1}',
    b'{"event_id":"e""user_id":1,"ts":0,"event_type":"page_view"}',
    b'{"event_id":"e","user_id":1,"ts":00,"event_type":"page_view"}',
]


def assert_same_as_arrow(raw: RawBatch) -> None:
    native, arrow = NATIVE.decode(raw), ARROW.decode(raw)
    assert native.events.equals(arrow.events)
    assert native.dead.equals(arrow.dead)
    assert np.array_equal(native.record_index, arrow.record_index)


@pytest.mark.parametrize("record", ADVERSARIAL + EDGES)
def test_each_adversarial_record_decodes_like_the_validator(record: bytes) -> None:
    raw = RawBatch.from_lines(3, [GOOD, record, GOOD.replace(b'"e1"', b'"e2"')], first_offset=9)
    assert_matches_validator(raw, NATIVE.decode(raw))
    assert_same_as_arrow(raw)


def test_every_adversarial_record_in_one_batch() -> None:
    raw = RawBatch.from_lines(0, ADVERSARIAL + EDGES, source="test")
    assert_matches_validator(raw, NATIVE.decode(raw))
    assert_same_as_arrow(raw)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(records(), min_size=1, max_size=12))
def test_random_records_decode_like_the_validator_and_arrow(batch: list[bytes]) -> None:
    raw = RawBatch.from_lines(1, batch, first_offset=7)
    assert_matches_validator(raw, NATIVE.decode(raw))
    assert_same_as_arrow(raw)


@settings(max_examples=100, deadline=None)
@given(
    price=st.floats(0, 1e9, allow_nan=False),
    digits=st.integers(1, 17),
    style=st.sampled_from(["g", "e", "f"]),
)
def test_prices_are_bit_identical_to_the_validator(price: float, digits: int, style: str) -> None:
    text = f"{price:.{digits}{style}}" if style != "f" else f"{price:.{min(digits, 9)}f}"
    record = GOOD.replace(b'"price":19.99', b'"price":' + text.encode())
    raw = RawBatch.from_lines(0, [record])
    assert_matches_validator(raw, NATIVE.decode(raw))


def test_a_generated_stream_is_decided_by_the_kernel(cpu_backend: object) -> None:
    """The fast path is the path: every valid generated record is accepted by the kernel,
    and the whole stream still decodes exactly like the validator."""
    raw = generated(30_000, 5)
    result = NATIVE.decode(raw)
    assert_matches_validator(raw, result)
    assert_same_as_arrow(raw)
    n = len(raw)
    out = kernel_outputs(np, n)
    NATIVE._kernels.decode_records(
        n, np.frombuffer(raw.buffer, np.uint8), raw.starts, raw.ends, *out.values()
    )
    ok = out["ok"]
    valid = [not isinstance(validate_record(raw.record(i)), Rejected) for i in range(n)]
    assert int(ok.sum()) == sum(valid)
    assert not np.any(ok.astype(bool) & ~np.array(valid))


def test_json_strings_in_extras_and_spacing_are_accepted_by_the_kernel() -> None:
    record = json.dumps(
        {"event_id": "k", "user_id": 1, "ts": 5, "event_type": "page_view", "q": "x y"},
        separators=(", ", ": "),
    ).encode()
    raw = RawBatch.from_lines(0, [record])
    result = NATIVE.decode(raw)
    assert result.events.num_rows == 1 and result.dead.num_rows == 0

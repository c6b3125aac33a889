"""kernels/decode.cu on each engine: every record it accepts is valid, with exactly the
validator's values; on generated data it accepts every valid record; gather_spans copies
string bytes.  Runs on the CPU target, under the race detector, and on a GPU when present."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.decode.native import kernel_outputs
from gpu_pipeline.decode.validate import Rejected, validate_record
from gpu_pipeline.sources.base import RawBatch
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks

TEXT = ("event_id", "page", "category", "country", "referrer")
SAMPLES = [
    b'{"event_id":"a","user_id":1,"ts":"2024-02-29T23:59:59.5Z","event_type":"purchase",'
    b'"product_id":2,"price":0.1,"quantity":7,"country":"FR","device":"tablet","q":-1e-3}',
    b'{"event_id":"b","user_id":9223372036854775807,"ts":10413791999999,"event_type":"search"}',
    b'{"event_id":"c","user_id":1,"ts":"2023-02-29T00:00:00Z","event_type":"search"}',
    b'{"event_id":"d","user_id":1,"ts":0,"event_type":"add_to_cart","product_id":1,"price":5}',
    b'{"event_id":"e","user_id":1,"ts":0,"event_type":"page_view","page":"/\\u00e9"}',
    b'{"event_id":"f","user_id":1,"ts":0,"event_type":"page_view","price":123456.789e-3}',
    b"",
    b"{}",
]


def run_kernel(backend: Backend, raw: RawBatch) -> dict[str, np.ndarray]:
    out = kernel_outputs(backend.xp, len(raw))
    buf = backend.asarray(np.frombuffer(raw.buffer, dtype=np.uint8))
    backend.kernels.decode_records(
        len(raw), buf, backend.asarray(raw.starts), backend.asarray(raw.ends), *out.values()
    )
    return {name: backend.to_host(array) for name, array in out.items()}


def check_against_validator(raw: RawBatch, out: dict[str, Any]) -> int:
    """Every accepted record is valid with the validator's values; the number accepted."""
    nums, spans, codes = out["nums"].reshape(-1, 4), out["spans"].reshape(-1, 10), out["codes"]
    accepted = 0
    for i in range(len(raw)):
        if not out["ok"][i]:
            continue
        accepted += 1
        row = validate_record(raw.record(i))
        assert not isinstance(row, Rejected), (raw.record(i), row)
        assert [int(v) for v in nums[i]] == [
            row["user_id"], row["ts"], row["product_id"] or 0, row["quantity"]
        ]  # fmt: skip
        assert bool(out["has"][i] & 1) == (row["product_id"] is not None)
        if row["price"] is not None:
            assert struct.pack("<d", out["price"][i]) == struct.pack("<d", row["price"])
        for k, name in enumerate(TEXT):
            start, length = int(spans[i, 2 * k]), int(spans[i, 2 * k + 1])
            text = None if length < 0 else raw.buffer[start : start + length].decode()
            assert text == row[name], (name, raw.record(i))
        assert schema.EVENT_TYPES[codes[2 * i]] == row["event_type"]
        device = int(codes[2 * i + 1])
        assert (schema.DEVICES[device] if device >= 0 else None) == row["device"]
    return accepted


def test_accepted_samples_carry_the_validator_values(backend: Backend) -> None:
    raw = RawBatch.from_lines(0, SAMPLES)
    out = run_kernel(backend, raw)
    assert check_against_validator(raw, out) == 4
    assert out["ok"].tolist() == [1, 1, 0, 1, 0, 1, 0, 0]


def test_generated_records_are_all_decided_by_the_kernel(backend: Backend) -> None:
    lines = b"".join(generate_ndjson_chunks(6000, 3)).split(b"\n")[:-1]  # > 4096: threads
    raw = RawBatch.from_lines(0, lines)
    out = run_kernel(backend, raw)
    valid = sum(not isinstance(validate_record(line), Rejected) for line in lines)
    assert check_against_validator(raw, out) == valid
    assert valid > 5900


def test_gather_spans_copies_each_string(backend: Backend) -> None:
    data = b"hello, world and more"
    starts, lens = np.array([0, 7, 0, 17], np.int64), np.array([5, 5, 0, 4], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    out = backend.xp.zeros(int(offsets[-1]), dtype=backend.xp.uint8)
    backend.kernels.gather_spans(
        4,
        backend.asarray(np.frombuffer(data, np.uint8)),
        backend.asarray(starts),
        backend.asarray(lens),
        backend.asarray(offsets),
        out,
    )
    assert backend.to_host(out).tobytes() == b"helloworldmore"

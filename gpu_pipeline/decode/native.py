"""The native decoder: NDJSON records straight into typed columns by one kernel.

``kernels/decode.cu`` reads every record of a batch in parallel (OpenMP threads on the CPU
target; one CUDA thread per record on the GPU target) and *accepts* the records it can decide
with certainty under the validation contract, writing their fields as numbers, codes and
string spans into the batch's own buffer.  The records it cannot decide with certainty (an
escape, a non-ASCII byte, a repeated field, a nested value, any value a rule rejects,
numbers outside the exact fast path) go, as one compact sub-batch, to the exact decoder
(:class:`~gpu_pipeline.decode.json.ArrowJsonDecoder`, whose verdicts are the validator's), so
there is still one rule set, and dead letters stay exact, lossless and positioned.

The accepted rows' Arrow columns are assembled from the kernel's outputs without a Python
object per row: integer and float columns are the output arrays themselves, strings are
gathered by a second kernel into one Arrow data buffer per column, ``event_type`` and
``device`` are taken from their small dictionaries by code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.decode.base import Decoder, DecodeResult
from gpu_pipeline.sources.base import RawBatch

HAS_PRODUCT, HAS_PRICE = 1, 2
TEXT_FIELDS = ("event_id", "page", "category", "country", "referrer")
"""The string fields in the order of the kernel's spans."""
_EVENT_TYPES = pa.array(schema.EVENT_TYPES, pa.string())


def kernel_outputs(xp: Any, n: int) -> dict[str, Any]:
    """The output arrays of ``decode_records`` for ``n`` records, in its argument order, in
    the array module ``xp`` (numpy or CuPy); only ``ok`` needs a start value."""
    return {
        "ok": xp.zeros(n, dtype=xp.uint8),
        "nums": xp.empty(4 * n, dtype=xp.int64),
        "price": xp.empty(n, dtype=xp.float64),
        "spans": xp.empty(10 * n, dtype=xp.int64),
        "codes": xp.empty(2 * n, dtype=xp.int8),
        "has": xp.empty(n, dtype=xp.uint8),
    }


_DEVICES = pa.array(schema.DEVICES, pa.string())
_FIELDS = {f.name: f for f in schema.DECODED_EVENTS}


class NativeJsonDecoder(Decoder):
    """Decode with ``kernels/decode.cu``; the exact decoder decides what the kernel leaves."""

    def __init__(self, kernels: Any = None, exact: Decoder | None = None) -> None:
        if kernels is None:
            from gpu_pipeline.backend.kernels import load_cpu

            kernels = load_cpu()
        if exact is None:
            from gpu_pipeline.decode.json import ArrowJsonDecoder

            exact = ArrowJsonDecoder()
        self._kernels = kernels
        self._exact = exact

    def close(self) -> None:
        self._exact.close()

    def decode_records(self, raw: RawBatch) -> DecodeResult:
        n = len(raw)
        buf = np.frombuffer(raw.buffer, dtype=np.uint8)
        starts = np.ascontiguousarray(raw.starts, dtype=np.int64)
        ends = np.ascontiguousarray(raw.ends, dtype=np.int64)
        out = kernel_outputs(np, n)
        self._kernels.decode_records(n, buf, starts, ends, *out.values())
        accepted = np.flatnonzero(out["ok"])
        events = self._columns(
            raw, buf, accepted, out["nums"], out["price"], out["spans"], out["codes"], out["has"]
        )
        undecided = np.flatnonzero(out["ok"] == 0)
        if not undecided.shape[0]:
            return DecodeResult(
                events=events, dead=schema.DEAD_LETTERS.empty_table(), record_index=accepted
            )
        exact = self._exact.decode(_sub_batch(raw, undecided))
        if not exact.events.num_rows:  # the usual case: what is left are dead letters
            return DecodeResult(events=events, dead=exact.dead, record_index=accepted)
        if not accepted.shape[0]:
            return DecodeResult(
                events=exact.events, dead=exact.dead, record_index=undecided[exact.record_index]
            )
        index = np.concatenate([accepted, undecided[exact.record_index]])
        order = np.argsort(index, kind="stable")
        merged = pa.concat_tables([events, exact.events]).take(pa.array(order))
        return DecodeResult(events=merged, dead=exact.dead, record_index=index[order])

    def _columns(
        self,
        raw: RawBatch,
        buf: np.ndarray,
        rows: np.ndarray,
        nums: np.ndarray,
        price: np.ndarray,
        spans: np.ndarray,
        codes: np.ndarray,
        has: np.ndarray,
    ) -> pa.Table:
        """The accepted rows as ``schema.DECODED_EVENTS`` columns."""
        count = int(rows.shape[0])
        values = nums.reshape(-1, 4)[rows]
        span = spans.reshape(-1, 10)[rows]
        code = codes.reshape(-1, 2)[rows]
        flags = has[rows]
        texts = {
            name: self._strings(buf, span[:, 2 * k], span[:, 2 * k + 1])
            for k, name in enumerate(TEXT_FIELDS)
        }
        device = code[:, 1]
        columns: dict[str, pa.Array] = {
            "event_id": texts["event_id"],
            "user_id": pa.array(values[:, 0]),
            "ts": pa.array(values[:, 1]).view(schema.TS),
            "event_type": _EVENT_TYPES.take(pa.array(code[:, 0].astype(np.int32))),
            "page": texts["page"],
            "product_id": pa.array(values[:, 2], mask=(flags & HAS_PRODUCT) == 0),
            "category": texts["category"],
            "price": pa.array(price[rows], mask=(flags & HAS_PRICE) == 0),
            "quantity": pa.array(values[:, 3].astype(np.int32)),
            "country": texts["country"],
            "device": _DEVICES.take(pa.array(device.astype(np.int32), mask=device < 0)),
            "referrer": texts["referrer"],
            "partition": pa.array(np.full(count, raw.partition, np.int32)),
            "offset": pa.array(np.asarray(raw.offsets, np.int64)[rows]),
            "seq": pa.array(np.asarray(raw.seqs, np.int32)[rows]),
        }
        return pa.Table.from_arrays(
            [columns[name] for name in schema.DECODED_EVENTS.names], schema=schema.DECODED_EVENTS
        )

    def _strings(self, buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> pa.Array:
        """A string column from spans of ``buf`` (length -1: null), bytes gathered by kernel."""
        count = int(starts.shape[0])
        present = lens >= 0
        sizes = np.where(present, lens, 0)
        offsets = np.zeros(count + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        data = np.empty(int(offsets[-1]), np.uint8)
        if data.shape[0]:
            self._kernels.gather_spans(
                count,
                buf,
                np.ascontiguousarray(starts),
                np.ascontiguousarray(sizes),
                offsets,
                data,
            )
        validity = None if present.all() else pa.py_buffer(np.packbits(present, bitorder="little"))
        return pa.Array.from_buffers(
            pa.large_string(),
            count,
            [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
            null_count=int(count - np.count_nonzero(present)),
        ).cast(pa.string())


def _sub_batch(raw: RawBatch, rows: np.ndarray) -> RawBatch:
    """The records ``rows`` of ``raw`` as a compact batch with their own positions."""
    records = [raw.record(int(i)) for i in rows]
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    starts = np.zeros(len(records), np.int64)
    if len(records) > 1:
        starts[1:] = np.cumsum(lengths[:-1] + 1)
    return RawBatch(
        partition=raw.partition,
        buffer=b"\n".join(records) + b"\n",
        starts=starts,
        ends=starts + lengths,
        offsets=np.asarray(raw.offsets, np.int64)[rows],
        seqs=np.asarray(raw.seqs, np.int32)[rows],
        source=raw.source,
        next_offset=raw.next_offset,
    )

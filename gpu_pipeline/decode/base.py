"""The decoder seam: raw records in, validated events and dead letters out, as data.

A decoder never raises for a bad record: every record of a :class:`RawBatch` ends up in
exactly one of ``DecodeResult.events`` (valid, typed) or ``DecodeResult.dead`` (raw bytes
and the reason), each in arrival order.

Sources whose records are already typed (Parquet files) yield :class:`TypedBatch`, a
``RawBatch`` that carries an Arrow record batch instead of bytes.  ``Decoder.decode``
dispatches on it, so a runtime simply calls ``decoder.decode(batch)`` for every batch of
every source; decoder implementations only write :meth:`Decoder.decode_records`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.sources.base import RawBatch


@dataclass(frozen=True)
class DecodeResult:
    """The outcome of decoding one batch: valid events and dead letters, both in arrival order."""

    events: pa.Table
    """Rows of ``schema.DECODED_EVENTS``."""
    dead: pa.Table
    """Rows of ``schema.DEAD_LETTERS``."""
    record_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """For each row of ``events``, the index of its record in the decoded :class:`RawBatch`
    (so a later stage that sets a valid event apart can still quote its raw bytes)."""

    @staticmethod
    def empty() -> DecodeResult:
        """A result with no rows (an empty batch)."""
        return DecodeResult(
            events=schema.DECODED_EVENTS.empty_table(), dead=schema.DEAD_LETTERS.empty_table()
        )


@dataclass(frozen=True)
class TypedBatch(RawBatch):
    """Consecutive already-typed records of one partition (a Parquet row range).

    ``rows`` has (a subset of) the SPEC §1 columns in whatever Arrow types the file uses;
    ``buffer`` is empty and ``record(i)`` renders row ``i`` as JSON text, which is what a
    dead letter of such a record carries as its raw bytes.
    """

    rows: pa.RecordBatch

    def record(self, i: int) -> bytes:
        """Row ``i`` as JSON text (for dead letters; slow)."""
        return render_row(self.rows.slice(i, 1).to_pylist()[0])


def render_row(row: dict[str, Any]) -> bytes:
    """A typed row as JSON text; non-JSON values (timestamps, decimals, bytes) as strings."""
    return json.dumps(row, default=str, ensure_ascii=False, allow_nan=True).encode("utf-8")


class Decoder(ABC):
    """Turns raw records into validated events (SPEC §1, validation contract)."""

    def decode(self, raw: RawBatch) -> DecodeResult:
        """Decode one batch of any source: typed batches go through the columnar Parquet
        rules, byte batches through :meth:`decode_records`."""
        if isinstance(raw, TypedBatch):
            from gpu_pipeline.decode.parquet import decode_typed

            return decode_typed(raw)
        if len(raw) == 0:
            return DecodeResult.empty()
        return self.decode_records(raw)

    @abstractmethod
    def decode_records(self, raw: RawBatch) -> DecodeResult:
        """Decode a non-empty batch of raw NDJSON records."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads and devices."""


def assemble(
    raw: RawBatch,
    good_index: np.ndarray,
    good: pa.Table,
    dead_index: np.ndarray,
    dead_errors: list[str],
    dead_raw: list[bytes] | None = None,
) -> DecodeResult:
    """Attach source positions to decoded rows and put both outputs in arrival order.

    ``good`` holds the §1 columns (``schema.EVENT_FIELDS``) of the records at
    ``good_index``; ``dead_errors[k]`` is the error of record ``dead_index[k]``, whose raw
    bytes are read from ``raw`` unless ``dead_raw`` gives them.
    """
    order = np.argsort(good_index, kind="stable")
    index = good_index[order]
    events = good.take(pa.array(order)) if not _is_sorted(good_index) else good
    events = events.cast(pa.schema(schema.EVENT_FIELDS))
    columns = [*events.columns, *_positions(raw, index)]
    events_table = pa.Table.from_arrays(columns, schema=schema.DECODED_EVENTS)

    dead_order = np.argsort(dead_index, kind="stable")
    didx = dead_index[dead_order]
    raws = dead_raw if dead_raw is not None else [raw.record(int(i)) for i in dead_index]
    dead_table = pa.Table.from_arrays(
        [
            pa.array([raws[k] for k in dead_order], pa.binary()),
            pa.array([dead_errors[k] for k in dead_order], pa.string()),
            pa.array([raw.source] * len(didx), pa.string()),
            *_positions(raw, didx),
        ],
        schema=schema.DEAD_LETTERS,
    )
    return DecodeResult(events=events_table, dead=dead_table, record_index=index.astype(np.int64))


def _is_sorted(values: np.ndarray) -> bool:
    return bool(values.shape[0] < 2 or np.all(values[1:] >= values[:-1]))


def _positions(raw: RawBatch, index: np.ndarray) -> list[pa.Array]:
    """``partition``, ``offset`` and ``seq`` of the records at ``index``."""
    return [
        pa.array(np.full(index.shape[0], raw.partition, dtype=np.int32)),
        pa.array(np.asarray(raw.offsets, dtype=np.int64)[index]),
        pa.array(np.asarray(raw.seqs, dtype=np.int32)[index]),
    ]

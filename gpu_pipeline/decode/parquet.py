"""Decoding already-typed rows (Parquet files) with the same rules as NDJSON.

A Parquet column has one type for all rows, so the JSON-level checks become type checks
per column: a value of a type the contract does not allow for its field (a string
``user_id``, a float ``quantity``) makes its row a dead letter on that field, like a
JSON value of the wrong type.  Accepted types: strings (also large or dictionary-encoded)
for text fields; any integer type for ``user_id``, ``product_id`` and ``quantity``; any
number (integer, float, decimal) for ``price``; for ``ts`` a timestamp (without a zone it
is read as UTC; finer than milliseconds is rejected), an RFC 3339 string, or integer epoch
milliseconds.  Missing columns are absent fields.  The value rules are
:func:`gpu_pipeline.decode.json.check_columns`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema
from gpu_pipeline.decode.base import DecodeResult, TypedBatch, assemble, render_row
from gpu_pipeline.decode.json import check_columns, normalize
from gpu_pipeline.decode.validate import FIELD_ORDER, MAX_TS_MS

INT_FIELDS = frozenset({"user_id", "product_id", "quantity"})
TEXT_FIELDS = frozenset(FIELD_ORDER) - INT_FIELDS - {"ts", "price"}
RULES: dict[str, str] = {
    "event_id": f"required; a string of 1 to {schema.MAX_EVENT_ID_CHARS} characters",
    "user_id": "required; an integer in [0, 2**63)",
    "ts": "required; a UTC time from 1970-01-01 to 2299-12-31 with at most ms precision",
    "event_type": f"required; one of {', '.join(schema.EVENT_TYPES)}",
    "page": "at most 4096 characters",
    "product_id": "an integer in [0, 2**63), required for "
    + ", ".join(sorted(schema.NEEDS_PRODUCT_ID)),
    "category": "at most 4096 characters",
    "price": f"a finite number in [0, {schema.MAX_PRICE:g}], required for "
    + ", ".join(sorted(schema.NEEDS_PRICE)),
    "quantity": f"an integer in [1, {schema.MAX_QUANTITY}] with price * quantity <= "
    f"{schema.MAX_LINE_REVENUE:g}",
    "country": "2 uppercase ASCII letters",
    "device": f"one of {', '.join(schema.DEVICES)}",
    "referrer": "at most 4096 characters",
}
"""What each field must be: the detail of a Parquet dead letter that breaks a value rule."""


def decode_typed(batch: TypedBatch) -> DecodeResult:
    """Validate and normalise the rows of a typed batch (SPEC §1 columns, any Arrow types)."""
    rows = batch.rows
    n = rows.num_rows
    if n == 0:
        return DecodeResult.empty()
    columns: dict[str, pa.Array] = {}
    type_errors: dict[str, tuple[np.ndarray, str]] = {}
    int_ts = True
    for name in FIELD_ORDER:
        raw = rows.column(name) if name in rows.schema.names else pa.nulls(n)
        column, wrong, detail = _coerce(name, raw)
        columns[name] = column
        if wrong.any():
            type_errors[name] = (wrong, detail)
        if name == "ts":
            int_ts = not pa.types.is_string(column.type)
    errors, ts_ms = check_columns(columns, int_ts=int_ts, type_errors=type_errors)
    good = errors < 0
    dead = np.flatnonzero(~good)
    messages = []
    for row in dead:
        name = FIELD_ORDER[errors[row]]
        wrong_type = name in type_errors and type_errors[name][0][row]
        detail = type_errors[name][1] if wrong_type else RULES[name]
        messages.append(f"{name}: {detail}")
    dead_raw = [render_row(r) for r in rows.take(pa.array(dead)).to_pylist()] if dead.size else []
    events = normalize(columns, ts_ms, good)
    return assemble(batch, np.flatnonzero(good), events, dead, messages, dead_raw)


def _coerce(name: str, column: pa.Array) -> tuple[pa.Array, np.ndarray, str]:
    """A column in the parse types of the JSON path, the rows whose value has a type the
    field does not accept (they become null here), and the detail for those rows."""
    n = len(column)
    dtype = column.type
    if pa.types.is_dictionary(dtype):
        column = column.dictionary_decode()
        dtype = column.type
    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    none = np.zeros(n, dtype=bool)
    if pa.types.is_null(dtype):
        target = pa.string() if name in TEXT_FIELDS or name == "ts" else pa.int64()
        return pa.nulls(n, pa.float64() if name == "price" else target), none, ""
    if name in TEXT_FIELDS:
        if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
            return column.cast(pa.string()), none, ""
        return pa.nulls(n, pa.string()), present, f"expected a string, got {dtype}"
    if name in INT_FIELDS:
        return _integers(column, present, f"expected an integer, got {dtype}")
    if name == "price":
        if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
            return column.cast(pa.float64()), none, ""
        return pa.nulls(n, pa.float64()), present, f"expected a number, got {dtype}"
    return _timestamps(column, present)


def _integers(
    column: pa.Array, present: np.ndarray, detail: str
) -> tuple[pa.Array, np.ndarray, str]:
    """Any integer type as int64; unsigned values >= 2**63 become -1 (out of range)."""
    dtype = column.type
    if not pa.types.is_integer(dtype):
        return pa.nulls(len(column), pa.int64()), present, detail
    if dtype == pa.uint64():
        huge = pc.fill_null(pc.greater_equal(column, pa.scalar(2**63, pa.uint64())), False)
        column = pc.if_else(huge, pa.scalar(0, pa.uint64()), column).cast(pa.int64())
        column = pc.if_else(huge, pa.scalar(-1, pa.int64()), column)
    return column.cast(pa.int64()), np.zeros(len(column), dtype=bool), ""


def _timestamps(column: pa.Array, present: np.ndarray) -> tuple[pa.Array, np.ndarray, str]:
    """``ts`` as a string column (checked like JSON) or int64 epoch ms; timestamps with
    sub-millisecond parts are type errors."""
    dtype = column.type
    n = len(column)
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return column.cast(pa.string()), np.zeros(n, dtype=bool), ""
    if pa.types.is_integer(dtype):
        return _integers(column, present, "")
    if not pa.types.is_timestamp(dtype):
        detail = f"expected a timestamp, RFC 3339 string or integer epoch ms, got {dtype}"
        return pa.nulls(n, pa.int64()), present, detail
    per_ms = {"s": 0, "ms": 1, "us": 1_000, "ns": 1_000_000}[dtype.unit]
    values = np.asarray(pc.fill_null(column.view(pa.int64()), 0).to_numpy(), dtype=np.int64)
    if per_ms == 0:
        in_range = (values >= 0) & (values <= MAX_TS_MS // 1000)
        ms = np.where(in_range, values * 1000, -1)
        return pa.array(ms, pa.int64(), mask=~present), np.zeros(n, dtype=bool), ""
    fine = present & (values % per_ms != 0)
    ms = np.floor_divide(values, per_ms)
    return (
        pa.array(ms, pa.int64(), mask=~present | fine),
        fine,
        "finer than millisecond precision",
    )

"""The validation contract (SPEC §1) as one readable, per-record Python function.

This is the single source of the rules in Python: the slow path of every decoder runs it,
tests compare the columnar fast paths against it, and its docstrings state the choices
the contract leaves open:

* Whitespace means JSON whitespace (space, tab, LF, CR).
* JSON is parsed by the standard library with three tightenings that RFC 8259 allows:
  NaN/Infinity literals are invalid; a string escape that yields a lone surrogate
  (``"\\ud800"``) is invalid, since the text would not be Unicode; nesting deeper than
  :data:`MAX_NESTING` is invalid (every real parser has such a limit; this one is
  explicit so that the result never depends on the interpreter's recursion limit).
* Duplicate keys are checked on the top-level object only (nested objects belong to
  ignored extra fields).
* Integers with more than 100 digits are out of range for every integer field, and too
  large for ``price``, so they are kept as a sign-preserving sentinel instead of being
  converted (CPython refuses to convert more than 4300 digits).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema

FIELD_ORDER: tuple[str, ...] = (
    "event_id",
    "user_id",
    "ts",
    "event_type",
    "page",
    "product_id",
    "category",
    "price",
    "quantity",
    "country",
    "device",
    "referrer",
)
"""The §1 fields in the order their rules are checked; the first failure names the error."""

MAX_TEXT_CHARS = 4096
"""Longest accepted ``page``, ``category`` and ``referrer`` (code points)."""
MAX_TS_MS = schema.MAX_TS_MS
"""2299-12-31T23:59:59.999Z, the latest accepted event time (ClickHouse DateTime64's range)."""
MAX_NESTING = 512
"""Deepest accepted nesting of arrays and objects in a record."""
INT_LIMIT = 2**63
JSON_WHITESPACE = b" \t\n\r"
TS_PATTERN = r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,3})?Z$"
"""The accepted ``ts`` string form; the same pattern serves Python ``re`` and Arrow's RE2."""
COUNTRY_PATTERN = r"^[A-Z]{2}$"

_TS_RE = re.compile(TS_PATTERN)
_COUNTRY_RE = re.compile(COUNTRY_PATTERN)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_HUGE_DIGITS = 100
_EPOCH = datetime(1970, 1, 1)

Row = dict[str, Any]
"""A valid event: the §1 fields (``ts`` as int epoch ms, ``quantity`` defaulted to 1)."""


@dataclass(frozen=True)
class Rejected:
    """Why a record is a dead letter: the first failing field and a helpful detail."""

    field: str
    detail: str

    @property
    def error(self) -> str:
        """The dead-letter ``error`` text, ``"<field>: <detail>"``."""
        return f"{self.field}: {self.detail}"


class _JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers its first repeated key."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _parse_int(text: str) -> int:
    if len(text) > _HUGE_DIGITS:
        return -(10**_HUGE_DIGITS) if text.startswith("-") else 10**_HUGE_DIGITS
    return int(text)


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_constant=_reject_constant, parse_int=_parse_int
)


def json_type(value: Any) -> str:
    """The JSON type name of a parsed value, for error details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def nesting_depth(raw: bytes) -> int:
    """Deepest array/object nesting of a JSON text, ignoring brackets inside strings."""
    stripped = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw)
    steps = np.frombuffer(stripped, dtype=np.uint8)
    delta = np.isin(steps, (ord("["), ord("{"))).astype(np.int64) - np.isin(
        steps, (ord("]"), ord("}"))
    ).astype(np.int64)
    return int(np.cumsum(delta).max(initial=0))


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def parse_record(raw: bytes) -> dict[str, Any] | Rejected:
    """Apply the ``record`` checks (validation.md §1): the parsed top-level object, or why not."""
    if not raw.strip(JSON_WHITESPACE):
        return Rejected("record", "empty record")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("record", f"invalid UTF-8 at byte {exc.start}")
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and nesting_depth(raw) > MAX_NESTING:
        return Rejected("record", f"invalid JSON: nested deeper than {MAX_NESTING} levels")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        return Rejected("record", "invalid JSON: nested too deeply")
    except ValueError as exc:
        return Rejected("record", f"invalid JSON: {exc}")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        return Rejected("record", "invalid JSON: a string escape yields a lone surrogate")
    if not isinstance(value, dict):
        return Rejected("record", f"not a JSON object (got {json_type(value)})")
    if isinstance(value, _JsonObject) and value.duplicate is not None:
        return Rejected("record", f"duplicate field {value.duplicate}")
    return value


def validate_record(raw: bytes) -> Row | Rejected:
    """Validate one raw record: a normalized :data:`Row`, or the reason it is a dead letter."""
    parsed = parse_record(raw)
    if isinstance(parsed, Rejected):
        return parsed
    return validate_object(parsed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_error(expected: str, value: Any) -> str:
    return f"expected {expected}, got {json_type(value)}"


def _check_text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return _type_error("a string", value)
    if len(value) > limit:
        return f"longer than {limit} characters ({len(value)})"
    return None


def _check_event_id(value: Any) -> str | None:
    if value is None:
        return "required field missing"
    if not isinstance(value, str):
        return _type_error("a string", value)
    if not 1 <= len(value) <= schema.MAX_EVENT_ID_CHARS:
        return f"must be 1 to {schema.MAX_EVENT_ID_CHARS} characters, got {len(value)}"
    return None


def _check_id(value: Any, required: str | None) -> str | None:
    """user_id and product_id: a JSON integer in [0, 2**63)."""
    if value is None:
        return required
    if not _is_int(value):
        return _type_error("an integer", value)
    if not 0 <= value < INT_LIMIT:
        return "out of range [0, 2**63)"
    return None


def ts_string_ms(text: str) -> int | None:
    """Epoch ms of an accepted ``ts`` string, or None when it is not one."""
    match = _TS_RE.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7)
    try:
        moment = datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None
    millis = int(fraction[1:].ljust(3, "0")) if fraction else 0
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + millis


def _check_ts(value: Any) -> tuple[str | None, int]:
    if value is None:
        return "required field missing", 0
    if isinstance(value, str):
        ms = ts_string_ms(value)
        if ms is None:
            return "not an RFC 3339 UTC time like 2026-11-25T12:00:00.123Z", 0
    elif _is_int(value):
        ms = value
    else:
        return _type_error("an RFC 3339 string or integer epoch milliseconds", value), 0
    if not 0 <= ms <= MAX_TS_MS:
        return "out of range [1970-01-01, 2299-12-31]", 0
    return None, ms


def _check_event_type(value: Any) -> str | None:
    if value is None:
        return "required field missing"
    if not isinstance(value, str):
        return _type_error("a string", value)
    if value not in schema.EVENT_TYPE_CODE:
        return f"unknown event type {value[:40]!r}"
    return None


def _check_price(value: Any, event_type: str) -> str | None:
    if value is None:
        return f"required for {event_type} events" if event_type in schema.NEEDS_PRICE else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _type_error("a number", value)
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    if not 0 <= value <= schema.MAX_PRICE:
        return f"out of range [0, {schema.MAX_PRICE:g}]"
    return None


def _check_quantity(value: Any, price: float | None) -> str | None:
    if value is None:
        return None
    if not _is_int(value):
        return _type_error("an integer", value)
    if not 1 <= value <= schema.MAX_QUANTITY:
        return f"out of range [1, {schema.MAX_QUANTITY}]"
    if price is not None and price * value > schema.MAX_LINE_REVENUE:
        return f"price * quantity exceeds {schema.MAX_LINE_REVENUE:g}"
    return None


def _check_country(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return _type_error("a string", value)
    if _COUNTRY_RE.fullmatch(value) is None:
        return "expected 2 uppercase ASCII letters"
    return None


def _check_device(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return _type_error("a string", value)
    if value not in schema.DEVICES:
        return f"expected one of {', '.join(schema.DEVICES)}"
    return None


def validate_object(obj: dict[str, Any]) -> Row | Rejected:
    """The field rules (validation.md §2) on a parsed top-level JSON object."""
    get = obj.get
    if (detail := _check_event_id(get("event_id"))) is not None:
        return Rejected("event_id", detail)
    if (detail := _check_id(get("user_id"), "required field missing")) is not None:
        return Rejected("user_id", detail)
    detail, ts_ms = _check_ts(get("ts"))
    if detail is not None:
        return Rejected("ts", detail)
    event_type = get("event_type")
    if (detail := _check_event_type(event_type)) is not None:
        return Rejected("event_type", detail)
    for name in ("page", "product_id", "category"):
        value = get(name)
        if name == "product_id":
            needed = event_type in schema.NEEDS_PRODUCT_ID
            detail = _check_id(value, f"required for {event_type} events" if needed else None)
        else:
            detail = None if value is None else _check_text(value, MAX_TEXT_CHARS)
        if detail is not None:
            return Rejected(name, detail)
    price = get("price")
    if (detail := _check_price(price, str(event_type))) is not None:
        return Rejected("price", detail)
    price = None if price is None else float(price)
    quantity = get("quantity")
    if (detail := _check_quantity(quantity, price)) is not None:
        return Rejected("quantity", detail)
    if (detail := _check_country(get("country"))) is not None:
        return Rejected("country", detail)
    if (detail := _check_device(get("device"))) is not None:
        return Rejected("device", detail)
    referrer = get("referrer")
    if referrer is not None and (detail := _check_text(referrer, MAX_TEXT_CHARS)) is not None:
        return Rejected("referrer", detail)
    return {
        "event_id": get("event_id"),
        "user_id": get("user_id"),
        "ts": ts_ms,
        "event_type": event_type,
        "page": get("page"),
        "product_id": get("product_id"),
        "category": get("category"),
        "price": price,
        "quantity": 1 if quantity is None else quantity,
        "country": get("country"),
        "device": get("device"),
        "referrer": referrer,
    }


def rows_to_table(rows: list[Row]) -> pa.Table:
    """Valid rows as a table of the §1 columns (``schema.EVENT_FIELDS``)."""
    columns = {name: [row[name] for row in rows] for name in FIELD_ORDER}
    arrays = [
        pa.array(columns[f.name], pa.int64()).cast(f.type)
        if f.name == "ts"
        else pa.array(columns[f.name], f.type)
        for f in schema.EVENT_FIELDS
    ]
    return pa.Table.from_arrays(arrays, schema=pa.schema(schema.EVENT_FIELDS))


def event_type_codes(events: pa.Table) -> np.ndarray:
    """``event_type`` as int8 codes (index in ``schema.EVENT_TYPES``; -1 if unknown)."""
    codes = pc.index_in(events.column("event_type"), value_set=pa.array(schema.EVENT_TYPES))
    return np.asarray(pc.fill_null(codes, -1).to_numpy(), dtype=np.int8)


def revenue_micros(events: pa.Table) -> np.ndarray:
    """Per-event revenue in int64 micro-units (validation.md §3); 0 unless a purchase.

    ``rint(price * 1e6) * quantity``: IEEE multiply, round half to even, exact int64
    multiply.  Validation bounds ``price * quantity`` by 1e12, so this cannot overflow.
    """
    is_purchase = event_type_codes(events) == schema.EVENT_TYPE_CODE["purchase"]
    price = pc.fill_null(events.column("price"), 0.0).to_numpy()
    quantity = pc.fill_null(events.column("quantity"), 1).to_numpy().astype(np.int64)
    micros = np.rint(np.where(is_purchase, price, 0.0) * 1e6).astype(np.int64)
    return micros * np.where(is_purchase, quantity, 0)

"""The slow, obviously-correct model of the streaming semantics (SPEC §1-§3).

This module is the oracle of the project: every engine, whatever its batch sizes, must
produce exactly the tables computed here.  It is written from the contract alone, one
record at a time, with dicts and lists, so that a reader can check each rule against the
text of ``docs/semantics.md`` line by line.  Speed is no goal.

Besides the final tables, the model keeps two emission logs that pin down *when* things
are written, so that operators can be tested for timeliness and not only for results:

* ``session_closes``: when the watermark closed each session (or that end of input did);
* ``window_writes``: every write of every window row, with its version.
"""

from __future__ import annotations

import calendar
import datetime as dt
import heapq
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.hashing import session_id as make_session_id
from gpu_pipeline.semantics import Semantics, WindowSpec

Record = tuple[int, int, bytes] | tuple[int, int, bytes, int]
"""One raw record of a partition: (offset, seq, raw bytes[, source timestamp in epoch ms]);
the timestamp (Kafka's message time) only feeds the ingest lag of ``quality_1m``."""

QUALITY_COUNTS = schema.QUALITY_SUMS
"""The columns of ``quality_1m`` that add up; ``lag_ms_max`` is a maximum."""
QUALITY_FIELDS = schema.QUALITY_FIELDS
"""Optional fields whose presence ``quality_1m`` counts (completeness)."""

MAX_TS_MS = 10_413_791_999_999
"""2299-12-31T23:59:59.999Z, the largest accepted event time (ClickHouse DateTime64 ends there)."""
MAX_TEXT_CHARS = 4096
"""Longest accepted ``page``, ``category`` and ``referrer``."""
MAX_JSON_DEPTH = 512
"""Deepest accepted nesting of arrays and objects in a record."""
HUGE_INT_CHARS = 400
"""Integer literals longer than this are out of range for every field; they are kept as a
sign-preserving stand-in, since CPython refuses to convert more than 4300 digits."""
JSON_WHITESPACE = b" \t\r\n"
INT63_LIMIT = 2**63

_SURROGATE = re.compile("[\ud800-\udfff]")
_TS_PATTERN = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,3}))?Z"
)

SORT_KEYS: dict[str, list[str]] = {
    "events": ["partition", "offset", "seq"],
    "late_events": ["partition", "offset", "seq"],
    "dead_letters": ["partition", "offset", "seq"],
    "sessions": ["partition", "user_id", "session_start", "session_id"],
    "traffic_1m": ["partition", "window_start", "event_type"],
    "product_5m": ["partition", "window_start", "product_id"],
    "quality_1m": ["partition", "minute"],
}
"""A total order of every output table's rows, for comparing tables from different engines."""

STAT_NAMES: tuple[str, ...] = (
    "records",
    "events",
    "dead_letters",
    "duplicates",
    "late",
    "on_time",
    "future_ts",
    "sessions",
    "sessions_closed_by_watermark",
    "window_rows",
    "window_writes",
)
"""The counters of ``ReferenceResult.stats``: records = events + dead_letters (events are the
valid records the event-time guard let through; ``future_ts`` counts the valid records it set
apart, which are dead letters too) and events = duplicates + late + on_time."""

WINDOW_ROW_KEYS: dict[str, list[str]] = {
    "traffic_1m": ["window_start", "event_type", "partition"],
    "product_5m": ["window_start", "product_id", "partition"],
}
"""The identity of a window row; versions of one identity replace each other."""


# --------------------------------------------------------------------------------------
# Decoding and validation (validation contract)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One valid, decoded event: the §1 fields with defaults applied and ``ts`` in ms."""

    event_id: str
    user_id: int
    ts_ms: int
    event_type: str
    page: str | None
    product_id: int | None
    category: str | None
    price: float | None
    quantity: int
    country: str | None
    device: str | None
    referrer: str | None

    @property
    def revenue_micros(self) -> int:
        """Revenue in integer micro-units: ``round(price * 1e6) * quantity`` for purchases."""
        if self.event_type != "purchase" or self.price is None:
            return 0
        return round(self.price * schema.REVENUE_SCALE) * self.quantity

    def fields(self) -> dict[str, Any]:
        """The columns of ``schema.EVENT_FIELDS`` (``ts`` as epoch milliseconds)."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "ts": self.ts_ms,
            "event_type": self.event_type,
            "page": self.page,
            "product_id": self.product_id,
            "category": self.category,
            "price": self.price,
            "quantity": self.quantity,
            "country": self.country,
            "device": self.device,
            "referrer": self.referrer,
        }


class _Invalid(Exception):
    """A failed check; its message is the dead letter's ``"<field>: <detail>"`` error."""


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in text order, so that repeated keys stay visible."""


def _json_type(value: Any) -> str:
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
    if isinstance(value, _Pairs):
        return "object"
    return "array"


def _reject_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not a JSON value")


def _parse_int(text: str) -> int:
    """A JSON integer, exact; a huge one becomes a stand-in beyond every field's range.

    (Numbers with a fraction or exponent are doubles: ``1e400`` reads as infinity, which
    only matters where a field checks that a number is finite.)
    """
    if len(text) > HUGE_INT_CHARS:
        return -(10**HUGE_INT_CHARS) if text.startswith("-") else 10**HUGE_INT_CHARS
    return int(text)


def _nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects, counted outside string literals."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


@contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    """Let the stdlib parser reach ``MAX_JSON_DEPTH`` levels (its default stops near 1000)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any key or string holds an unpaired UTF-16 surrogate (from a ``\\u`` escape)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, _Pairs):
            for key, inner in item:
                stack.extend((key, inner))
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse_object(raw: bytes) -> dict[str, Any]:
    """Decode a record into its top-level object, or raise ``_Invalid`` with a ``record`` error."""
    if not raw.strip(JSON_WHITESPACE):
        raise _Invalid("record: empty record")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"record: invalid UTF-8 at byte {exc.start}") from None
    openers = text.count("[") + text.count("{")
    if openers > MAX_JSON_DEPTH and _nesting_depth(text) > MAX_JSON_DEPTH:
        raise _Invalid(f"record: invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        with _recursion_limit(MAX_JSON_DEPTH * 4):
            value = json.loads(
                text,
                object_pairs_hook=_Pairs,
                parse_constant=_reject_constant,
                parse_int=_parse_int,
            )
    except (ValueError, RecursionError) as exc:
        raise _Invalid(f"record: invalid JSON ({exc})") from None
    if _has_lone_surrogate(value):
        raise _Invalid("record: invalid JSON (unpaired surrogate in a \\u escape)")
    if not isinstance(value, _Pairs):
        raise _Invalid(f"record: not a JSON object (got {_json_type(value)})")
    fields: dict[str, Any] = {}
    for key, inner in value:
        if key in fields:
            raise _Invalid(f"record: duplicate field {key}")
        fields[key] = inner
    return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required(fields: Mapping[str, Any], name: str) -> Any:
    value = fields.get(name)
    if value is None:
        raise _Invalid(f"{name}: required field missing")
    return value


def _int63(name: str, value: Any) -> int:
    """A JSON integer in ``[0, 2**63)`` (the non-negative int64 range)."""
    if not _is_int(value):
        raise _Invalid(f"{name}: expected an integer, got {_json_type(value)}")
    if not 0 <= value < INT63_LIMIT:
        raise _Invalid(f"{name}: {value} is outside [0, 2**63)")
    return int(value)


def _text(name: str, value: Any) -> str | None:
    """An optional JSON string of at most ``MAX_TEXT_CHARS`` characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{name}: expected a string, got {_json_type(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _Invalid(f"{name}: longer than {MAX_TEXT_CHARS} characters")
    return value


def _event_id(value: Any) -> str:
    if value is None:
        raise _Invalid("event_id: required field missing")
    if not isinstance(value, str):
        raise _Invalid(f"event_id: expected a string, got {_json_type(value)}")
    if not 1 <= len(value) <= schema.MAX_EVENT_ID_CHARS:
        raise _Invalid(
            f"event_id: must have 1 to {schema.MAX_EVENT_ID_CHARS} characters, has {len(value)}"
        )
    return value


def _ts_from_string(text: str) -> int:
    """Epoch milliseconds of ``YYYY-MM-DDTHH:MM:SS(.f{1,3})?Z``, a real UTC calendar instant."""
    match = _TS_PATTERN.fullmatch(text)
    if match is None:
        raise _Invalid(f"ts: {text[:40]!r} is not YYYY-MM-DDTHH:MM:SS[.fff]Z")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    try:
        dt.datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise _Invalid(f"ts: {text!r} is not a real date and time ({exc})") from None
    millis = int((match.group(7) or "0").ljust(3, "0"))
    return calendar.timegm((year, month, day, hour, minute, second)) * 1000 + millis


def _ts(value: Any) -> int:
    if value is None:
        raise _Invalid("ts: required field missing")
    if isinstance(value, str):
        ts_ms = _ts_from_string(value)
    elif _is_int(value):
        ts_ms = int(value)
    else:
        raise _Invalid(
            f"ts: expected an RFC 3339 UTC string or integer epoch ms, got {_json_type(value)}"
        )
    if not 0 <= ts_ms <= MAX_TS_MS:
        raise _Invalid(f"ts: {ts_ms} ms is outside 1970-01-01 .. 2299-12-31")
    return ts_ms


def _event_type(value: Any) -> str:
    if value is None:
        raise _Invalid("event_type: required field missing")
    if not isinstance(value, str):
        raise _Invalid(f"event_type: expected a string, got {_json_type(value)}")
    if value not in schema.EVENT_TYPES:
        raise _Invalid(f"event_type: {value[:40]!r} is not one of {', '.join(schema.EVENT_TYPES)}")
    return value


def _product_id(value: Any, event_type: str) -> int | None:
    if value is None:
        if event_type in schema.NEEDS_PRODUCT_ID:
            raise _Invalid(f"product_id: required field missing for {event_type}")
        return None
    return _int63("product_id", value)


def _price(value: Any, event_type: str) -> float | None:
    if value is None:
        if event_type in schema.NEEDS_PRICE:
            raise _Invalid(f"price: required field missing for {event_type}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"price: expected a number, got {_json_type(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid("price: must be finite")
    if not 0 <= value <= schema.MAX_PRICE:
        raise _Invalid(f"price: {value} is outside [0, {schema.MAX_PRICE:g}]")
    return float(value)


def _quantity(value: Any, price: float | None) -> int:
    if value is None:
        return 1
    if not _is_int(value):
        raise _Invalid(f"quantity: expected an integer, got {_json_type(value)}")
    if not 1 <= value <= schema.MAX_QUANTITY:
        raise _Invalid(f"quantity: {value} is outside [1, {schema.MAX_QUANTITY}]")
    if price is not None and price * value > schema.MAX_LINE_REVENUE:
        raise _Invalid(f"quantity: price * quantity exceeds {schema.MAX_LINE_REVENUE:g}")
    return int(value)


def _country(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"country: expected a string, got {_json_type(value)}")
    if len(value) != 2 or not all("A" <= char <= "Z" for char in value):
        raise _Invalid(f"country: {value[:10]!r} is not two uppercase ASCII letters")
    return value


def _device(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in schema.DEVICES:
        raise _Invalid(f"device: expected one of {', '.join(schema.DEVICES)}")
    return value


def _event(fields: Mapping[str, Any]) -> Event:
    """Check the fields in contract order; the first failure names the dead letter's field."""
    event_id = _event_id(fields.get("event_id"))
    user_id = _int63("user_id", _required(fields, "user_id"))
    ts_ms = _ts(fields.get("ts"))
    event_type = _event_type(fields.get("event_type"))
    page = _text("page", fields.get("page"))
    product_id = _product_id(fields.get("product_id"), event_type)
    category = _text("category", fields.get("category"))
    price = _price(fields.get("price"), event_type)
    quantity = _quantity(fields.get("quantity"), price)
    country = _country(fields.get("country"))
    device = _device(fields.get("device"))
    referrer = _text("referrer", fields.get("referrer"))
    return Event(
        event_id=event_id,
        user_id=user_id,
        ts_ms=ts_ms,
        event_type=event_type,
        page=page,
        product_id=product_id,
        category=category,
        price=price,
        quantity=quantity,
        country=country,
        device=device,
        referrer=referrer,
    )


def validate_record(raw: bytes) -> Event | str:
    """Decode and validate one raw record.

    Returns
    -------
    Event | str
        The decoded event, or the dead-letter error ``"<field>: <detail>"`` naming the first
        failing check in contract order.
    """
    try:
        return _event(_parse_object(raw))
    except _Invalid as exc:
        return str(exc)


# --------------------------------------------------------------------------------------
# The streaming model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionClose:
    """When a session closed: after the valid event at (offset, seq), or at end of input (None)."""

    partition: int
    user_id: int
    session_id: int
    session_end_ms: int
    closed_after: tuple[int, int] | None
    watermark_ms: int | None


@dataclass(frozen=True)
class WindowWrite:
    """One write of a window row: the row as written, and the record after which it happened."""

    table: str
    partition: int
    window_start_ms: int
    key: Any
    version: int
    written_after: tuple[int, int] | None
    row: dict[str, Any]


@dataclass
class ReferenceResult:
    """The tables one uninterrupted run writes, plus counters and emission logs.

    Attributes
    ----------
    tables
        Every table of ``schema.OUTPUT_TABLES`` with exactly its schema; window tables hold
        only the final (highest-version) row of each (window_start, key, partition).
    stats
        The counters named in ``STAT_NAMES``.
    session_closes
        Every session once, in the order the watermark (or end of input) closed them.
    window_writes
        Every write of every window row, in order, with the row as written then.
    """

    tables: dict[str, pa.Table]
    stats: dict[str, int]
    session_closes: list[SessionClose] = field(default_factory=list)
    window_writes: list[WindowWrite] = field(default_factory=list)
    quality_before_end: pa.Table = field(default_factory=schema.QUALITY_1M.empty_table)
    """``quality_1m`` without the end-of-input flush (what a stopped run has written)."""


@dataclass
class _Session:
    """An open or closed session; ``members`` are (arrival index, event) in arrival order."""

    user_id: int
    session_id: int
    members: list[tuple[int, Event]]
    max_ts_ms: int
    closed: bool = False

    def row(self, partition: int) -> dict[str, Any]:
        events = [event for _, event in self.members]
        landing = min(self.members, key=lambda m: (m[1].ts_ms, m[0]))[1]
        exit_ = max(self.members, key=lambda m: (m[1].ts_ms, m[0]))[1]
        return {
            "user_id": self.user_id,
            "session_id": self.session_id,
            "session_start": min(event.ts_ms for event in events),
            "session_end": max(event.ts_ms for event in events),
            "events": len(events),
            "page_views": sum(event.event_type == "page_view" for event in events),
            "product_views": sum(event.event_type == "product_view" for event in events),
            "add_to_carts": sum(event.event_type == "add_to_cart" for event in events),
            "purchases": sum(event.event_type == "purchase" for event in events),
            "revenue": _units(sum(event.revenue_micros for event in events)),
            "landing_page": landing.page,
            "exit_page": exit_.page,
            "partition": partition,
        }


def _units(micros: int) -> float:
    """Reported revenue: exact integer micro-units converted once to float64 units."""
    return float(micros) / schema.REVENUE_SCALE


@dataclass
class _Window:
    """One (table, window, key) of one partition: its events and how they arrived."""

    spec: WindowSpec
    start_ms: int
    key: Any
    events: list[Event] = field(default_factory=list)
    before_end: bool = False
    after_end: int = 0
    writes: int = 0

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.spec.size_ms

    @property
    def version(self) -> int:
        """1 for the write when the watermark reaches the end, +1 per later arrival."""
        return int(self.before_end) + self.after_end

    def row(self, partition: int, version: int) -> dict[str, Any]:
        events = self.events
        measures: dict[str, Any] = {
            "events": len(events),
            "views": sum(event.event_type == "product_view" for event in events),
            "add_to_carts": sum(event.event_type == "add_to_cart" for event in events),
            "purchases": sum(event.event_type == "purchase" for event in events),
            "revenue": _units(sum(event.revenue_micros for event in events)),
            "users": len({event.user_id for event in events}),
        }
        row = {
            "window_start": self.start_ms,
            "window_end": self.end_ms,
            self.spec.key: self.key,
            "partition": partition,
            "version": version,
        }
        columns = schema.OUTPUT_TABLES[self.spec.table].names
        row.update({name: value for name, value in measures.items() if name in columns})
        return row


def window_starts(ts_ms: int, spec: WindowSpec) -> list[int]:
    """Every epoch-aligned start ``s`` (a multiple of the slide) with ``s <= ts < s + size``."""
    last = (ts_ms // spec.slide_ms) * spec.slide_ms
    return [s for s in range(last, ts_ms - spec.size_ms, -spec.slide_ms)]


class _PartitionModel:
    """The semantics of one partition, applied record by record in arrival order.

    The event-time guard (SPEC §2.9) is the only rule that looks ahead: a valid event whose
    ts is more than B = ``max_future_skew_ms`` past the largest ts let through so far (every
    first event of a partition) is held until the next valid event arrives.  If that one is
    more than B earlier, the held event is a dead letter; otherwise (or at end of input) it
    is processed, before its successor, exactly as if it had not waited.
    """

    def __init__(self, partition: int, semantics: Semantics, source: str) -> None:
        self.partition = partition
        self.sem = semantics
        self.source = source
        self.max_ts_ms: int | None = None
        self.accepted: dict[str, list[int]] = {}
        self.last_session: dict[int, _Session] = {}
        self.sessions: list[_Session] = []
        self.open_sessions: list[_Session] = []
        self.windows: dict[tuple[str, int, Any], _Window] = {}
        self.pending: list[tuple[int, int, tuple[str, int, Any]]] = []
        self.arrivals = 0
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in schema.OUTPUT_TABLES}
        self.stats = dict.fromkeys(STAT_NAMES[:7], 0)
        self.held: tuple[Event, dict[str, int], bytes] | None = None
        self.session_closes: list[SessionClose] = []
        self.window_writes: list[WindowWrite] = []
        self.quality_clock: int | None = None
        self.quality: dict[int, dict[str, int]] = {}
        self.quality_at_end: dict[int, dict[str, int]] = {}
        self.finishing = False

    def watermark(self) -> int | None:
        """W for the next event: max ts of the valid events so far minus D; None is -infinity."""
        if self.max_ts_ms is None:
            return None
        return self.max_ts_ms - self.sem.max_out_of_orderness_ms

    def feed(self, offset: int, seq: int, raw: bytes, source_ts: int = 0) -> None:
        self.stats["records"] += 1
        position = {"partition": self.partition, "offset": offset, "seq": seq}
        decoded = validate_record(raw)
        if isinstance(decoded, str):
            self._dead_letter(raw, decoded, position)
            return
        bound = self.sem.max_future_skew_ms
        if self.held is not None:
            # The event-time guard: the next valid event decides a suspect.
            held, held_position, held_raw, held_source_ts = self.held
            self.held = None
            if decoded.ts_ms < held.ts_ms - bound:
                self.stats["future_ts"] += 1
                error = f"ts: more than {bound} ms ahead, and the next event contradicts it"
                self._dead_letter(held_raw, error, held_position)
            else:
                self._take(held, held_position, held_source_ts)
        if bound and (self.max_ts_ms is None or decoded.ts_ms > self.max_ts_ms + bound):
            # suspect: wait for the next valid event
            self.held = (decoded, position, raw, source_ts)
            return
        self._take(decoded, position, source_ts)

    def _dead_letter(self, raw: bytes, error: str, position: dict[str, int]) -> None:
        self.stats["dead_letters"] += 1
        row = {"raw": raw, "error": error, "source": self.source, **position}
        self.rows["dead_letters"].append(row)
        clock = self.quality_clock
        minute = 0 if clock is None else clock // 60_000 * 60_000
        self._quality(minute, records=1, dead_letters=1)

    def _quality(self, minute: int, **counts: int) -> None:
        """Count a record in ``quality_1m`` (those of the end-of-input flush apart)."""
        book = self.quality_at_end if self.finishing else self.quality
        row = book.setdefault(minute, dict.fromkeys(QUALITY_COUNTS, 0) | {"lag_ms_max": None})
        for name, value in counts.items():
            if name == "lag_ms_max":
                row[name] = value if row[name] is None else max(row[name], value)
            else:
                row[name] += value

    def _take(self, event: Event, position: dict[str, int], source_ts: int = 0) -> None:
        """A valid event the guard let through: SPEC §2.2-2.6 in arrival order."""
        self.stats["events"] += 1
        bound = self.sem.max_future_skew_ms
        suspect = bool(bound) and (self.max_ts_ms is None or event.ts_ms > self.max_ts_ms + bound)
        outcome = self._accept(event, position)
        minute = event.ts_ms // 60_000 * 60_000
        counts = {"records": 1, "events": 1, outcome: 1}
        if outcome == "on_time":
            for name in QUALITY_FIELDS:
                counts[f"with_{name}"] = int(getattr(event, name) is not None)
            if source_ts > 0:
                lag = source_ts - event.ts_ms
                counts.update(lag_events=1, lag_ms_sum=lag, lag_ms_max=lag)
        self._quality(minute, **counts)
        if not suspect and (self.quality_clock is None or event.ts_ms > self.quality_clock):
            self.quality_clock = event.ts_ms
        if self.max_ts_ms is None or event.ts_ms > self.max_ts_ms:
            self.max_ts_ms = event.ts_ms
        self._advance((position["offset"], position["seq"]))

    def _accept(self, event: Event, position: dict[str, int]) -> str:
        """SPEC §2.3-2.6 for one event: ``duplicates``, ``late`` or ``on_time``."""
        watermark = self.watermark()
        if self._is_duplicate(event, watermark):
            self.stats["duplicates"] += 1
            return "duplicates"
        self.accepted.setdefault(event.event_id, []).append(event.ts_ms)
        lateness = self.sem.allowed_lateness_ms
        if watermark is not None and event.ts_ms < watermark - lateness:
            self.stats["late"] += 1
            reason = (
                f"ts is {watermark - event.ts_ms} ms behind the watermark; "
                f"allowed lateness is {lateness} ms"
            )
            row = {**event.fields(), "watermark": watermark, "reason": reason, **position}
            self.rows["late_events"].append(row)
            return "late"
        self.stats["on_time"] += 1
        arrival = self.arrivals
        self.arrivals += 1
        session = self._sessionize(arrival, event)
        self.rows["events"].append({**event.fields(), "session_id": session.session_id, **position})
        for spec in self.sem.windows:
            self._add_to_windows(spec, event, watermark, (position["offset"], position["seq"]))
        return "on_time"

    def _is_duplicate(self, event: Event, watermark: int | None) -> bool:
        """An earlier accepted event has this id and the watermark is below its ts + TTL."""
        earlier = self.accepted.get(event.event_id, [])
        if watermark is None:
            return bool(earlier)
        return any(watermark < ts_ms + self.sem.dedup_ttl_ms for ts_ms in earlier)

    def _sessionize(self, arrival: int, event: Event) -> _Session:
        """Join the user's latest session unless ts is more than G after its max ts."""
        last = self.last_session.get(event.user_id)
        if last is not None and event.ts_ms <= last.max_ts_ms + self.sem.session_gap_ms:
            if last.closed:
                raise AssertionError("an on-time event joined a session the watermark closed")
            last.members.append((arrival, event))
            last.max_ts_ms = max(last.max_ts_ms, event.ts_ms)
            return last
        sid = make_session_id(event.user_id, event.ts_ms, event.event_id)
        session = _Session(event.user_id, sid, [(arrival, event)], event.ts_ms)
        self.last_session[event.user_id] = session
        self.sessions.append(session)
        self.open_sessions.append(session)
        return session

    def _add_to_windows(
        self, spec: WindowSpec, event: Event, watermark: int | None, after: tuple[int, int]
    ) -> None:
        key_value = getattr(event, spec.key)
        if key_value is None:
            return
        for start in window_starts(event.ts_ms, spec):
            ident = (spec.table, start, key_value)
            window = self.windows.get(ident)
            if window is None:
                window = self.windows[ident] = _Window(spec, start, key_value)
                heapq.heappush(self.pending, (window.end_ms, len(self.windows), ident))
            if watermark is not None and watermark > window.end_ms + self.sem.allowed_lateness_ms:
                raise AssertionError("an on-time event reached a window whose state was dropped")
            window.events.append(event)
            if watermark is None or watermark < window.end_ms:
                window.before_end = True
            else:
                window.after_end += 1
                self._write(window, after)

    def _write(self, window: _Window, after: tuple[int, int] | None) -> None:
        window.writes += 1
        write = WindowWrite(
            window.spec.table,
            self.partition,
            window.start_ms,
            window.key,
            window.writes,
            after,
            window.row(self.partition, window.writes),
        )
        self.window_writes.append(write)

    def _advance(self, after: tuple[int, int]) -> None:
        """The watermark moved: close sessions and write windows it has passed."""
        watermark = self.watermark()
        assert watermark is not None
        horizon = self.sem.session_gap_ms + self.sem.allowed_lateness_ms
        still_open = []
        for session in self.open_sessions:
            if watermark > session.max_ts_ms + horizon:
                self._close(session, after, watermark)
            else:
                still_open.append(session)
        self.open_sessions = still_open
        while self.pending and self.pending[0][0] <= watermark:
            _, _, ident = heapq.heappop(self.pending)
            window = self.windows[ident]
            if window.writes == 0:
                self._write(window, after)

    def _close(
        self, session: _Session, after: tuple[int, int] | None, watermark: int | None
    ) -> None:
        session.closed = True
        close = SessionClose(
            self.partition, session.user_id, session.session_id, session.max_ts_ms, after, watermark
        )
        self.session_closes.append(close)

    def finish(self) -> None:
        """End of input: a held suspect passes (nothing contradicts it); then the watermark
        goes to +infinity and everything still open is written."""
        self.finishing = True
        if self.held is not None:
            held, held_position, _, held_source_ts = self.held
            self.held = None
            self._take(held, held_position, held_source_ts)
        for session in self.open_sessions:
            self._close(session, None, None)
        self.open_sessions = []
        while self.pending:
            _, _, ident = heapq.heappop(self.pending)
            window = self.windows[ident]
            if window.writes == 0:
                self._write(window, None)
        self.rows["sessions"] = [session.row(self.partition) for session in self.sessions]
        for window in self.windows.values():
            self.rows[window.spec.table].append(window.row(self.partition, window.version))
        self.rows["quality_1m"] = [
            *quality_rows(self.partition, self.quality),
            *quality_rows(self.partition, self.quality_at_end),
        ]

    def quality_before_end(self) -> list[dict[str, Any]]:
        """The quality rows of everything before the end-of-input flush."""
        return quality_rows(self.partition, self.quality)


def quality_rows(
    partition: int, book: Mapping[int, Mapping[str, int | None]]
) -> list[dict[str, Any]]:
    """``quality_1m`` rows from per-minute counts."""
    return [
        {
            "minute": minute,
            **{name: counts[name] for name in QUALITY_COUNTS},
            "lag_ms_max": counts["lag_ms_max"] or 0,
            "partition": partition,
        }
        for minute, counts in sorted(book.items())
    ]


def reference_run(
    partitions: Mapping[int, Sequence[Record]],
    semantics: Semantics | None = None,
    source: str = "test",
) -> ReferenceResult:
    """Run the semantics over whole partitions and flush at the end (SPEC §2.8).

    Parameters
    ----------
    partitions
        Partition number -> its records ``(offset, seq, raw bytes)`` in arrival order.
    semantics
        The parameters; the defaults of SPEC §2 when omitted.
    source
        The ``source`` column of dead letters.

    Returns
    -------
    ReferenceResult
        Every table of ``schema.OUTPUT_TABLES`` with exactly its schema, counters, and the
        session-close and window-write logs.
    """
    semantics = semantics or Semantics()
    _check_window_tables(semantics)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in schema.OUTPUT_TABLES}
    stats = dict.fromkeys(STAT_NAMES, 0)
    closes: list[SessionClose] = []
    writes: list[WindowWrite] = []
    quality_before_end: list[dict[str, Any]] = []
    for partition in sorted(partitions):
        model = _PartitionModel(partition, semantics, source)
        for record in partitions[partition]:
            model.feed(*record)
        model.finish()
        quality_before_end.extend(model.quality_before_end())
        for name, table_rows in model.rows.items():
            rows[name].extend(table_rows)
        for name, count in model.stats.items():
            stats[name] += count
        closes.extend(model.session_closes)
        writes.extend(model.window_writes)
    stats["sessions"] = len(rows["sessions"])
    stats["sessions_closed_by_watermark"] = sum(c.closed_after is not None for c in closes)
    stats["window_rows"] = sum(len(rows[name]) for name in schema.VERSIONED_TABLES)
    stats["window_writes"] = len(writes)
    tables = {
        name: pa.Table.from_pylist(rows[name], schema=table_schema)
        for name, table_schema in schema.OUTPUT_TABLES.items()
    }
    before_end = pa.Table.from_pylist(quality_before_end, schema=schema.QUALITY_1M)
    return ReferenceResult(tables, stats, closes, writes, before_end)


def _check_window_tables(semantics: Semantics) -> None:
    """Each window spec must name its own window output table, whose schema holds its key."""
    tables = [spec.table for spec in semantics.windows]
    if len(set(tables)) != len(tables):
        raise ValueError(f"window tables are named more than once: {tables}")
    for spec in semantics.windows:
        table = schema.OUTPUT_TABLES.get(spec.table)
        if table is None or spec.table not in schema.VERSIONED_TABLES:
            raise ValueError(f"window table {spec.table!r} is not a window output table")
        if spec.key not in table.names:
            raise ValueError(f"window table {spec.table!r} has no key column {spec.key!r}")


def closed_sessions_before_end(result: ReferenceResult) -> list[SessionClose]:
    """The sessions the watermark closed before end of input, in the order they closed."""
    return [close for close in result.session_closes if close.closed_after is not None]


def reference_window_versions_trace(
    partitions: Mapping[int, Sequence[Record]], semantics: Semantics | None = None
) -> list[WindowWrite]:
    """Every window-row write of one uninterrupted run, in order, with its version."""
    return reference_run(partitions, semantics).window_writes


# --------------------------------------------------------------------------------------
# Comparing tables
# --------------------------------------------------------------------------------------


def canonical(name: str, table: pa.Table) -> pa.Table:
    """The table with the contract's columns in schema order and rows in ``SORT_KEYS`` order;
    partial sums (``quality_1m``) added up per key first, as its ``_total`` view does."""
    table_schema = schema.OUTPUT_TABLES[name]
    table = table.select(table_schema.names).cast(table_schema)
    if name in schema.ADDITIVE_TABLES:
        table = sum_partials(table)
    return table.sort_by([(key, "ascending") for key in SORT_KEYS[name]])


def sum_partials(table: pa.Table) -> pa.Table:
    """``quality_1m`` rows of one (partition, minute) added up (a maximum for lag_ms_max,
    over the rows that have lag at all)."""
    totals: dict[tuple[int, Any], dict[str, Any]] = {}
    for row in table.to_pylist():
        key = (row["partition"], row["minute"])
        total = totals.get(key)
        if total is None:
            totals[key] = dict(row)
            continue
        if row["lag_events"]:
            best = total["lag_ms_max"] if total["lag_events"] else row["lag_ms_max"]
            total["lag_ms_max"] = max(best, row["lag_ms_max"])
        for column in QUALITY_COUNTS:
            total[column] += row[column]
    return pa.Table.from_pylist(list(totals.values()), schema=table.schema)


def keep_final_versions(name: str, table: pa.Table) -> pa.Table:
    """Only the highest version of each window row, as ``SELECT ... FINAL`` would show."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in table.to_pylist():
        ident = tuple(row[key] for key in WINDOW_ROW_KEYS[name])
        if ident not in best or row["version"] > best[ident]["version"]:
            best[ident] = row
    return pa.Table.from_pylist(list(best.values()), schema=table.schema)

"""Adversarial clickstreams for property tests: Hypothesis strategies and seeded streams.

Uniformly random timestamps almost never hit the places where streaming engines go
wrong.  These generators build each next record *relative to the state so far* of its
partition (running max ``ts``, the watermark, each user's last event, the ids already
seen) so that ties and off-by-one cases at every boundary of the semantics are common:

* ``ts`` exactly on, and 1 ms either side of, window boundaries (multiples of every slide),
  including the moment the watermark reaches a window end;
* gaps of exactly G and G +- 1 after a user's last event;
* lateness of exactly L and L +- 1 behind the watermark, and jitter around D;
* event ids reappearing when the watermark is exactly at ``ts + ttl`` and +- 1, and the
  same ids in several partitions (dedup is per partition);
* a sprinkling of invalid records of many kinds (bad JSON, missing fields, wrong types).

One seeded builder serves both entry points.  :func:`record_streams` lets Hypothesis draw
the semantics, the users, the partition sizes and the seed, so a failure replays exactly and
shrinks to the shortest failing prefix of each partition; :func:`random_stream` gives
larger deterministic streams from a plain seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from gpu_pipeline import schema
from gpu_pipeline.semantics import HOUR_MS, MINUTE_MS, SECOND_MS, Semantics, WindowSpec

Record = tuple[int, int, bytes]
"""One raw record of a partition: (offset, seq, raw bytes)."""

BASE_TS_MS = 1_795_608_000_000
"""2026-11-25T12:00:00Z, a multiple of every window size used here."""

PAGES = (None, "/", "/home", "/search", "/p/1", "/p/2", "/cart", "/checkout", "/thanks")
CATEGORIES = ("shoes", "books", "toys")
PRICES: tuple[float | int, ...] = (
    0,
    0.0,
    0.1,
    0.2,
    0.3,
    19.99,
    2.675,
    5,
    1e-7,
    0.0000005,
    0.0000015,
    1_000_000.0,
    1e9,
)
"""Prices where float rounding bites: 0.1 + 0.2, half-micro ties, the upper limit."""
PRODUCTS = (0, 1, 2, 3, 2**63 - 1)
USERS = (0, 1, 2, 3, 7, 2**63 - 1)


@dataclass(frozen=True)
class StreamCase:
    """A drawn test case: the semantics and the partitions' records in arrival order."""

    semantics: Semantics
    partitions: dict[int, list[Record]]

    @property
    def records(self) -> int:
        return sum(len(records) for records in self.partitions.values())


# --------------------------------------------------------------------------------------
# Semantics
# --------------------------------------------------------------------------------------


@st.composite
def small_semantics(draw: st.DrawFn) -> Semantics:
    """Valid parameters small enough that every rule fires within a few dozen records."""
    if draw(st.integers(0, 9)) == 0:
        return Semantics()
    traffic = draw(st.sampled_from([(MINUTE_MS, MINUTE_MS), (10_000, 10_000), (30_000, 10_000)]))
    product = draw(
        st.sampled_from([(5 * MINUTE_MS, MINUTE_MS), (MINUTE_MS, MINUTE_MS), (20_000, 10_000)])
    )
    return Semantics(
        max_out_of_orderness_ms=draw(st.sampled_from([0, 1, SECOND_MS, 5 * SECOND_MS])),
        allowed_lateness_ms=draw(st.sampled_from([0, 1, 10 * SECOND_MS, MINUTE_MS])),
        dedup_ttl_ms=draw(st.sampled_from([0, 1, 30 * SECOND_MS, 10 * MINUTE_MS])),
        session_gap_ms=draw(st.sampled_from([0, 1, 30 * SECOND_MS, 2 * MINUTE_MS])),
        max_future_skew_ms=draw(st.sampled_from([0, 2 * MINUTE_MS, 5 * MINUTE_MS, HOUR_MS])),
        windows=(
            WindowSpec("traffic_1m", traffic[0], traffic[1], "event_type"),
            WindowSpec("product_5m", product[0], product[1], "product_id"),
        ),
    )


# --------------------------------------------------------------------------------------
# Rendering one event as JSON
# --------------------------------------------------------------------------------------


def render_ts(rng: random.Random, ts_ms: int) -> int | str:
    """The ``ts`` field as integer ms or as an RFC 3339 string with 0-3 fraction digits."""
    if ts_ms < 0 or rng.random() < 0.5:
        return ts_ms
    instant = datetime.fromtimestamp(ts_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    millis = ts_ms % 1000
    digits = [3]
    if millis % 10 == 0:
        digits.append(2)
    if millis % 100 == 0:
        digits.append(1)
    if millis == 0:
        digits.append(0)
    width = rng.choice(digits)
    fraction = f".{millis:03d}"[: width + 1] if width else ""
    return f"{instant}{fraction}Z"


def _optional(rng: random.Random, event: dict[str, Any], name: str, value: Any) -> None:
    """Set an optional field, leave it out, or send an explicit null (which means absent)."""
    roll = rng.random()
    if roll < 0.5:
        event[name] = value
    elif roll < 0.6:
        event[name] = None


def make_event(
    rng: random.Random, event_id: str, user_id: int, ts_ms: int, event_type: str
) -> dict[str, Any]:
    """A valid event with plausible optional fields (prices chosen to stress rounding)."""
    event: dict[str, Any] = {
        "event_id": event_id,
        "user_id": user_id,
        "ts": render_ts(rng, ts_ms),
        "event_type": event_type,
    }
    _optional(rng, event, "page", rng.choice(PAGES))
    if event_type in schema.NEEDS_PRODUCT_ID or rng.random() < 0.2:
        event["product_id"] = rng.choice(PRODUCTS[:4] if rng.random() < 0.9 else PRODUCTS)
    _optional(rng, event, "category", rng.choice(CATEGORIES))
    if event_type in schema.NEEDS_PRICE or rng.random() < 0.1:
        event["price"] = rng.choice(PRICES)
        if rng.random() < 0.5:
            event["quantity"] = rng.choice((1, 2, 3, 1000))
    _optional(rng, event, "country", rng.choice(("US", "DE", "FR")))
    _optional(rng, event, "device", rng.choice(schema.DEVICES))
    _optional(rng, event, "referrer", rng.choice(("", "https://example.com/")))
    if rng.random() < 0.05:
        event["extra"] = rng.choice(([1, {"nested": None}], True, 1.5, "x", {"a": {"b": []}}))
    items = list(event.items())
    if rng.random() < 0.2:
        rng.shuffle(items)
    return dict(items)


def encode(rng: random.Random, event: dict[str, Any]) -> bytes:
    """JSON bytes of one event, with varied spacing and escaping (never a line break)."""
    compact = rng.random() < 0.5
    text = json.dumps(
        event,
        ensure_ascii=rng.random() < 0.5,
        separators=(",", ":") if compact else (", ", ": "),
    )
    return text.encode("utf-8")


# --------------------------------------------------------------------------------------
# Invalid records
# --------------------------------------------------------------------------------------

Corruption = Callable[[random.Random, dict[str, Any]], bytes]


def _with(**changes: Any) -> Corruption:
    """A corruption that sets (or, with the value ``...``, removes) some fields."""

    def corrupt(rng: random.Random, event: dict[str, Any]) -> bytes:
        changed = dict(event)
        for name, value in changes.items():
            if value is ...:
                changed.pop(name, None)
            else:
                changed[name] = value
        return encode(rng, changed)

    return corrupt


def _raw(data: bytes) -> Corruption:
    return lambda rng, event: data


def _text_edit(edit: Callable[[bytes], bytes]) -> Corruption:
    return lambda rng, event: edit(encode(rng, event))


def _raw_field(name: str, literal: bytes) -> Corruption:
    """Set a field to JSON text that ``json.dumps`` cannot write (``NaN``, ``1e400``)."""

    def corrupt(rng: random.Random, event: dict[str, Any]) -> bytes:
        rest = encode(rng, {key: value for key, value in event.items() if key != name})
        return rest[:-1] + b', "' + name.encode() + b'": ' + literal + b"}"

    return corrupt


CORRUPTIONS: tuple[tuple[str, Corruption], ...] = (
    ("record", _raw(b"")),
    ("record", _raw(b"   ")),
    ("record", _raw(b"\xff\xfe{}")),
    ("record", _raw(b"[1, 2]")),
    ("record", _raw(b'"just a string"')),
    ("record", _raw(b"null")),
    ("record", _text_edit(lambda data: data[:-1])),
    ("record", _text_edit(lambda data: data + b" x")),
    ("record", _text_edit(lambda data: b"\xef\xbb\xbf" + data)),
    ("record", _text_edit(lambda data: b'{"user_id": 1, ' + data[1:])),
    ("record", _raw_field("price", b"NaN")),
    ("record", _raw_field("page", b'"\\ud800"')),
    ("event_id", _with(event_id=...)),
    ("event_id", _with(event_id="")),
    ("event_id", _with(event_id="x" * 65)),
    ("event_id", _with(event_id=5)),
    ("user_id", _with(user_id=None)),
    ("user_id", _with(user_id="7")),
    ("user_id", _with(user_id=1.0)),
    ("user_id", _with(user_id=True)),
    ("user_id", _with(user_id=-1)),
    ("user_id", _with(user_id=2**63)),
    ("ts", _with(ts=...)),
    ("ts", _with(ts=1.5e12)),
    ("ts", _with(ts=-1)),
    ("ts", _with(ts=10_413_792_000_000)),
    ("ts", _with(ts="2026-02-30T00:00:00Z")),
    ("ts", _with(ts="2026-11-25T12:00:00z")),
    ("ts", _with(ts="2026-11-25 12:00:00Z")),
    ("ts", _with(ts="2026-11-25T12:00:00.1234Z")),
    ("ts", _with(ts="2026-11-25T24:00:00Z")),
    ("ts", _with(ts="2026-11-25T12:00:60Z")),
    ("ts", _with(ts="2026-11-25T12:00:00+00:00")),
    ("event_type", _with(event_type="click")),
    ("event_type", _with(event_type=None)),
    ("product_id", _with(event_type="purchase", product_id=..., price=1.0)),
    ("price", _with(event_type="add_to_cart", product_id=1, price=...)),
    ("page", _with(page=7)),
    ("product_id", _with(product_id="1")),
    ("product_id", _with(product_id=-1)),
    ("price", _with(price=-0.01, event_type="purchase", product_id=1)),
    ("price", _with(price="9.99", event_type="purchase", product_id=1)),
    ("price", _with(price=1e9 + 1)),
    ("price", _with(price=True)),
    ("price", _raw_field("price", b"1e400")),
    ("quantity", _with(quantity=0)),
    ("quantity", _with(quantity=1.5)),
    ("quantity", _with(quantity=schema.MAX_QUANTITY + 1)),
    ("quantity", _with(price=1e9, quantity=1001)),
    ("country", _with(country="us")),
    ("country", _with(country="USA")),
    ("device", _with(device="tv")),
    ("referrer", _with(referrer=["a"])),
    ("category", _with(category="c" * 4097)),
)
"""(field named by the error, corruption): each turns a valid event into a dead letter."""

VALID_EDGES: tuple[Corruption, ...] = (
    _with(event_id="é" * 64),
    _with(user_id=2**63 - 1),
    _with(page="p" * 4096),
    _with(price=1e9, quantity=1000, event_type="purchase", product_id=1),
    _with(quantity=schema.MAX_QUANTITY, price=0.5),
    _with(extra=[1, 2, {"deep": {"er": None}}]),
    _text_edit(lambda data: data[:-1] + b', "big": [1e400, -1e400, 1' + b"0" * 500 + b"]}"),
    _text_edit(lambda data: b" \t" + data + b" "),
    _text_edit(lambda data: data[:-1] + b', "emoji": "\\ud83d\\ude00"}'),
)
"""Records at the limits of validity: they must NOT become dead letters."""


# --------------------------------------------------------------------------------------
# The stream builder
# --------------------------------------------------------------------------------------


@dataclass
class _PartitionBuilder:
    """Builds one partition's records, each chosen relative to the state so far."""

    rng: random.Random
    sem: Semantics
    users: list[int]
    invalid_rate: float
    ts_ms: int = BASE_TS_MS
    max_ts_ms: int | None = None
    next_id: int = 0
    user_last_ts: dict[int, int] = field(default_factory=dict)
    seen: list[tuple[str, int]] = field(default_factory=list)
    follow_up: list[tuple[str, int, int]] = field(default_factory=list)

    def record(self) -> bytes:
        """The next raw record."""
        if self.follow_up:
            event_id, user_id, ts_ms = self.follow_up.pop()
            return self._emit(event_id, user_id, ts_ms)
        roll = self.rng.random()
        if roll < self.invalid_rate:
            _, corrupt = self.rng.choice(CORRUPTIONS)
            return corrupt(self.rng, self._event(self._fresh_id(), self.rng.choice(self.users)))
        if roll < self.invalid_rate * 1.5:
            edge = self.rng.choice(VALID_EDGES)
            return edge(self.rng, self._event(self._fresh_id(), self.rng.choice(self.users)))
        return self._move()

    def _fresh_id(self) -> str:
        self.next_id += 1
        return f"e{self.next_id}"

    def _event(self, event_id: str, user_id: int) -> dict[str, Any]:
        ts_ms = self.max_ts_ms if self.max_ts_ms is not None else self.ts_ms
        return make_event(self.rng, event_id, user_id, ts_ms, self._event_type())

    def _event_type(self) -> str:
        weights = (6, 4, 1, 2, 1, 1, 2)
        return self.rng.choices(schema.EVENT_TYPES, weights=weights)[0]

    def _emit(self, event_id: str, user_id: int, ts_ms: int, *, corrupt: bool = False) -> bytes:
        """An event at ``ts_ms``; a ``corrupt`` one (a planted far-future time) leaves the
        stream's clock, users and ids alone, as a flipped digit would."""
        ts_ms = max(0, min(ts_ms, 10_413_791_999_999))
        if not corrupt:
            self.max_ts_ms = ts_ms if self.max_ts_ms is None else max(self.max_ts_ms, ts_ms)
            self.user_last_ts[user_id] = max(ts_ms, self.user_last_ts.get(user_id, ts_ms))
            self.seen.append((event_id, ts_ms))
        return encode(self.rng, make_event(self.rng, event_id, user_id, ts_ms, self._event_type()))

    def _move(self) -> bytes:
        """Pick a boundary to aim at, then emit an event there."""
        rng, sem = self.rng, self.sem
        user = rng.choice(self.users)
        top = self.max_ts_ms if self.max_ts_ms is not None else self.ts_ms
        delay, lateness = sem.max_out_of_orderness_ms, sem.allowed_lateness_ms
        nudge = rng.choice((-1, 0, 1))
        moves: list[tuple[float, Callable[[], int]]] = [
            (4, lambda: top + rng.choice((0, 0, 1, rng.randrange(0, 2 * delay + 2)))),
            (2, lambda: top - rng.choice((delay - 1, delay, delay + 1, rng.randrange(delay + 1)))),
            (1, lambda: top - delay - lateness + nudge),
            (0.3, lambda: top - delay - lateness - rng.randrange(1, 3 * lateness + 3)),
            (2, lambda: self._window_edge(top) + nudge),
            (1.5, lambda: self._window_edge(top) + delay + nudge),
            (0.4, lambda: top + rng.randrange(sem.session_gap_ms + 2, 3 * sem.session_gap_ms + 3)),
            (1, lambda: rng.choice(self.seen[-8:])[1] if self.seen else top),
        ]
        horizon = top - delay - lateness - 1
        last = self.user_last_ts.get(user)
        if last is not None and last + sem.session_gap_ms >= horizon:
            moves.append((2, lambda: last + sem.session_gap_ms + nudge))
        bound = sem.max_future_skew_ms
        if bound:
            # a legitimate pause just past the guard's bound, or a long one
            moves.append((0.3, lambda: top + bound + rng.choice((1, 2, rng.randrange(bound)))))
            if rng.random() < 0.02:
                # a corrupted time: from just past the bound to decades ahead
                ahead = rng.choice((bound + 1, bound + 2, 3 * bound, 40 * 365 * 86_400_000))
                return self._emit(self._fresh_id(), user, top + ahead, corrupt=True)
        weights = [weight for weight, _ in moves]
        ts_ms = rng.choices([make for _, make in moves], weights=weights)[0]()
        if self.seen and rng.random() > 0.85:
            return self._reuse_id(user, ts_ms)
        return self._emit(self._fresh_id(), user, ts_ms)

    def _window_edge(self, top: int) -> int:
        """A window boundary (a multiple of some slide) at or just after ``top``."""
        slides = [spec.slide_ms for spec in self.sem.windows] + [MINUTE_MS]
        slide = self.rng.choice(slides)
        return (top // slide + self.rng.choice((0, 1))) * slide

    def _reuse_id(self, user: int, ts_ms: int) -> bytes:
        """A producer retry: an id seen before, now or right when its TTL runs out."""
        event_id, first_ts = self.rng.choice(self.seen[-20:])
        if self.rng.random() < 0.5:
            return self._emit(event_id, user, self.rng.choice((ts_ms, first_ts)))
        # Push the watermark to exactly first_ts + ttl (+-1), then repeat the id.
        nudge = self.rng.choice((-1, 0, 1))
        push = first_ts + self.sem.dedup_ttl_ms + self.sem.max_out_of_orderness_ms + nudge
        self.follow_up.append((event_id, user, self.rng.choice((first_ts, push))))
        return self._emit(self._fresh_id(), self.rng.choice(self.users), push)


def _positions(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Increasing (offset, seq) positions; sometimes several events share one message."""
    offset = rng.choice((0, 0, 17))
    positions: list[tuple[int, int]] = []
    while len(positions) < count:
        events_here = 1 if rng.random() < 0.85 else rng.randint(2, 3)
        for seq in range(min(events_here, count - len(positions))):
            positions.append((offset, seq))
        offset += 1
    return positions


def build_partitions(
    seed: int,
    sem: Semantics,
    sizes: list[int],
    *,
    users: list[int],
    invalid_rate: float,
) -> dict[int, list[Record]]:
    """Records for partitions ``0 .. len(sizes) - 1``; ids repeat across partitions on purpose.

    Each partition has its own generator, so a shorter partition is a prefix of a longer
    one with the same seed: shrinking a size shrinks the stream and nothing else.
    """
    partitions: dict[int, list[Record]] = {}
    for partition, size in enumerate(sizes):
        rng = random.Random(f"{seed}/{partition}")
        start = rng.choice((BASE_TS_MS, BASE_TS_MS - 1, BASE_TS_MS + 59_999, 0, 1))
        builder = _PartitionBuilder(rng, sem, users, invalid_rate, ts_ms=start)
        positions = _positions(random.Random(f"{seed}/{partition}/positions"), size)
        partitions[partition] = [(offset, seq, builder.record()) for offset, seq in positions]
    return partitions


@st.composite
def record_streams(
    draw: st.DrawFn,
    semantics: st.SearchStrategy[Semantics] | None = None,
    *,
    max_records: int = 60,
    max_partitions: int = 3,
    invalid_rate: float = 0.08,
) -> StreamCase:
    """Small adversarial streams: 0..``max_records`` records in 1..``max_partitions`` partitions.

    Parameters
    ----------
    semantics
        Where the parameters come from; :func:`small_semantics` when omitted.
    """
    sem = draw(semantics if semantics is not None else small_semantics())
    count = draw(st.integers(1, max_partitions))
    sizes = [draw(st.integers(0, max_records // count)) for _ in range(count)]
    users = draw(st.lists(st.sampled_from(USERS), min_size=1, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    partitions = build_partitions(seed, sem, sizes, users=users, invalid_rate=invalid_rate)
    return StreamCase(sem, partitions)


def random_stream(
    seed: int,
    n: int,
    *,
    partitions: int = 1,
    semantics: Semantics | None = None,
    users: int = 20,
    invalid_rate: float = 0.02,
) -> dict[int, list[Record]]:
    """A larger deterministic adversarial stream: ``n`` records spread over ``partitions``.

    The same arguments always give the same bytes.
    """
    sem = semantics or Semantics()
    sizes = [n // partitions + (1 if p < n % partitions else 0) for p in range(partitions)]
    pool = list(USERS) + list(range(100, 100 + max(0, users - len(USERS))))
    return build_partitions(
        seed, sem, sizes, users=pool[: max(1, users)], invalid_rate=invalid_rate
    )

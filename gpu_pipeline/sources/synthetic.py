"""The seeded synthetic clickstream (SPEC §5): NDJSON bytes, Arrow batches and a Source.

The stream is built block by block with numpy so that it is fast (no Python loop per event)
and bounded in memory, and every block draws from its own RNG seeded by ``(seed, block)``:
the output is a pure function of ``(events, seed)``, whatever chunk size a caller asks for.

The model, in the order it is drawn:

* **Time.**  Event time starts at :data:`EPOCH_MS` (2026-11-25T00:00:00Z) and advances at
  ``clamp(events / 14_400, 1, 1000)`` events per second: up to ~14M events span about four
  hours (long enough for many 30-minute session gaps and window slides), larger streams run
  at 1000 events/s.
* **Sessions.**  Sessions start as a Poisson-like process; each belongs to a user drawn from
  a bounded power law over ``clamp(events // 10, 1, 1_000_000)`` users (heavy-tailed
  activity: a few users own many sessions, so gaps between one user's sessions fall both
  below and above the 30-minute session gap).  Within a session, events are a Markov chain
  over the funnel page_view -> product_view -> add_to_cart -> checkout -> purchase (with
  search and remove_from_cart) and drop-off at every step, separated by log-normal gaps
  (median 20 s, at most 20 min).
* **Catalogue.**  Zipf-popular products in categories, with a fixed price per product;
  countries, devices and referrers per session; pages are URL paths.
* **Disorder.**  Arrival order is event time plus: jitter below 4 s for 30% of events (out of
  order within D = 5 s), a 12-55 s delay for 0.5% (late within L = 60 s) and a 90 s-20 min
  delay for 0.1% (too late).
* **Retries.**  About 2% of lines are producer retries: byte-identical copies of an earlier
  line, 70% a few events later, 30% 2-45 minutes later (inside the 1 h dedup TTL).
* **Dirt.**  About 0.1% of lines are invalid records of several kinds (see
  :data:`CORRUPTIONS`), and about 1% of valid events carry ``ts`` as integer epoch ms.
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.sources.base import RawBatch, Source

EPOCH_MS = 1_795_564_800_000
"""2026-11-25T00:00:00Z: where event time starts."""

USER_ID_BASE = 10_000_000
"""User ids are ``USER_ID_BASE + k``: always eight digits, so lines format at fixed width."""
PRODUCT_ID_BASE = 100_000
"""Product ids are ``PRODUCT_ID_BASE + k``: always six digits."""
MAX_USERS = 1_000_000
MAX_PRODUCTS = 100_000
SESSIONS_PER_BLOCK = 8192
MAX_SESSION_EVENTS = 48

INT_TS_RATE = 0.01
INVALID_RATE = 0.001
DUPLICATE_RATE = 0.02
LATE_RATE = 0.005
TOO_LATE_RATE = 0.001
JITTER_RATE = 0.3
MAX_JITTER_MS = 4_000
LATE_DELAY_MS = (12_000, 55_000)
TOO_LATE_DELAY_MS = (90_000, 1_200_000)
LONG_RETRY_DELAY_MS = (120_000, 2_700_000)
LONG_RETRY_SHARE = 0.3

_END = len(schema.EVENT_TYPES)
_PV, _PRODV, _SEARCH, _ATC, _RFC, _CHECKOUT, _PURCHASE = range(_END)
_PRODUCT_TYPES = (_PRODV, _ATC, _RFC, _PURCHASE)
_QUANTITY_TYPES = (_ATC, _RFC, _PURCHASE)
TRANSITIONS = np.array(
    [
        # page_view, product_view, search, add_to_cart, remove, checkout, purchase, END
        [0.30, 0.34, 0.14, 0.00, 0.00, 0.00, 0.00, 0.22],  # page_view
        [0.14, 0.30, 0.08, 0.22, 0.00, 0.00, 0.00, 0.26],  # product_view
        [0.08, 0.58, 0.10, 0.00, 0.00, 0.00, 0.00, 0.24],  # search
        [0.04, 0.32, 0.02, 0.06, 0.10, 0.30, 0.00, 0.16],  # add_to_cart
        [0.15, 0.40, 0.05, 0.05, 0.00, 0.10, 0.00, 0.25],  # remove_from_cart
        [0.04, 0.00, 0.00, 0.00, 0.00, 0.00, 0.62, 0.34],  # checkout
        [0.30, 0.05, 0.02, 0.00, 0.00, 0.00, 0.00, 0.63],  # purchase
    ]
)
"""The funnel as a Markov chain; every session starts with a page_view."""

CATEGORIES = (
    "electronics",
    "computers",
    "phones",
    "home",
    "kitchen",
    "garden",
    "toys",
    "books",
    "music",
    "movies",
    "fashion",
    "shoes",
    "beauty",
    "health",
    "sports",
    "outdoor",
    "automotive",
    "grocery",
    "pets",
    "office",
)
PAGES = (
    "/",
    "/",
    "/",
    "/deals",
    "/new",
    "/bestsellers",
    "/help",
    "/account",
    "/cart",
    "/blog/holiday-gift-guide",
    "/blog/black-friday",
    "/stores",
    "/gift-cards",
    *(f"/category/{c}" for c in CATEGORIES),
)
COUNTRIES = (
    "US",
    "US",
    "US",
    "DE",
    "GB",
    "FR",
    "IN",
    "BR",
    "JP",
    "CA",
    "ES",
    "IT",
    "NL",
    "PL",
    "SE",
    "AU",
    "MX",
)
COUNTRY_MISSING_RATE = 0.02
DEVICE_WEIGHTS = (0.38, 0.55, 0.07)
REFERRERS = (
    "https://www.google.com/",
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://t.co/",
    "https://www.facebook.com/",
    "https://news.example.com/deals",
    "android-app://com.example.shop",
    "email:newsletter",
)
DIRECT_RATE = 0.4
QUERIES = (
    "headphones",
    "running shoes",
    "usb-c cable",
    "coffee maker",
    "lego",
    "winter jacket",
    "phone case",
    "desk lamp",
    "yoga mat",
    "board games",
    "4k tv",
    "air fryer",
    "backpack",
    "smart watch",
    "gift ideas",
    "sale",
    "socks",
    "laptop stand",
    "dog bed",
    "vitamin d",
)
QUANTITY_WEIGHTS = (0.86, 0.09, 0.03, 0.01, 0.01)


@dataclass(frozen=True)
class StreamParams:
    """The size-dependent parameters of one stream, derived from ``(events, seed)``."""

    events: int
    seed: int
    users: int
    products: int
    events_per_second: float

    @classmethod
    def of(cls, events: int, seed: int) -> StreamParams:
        """Validate the options and derive the stream's scale from the event count."""
        if not isinstance(events, int) or isinstance(events, bool) or events < 0:
            raise ConfigError("events", f"must be a non-negative integer, got {events!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError("seed", f"must be an integer, got {seed!r}")
        return cls(
            events=events,
            seed=seed,
            users=int(np.clip(events // 10, 1, MAX_USERS)),
            products=int(np.clip(events // 50, 50, MAX_PRODUCTS)),
            events_per_second=float(np.clip(events / 14_400, 1.0, 1000.0)),
        )

    @property
    def block_ms(self) -> int:
        """Event-time span of one block of :data:`SESSIONS_PER_BLOCK` session starts."""
        sessions_per_second = self.events_per_second / _mean_session_events()
        return max(1, round(SESSIONS_PER_BLOCK / sessions_per_second * 1000))


@cache
def _mean_session_events() -> float:
    """Expected events per session of :data:`TRANSITIONS` (visits of the absorbing chain)."""
    transient = TRANSITIONS[:, :_END]
    visits = np.linalg.inv(np.eye(_END) - transient)[_PV]
    return float(visits.sum())


# --------------------------------------------------------------------------------------------
# Vectorised helpers


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _power_law_rank(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """Ranks in ``[0, n)`` with P(rank = k) ~ (k + 1) ** -exponent (inverse CDF, continuous)."""
    a = 1.0 - exponent
    x = ((np.float64(n + 1) ** a - 1.0) * u + 1.0) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def _permute(rank: np.ndarray, n: int, salt: int) -> np.ndarray:
    """A bijection of ``[0, n)`` so that popular ranks do not get the smallest ids."""
    mul = 2_654_435_761  # prime, larger than any n here, hence coprime with n
    return (rank * mul + salt % n) % n


def _binary_array(matrix: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """Rows of a fixed-width uint8 matrix as an Arrow binary (or string) array, no Python loop."""
    rows, width = matrix.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
    data = np.ascontiguousarray(matrix)
    return pa.Array.from_buffers(
        type or pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex16(values: np.ndarray) -> np.ndarray:
    """uint64 -> 16 lowercase hex digits per row, as an ``(n, 16)`` uint8 matrix."""
    big_endian = values.view(np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    out = np.empty((values.shape[0], 16), dtype=np.uint8)
    out[:, 0::2] = _HEX[big_endian >> 4]
    out[:, 1::2] = _HEX[big_endian & 15]
    return out


def _digit_table(width: int) -> np.ndarray:
    """All ``10 ** width`` zero-padded decimal strings as a ``(10 ** width, width)`` matrix."""
    text = "".join(f"{k:0{width}d}" for k in range(10**width)).encode()
    return np.frombuffer(text, dtype=np.uint8).reshape(-1, width)


_DIGIT_TABLES = {width: _digit_table(width) for width in (1, 2, 3, 4)}


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints -> zero-padded decimal digits, as an ``(n, width)`` uint8 matrix.

    Four digits at a time through a lookup table: int64 division is the slow part.
    """
    out = np.empty((values.shape[0], width), dtype=np.uint8)
    rest = values.astype(np.int64)
    col = width
    while col > 0:
        k = min(4, col)
        rest, chunk = np.divmod(rest, 10**k)
        out[:, col - k : col] = _DIGIT_TABLES[k][chunk]
        col -= k
    return out


def _civil_dates(days: np.ndarray) -> np.ndarray:
    """Days since the epoch -> ``YYYY-MM-DD`` rows (H. Hinnant's ``civil_from_days``)."""
    z = days + 719_468
    era = np.floor_divide(z, 146_097)
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    out = np.empty((days.shape[0], 10), dtype=np.uint8)
    out[:, 0:4] = _digits(year, 4)
    out[:, 5:7] = _digits(month, 2)
    out[:, 8:10] = _digits(day, 2)
    out[:, [4, 7]] = ord("-")
    return out


def _rfc3339_ms(ts_ms: np.ndarray) -> np.ndarray:
    """Epoch ms -> ``YYYY-MM-DDTHH:MM:SS.mmmZ`` as an ``(n, 24)`` uint8 matrix.

    A block spans a few days at most, so dates are formatted once per distinct day and
    gathered; ``pyarrow.compute.strftime`` is about 50x slower than this.
    """
    out = np.empty((ts_ms.shape[0], 24), dtype=np.uint8)
    if ts_ms.shape[0] == 0:
        return out
    days, ms_of_day = np.divmod(ts_ms, 86_400_000)
    first = int(days.min())
    out[:, 0:10] = _civil_dates(np.arange(first, int(days.max()) + 1))[days - first]
    seconds, millis = np.divmod(ms_of_day, 1000)
    minutes, sec = np.divmod(seconds, 60)
    hours, mins = np.divmod(minutes, 60)
    two = _DIGIT_TABLES[2]
    out[:, 11:13] = two[hours]
    out[:, 14:16] = two[mins]
    out[:, 17:19] = two[sec]
    out[:, 20:23] = _DIGIT_TABLES[3][millis]
    out[:, [10, 13, 16, 19, 23]] = np.frombuffer(b"T::.Z", dtype=np.uint8)
    return out


def _literal(matrix: np.ndarray, col: int, text: bytes) -> int:
    """Write a constant into every row at ``col``; return the column after it."""
    matrix[:, col : col + len(text)] = np.frombuffer(text, dtype=np.uint8)
    return col + len(text)


def _join(*arrays: pa.Array) -> pa.Array:
    """Row-wise concatenation of non-null binary arrays, two at a time (Arrow's n-ary
    ``binary_join_element_wise`` slows down sharply with many arguments)."""
    parts = list(arrays)
    while len(parts) > 1:
        paired = [
            pc.binary_join_element_wise(parts[i], parts[i + 1], b"")
            for i in range(0, len(parts) - 1, 2)
        ]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _concat_strings(pieces: list[pa.Array | str], length: int) -> pa.Array:
    """Join arrays and string constants row-wise (used once per stream, for dictionaries)."""
    arrays = [
        p.cast(pa.binary()) if isinstance(p, pa.Array) else pa.array([p.encode()] * length)
        for p in pieces
    ]
    return _join(*arrays)


# --------------------------------------------------------------------------------------------
# Dictionaries: every variable-width part of a line is a lookup into one of two tables.


@dataclass(frozen=True)
class _Catalogue:
    """The product catalogue and the ``event_type``/``page``/product part of every line."""

    products: int
    category: np.ndarray  # int64 index into CATEGORIES, per product
    price_cents: np.ndarray  # int64, per product
    body: pa.Array  # binary: the line part after ``ts`` up to the tail, by body index
    body_base: np.ndarray  # int64: first body index of each event type

    @staticmethod
    def build(products: int) -> _Catalogue:
        """Derive categories and prices from the product id alone (stable across seeds)."""
        ids = np.arange(products, dtype=np.uint64) + np.uint64(PRODUCT_ID_BASE)
        h = _mix64(ids ^ np.uint64(0x5EED_CA7A_1060))
        category = (h % np.uint64(len(CATEGORIES))).astype(np.int64)
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        price_cents = (np.floor(10 ** (2 + 3.3 * u)).astype(np.int64) // 100) * 100 + 99
        pid = pa.array(ids.astype(np.int64)).cast(pa.string())
        cat = pa.array(CATEGORIES).take(pa.array(category))
        cents = pc.utf8_lpad(pa.array(np.arange(100)).cast(pa.string()), 2, "0")
        dollars = pa.array(price_cents // 100).cast(pa.string())
        price = _concat_strings(
            [',"price":', dollars, ".", cents.take(pa.array(price_cents % 100))], products
        )
        product = _concat_strings([',"product_id":', pid, ',"category":"', cat, '"'], products)
        product_page = _concat_strings([',"page":"/product/', pid, '"'], products)
        pages = {
            _SEARCH: "/search",
            _RFC: "/cart",
            _CHECKOUT: "/checkout",
            _PURCHASE: "/checkout/complete",
        }
        parts: list[pa.Array] = []
        base = np.zeros(_END, dtype=np.int64)
        count = 0
        for code, name in enumerate(schema.EVENT_TYPES):
            head = f',"event_type":"{name}"'
            if code == _PV:
                part = pa.array([f'{head},"page":"{page}"'.encode() for page in PAGES])
            elif code in (_SEARCH, _CHECKOUT):
                part = pa.array([f'{head},"page":"{pages[code]}"'.encode()])
            elif code in (_PRODV, _ATC):
                part = _concat_strings([head, product_page, product, price], products)
            elif code == _RFC:
                part = _concat_strings([f'{head},"page":"{pages[code]}"', product], products)
            else:
                part = _concat_strings([f'{head},"page":"{pages[code]}"', product, price], products)
            base[code] = count
            count += len(part)
            parts.append(part.cast(pa.binary()))
        return _Catalogue(
            products=products,
            category=category,
            price_cents=price_cents,
            body=pa.concat_arrays(parts),
            body_base=base,
        )


@cache
def _catalogue(products: int) -> _Catalogue:
    return _Catalogue.build(products)


_TAIL_SHAPE = (
    len(QUANTITY_WEIGHTS) + 1,  # quantity 0 = absent
    len(COUNTRIES) + 1,  # country 0 = absent
    len(schema.DEVICES),
    len(REFERRERS) + 1,  # referrer 0 = absent
    len(QUERIES) + 1,  # query 0 = absent
)


@cache
def _tails() -> pa.Array:
    """Every possible line tail (quantity, country, device, referrer, query, ``}\\n``)."""
    q, c, d, r, s = (np.arange(n) for n in _TAIL_SHAPE)
    grid = [g.ravel() for g in np.meshgrid(q, c, d, r, s, indexing="ij")]

    def optional(prefix: str, values: list[str], codes: np.ndarray, quote: bool) -> pa.Array:
        mark = '"' if quote else ""
        texts = [""] + [f',"{prefix}":{mark}{v}{mark}' for v in values]
        return pa.array([t.encode() for t in texts]).take(pa.array(codes))

    quantity = optional("quantity", [str(k + 1) for k in range(_TAIL_SHAPE[0] - 1)], grid[0], False)
    country = optional("country", list(COUNTRIES), grid[1], True)
    device = pa.array([f',"device":"{v}"'.encode() for v in schema.DEVICES]).take(pa.array(grid[2]))
    referrer = optional("referrer", list(REFERRERS), grid[3], True)
    query = optional("query", list(QUERIES), grid[4], True)
    close = pa.array([b"}\n"] * len(grid[0]))
    return _join(quantity, country, device, referrer, query, close)


def _tail_index(
    qty: np.ndarray,
    country: np.ndarray,
    device: np.ndarray,
    referrer: np.ndarray,
    query: np.ndarray,
) -> np.ndarray:
    """Index into :func:`_tails` of each event's (quantity, country, device, referrer, query)."""
    return np.ravel_multi_index((qty, country, device, referrer, query), _TAIL_SHAPE).astype(
        np.int64
    )


# --------------------------------------------------------------------------------------------
# Blocks: sessions -> events -> arrival keys


_COLUMNS = ("key", "order", "ts", "eid", "user", "body", "meta")
"""Columns of a block, all int64.  ``body`` indexes the catalogue's line bodies (it encodes
the event type and product); ``meta`` packs the tail index (bits 0-15), the integer-ts flag
(bit 16) and, for invalid records, the corruption draw (bits 17 and up)."""
Columns = dict[str, np.ndarray]
_TAIL_BITS = 16
_INT_TS_BIT = 1 << 16
_CORRUPT_SHIFT = 17


def _markov_sessions(rng: np.random.Generator, sessions: int) -> tuple[np.ndarray, np.ndarray]:
    """Event types of every session: (session index, type) in session-major order."""
    cumulative = np.cumsum(TRANSITIONS, axis=1)
    cumulative[:, -1] = 1.0
    alive = np.arange(sessions)
    state = np.full(sessions, _PV, dtype=np.int64)
    sess_parts, type_parts = [alive], [state]
    for _ in range(MAX_SESSION_EVENTS - 1):
        u = rng.random(alive.shape[0])
        state = (u[:, None] >= cumulative[state]).sum(axis=1)
        keep = state != _END
        alive, state = alive[keep], state[keep]
        if alive.shape[0] == 0:
            break
        sess_parts.append(alive)
        type_parts.append(state)
    sess = np.concatenate(sess_parts)
    types = np.concatenate(type_parts)
    order = np.argsort(sess, kind="stable")
    return sess[order], types[order]


def _current_product(
    rng: np.random.Generator, sess: np.ndarray, types: np.ndarray, first: np.ndarray, n: int
) -> np.ndarray:
    """Product index of every event (0 where none): product views pick a Zipf product (or
    re-view the current one); cart and purchase events act on the last viewed product."""
    draws = np.asarray(rng.random(size=sess.shape[0]))
    candidate = _permute(_power_law_rank(draws, n, 1.1), n, 7)
    is_product = np.isin(types, _PRODUCT_TYPES)
    fresh = (types == _PRODV) & (rng.random(sess.shape[0]) < 0.85)
    position = np.arange(sess.shape[0])
    latest = np.maximum.accumulate(np.where(fresh, position, -1))
    fresh |= is_product & (latest < first[sess])
    latest = np.maximum.accumulate(np.where(fresh, position, -1))
    return np.where(is_product, candidate[np.maximum(latest, 0)], 0)


def _block(params: StreamParams, block: int) -> Columns:
    """All events whose session starts in ``block``, with duplicates and arrival keys."""
    rng = np.random.default_rng([_zigzag(params.seed), block])
    span = params.block_ms
    s = SESSIONS_PER_BLOCK
    start = block * span + np.sort(rng.integers(0, span, s))
    user = USER_ID_BASE + _permute(
        _power_law_rank(rng.random(size=s), params.users, 0.75), params.users, params.seed
    )
    country = np.where(
        rng.random(s) < COUNTRY_MISSING_RATE, 0, rng.integers(1, len(COUNTRIES) + 1, s)
    )
    device = rng.choice(len(schema.DEVICES), size=s, p=DEVICE_WEIGHTS)
    referrer = np.where(rng.random(s) < DIRECT_RATE, 0, rng.integers(1, len(REFERRERS) + 1, s))

    sess, types = _markov_sessions(rng, s)
    n = sess.shape[0]
    first = np.searchsorted(sess, np.arange(s))
    is_first = np.zeros(n, dtype=bool)
    is_first[first] = True
    gaps = np.exp(rng.normal(np.log(20_000.0), 1.2, n)).clip(500, 1_200_000).astype(np.int64)
    gaps[is_first] = 0
    elapsed = np.cumsum(gaps)
    ts = start[sess] + elapsed - (elapsed - gaps)[first[sess]]

    catalogue = _catalogue(params.products)
    product = _current_product(rng, sess, types, first, params.products)
    page = rng.integers(0, len(PAGES), n)
    body = catalogue.body_base[types] + np.where(types == _PV, page, product)
    qty = rng.choice(len(QUANTITY_WEIGHTS), size=n, p=QUANTITY_WEIGHTS) + 1
    tail = _tail_index(
        np.where(np.isin(types, _QUANTITY_TYPES), qty, 0),
        country[sess],
        device[sess],
        np.where(is_first, referrer[sess], 0),
        np.where(types == _SEARCH, rng.integers(1, len(QUERIES) + 1, n), 0),
    )
    int_ts = np.where(rng.random(n) < INT_TS_RATE, _INT_TS_BIT, 0)
    corrupt = np.where(rng.random(n) < INVALID_RATE, rng.integers(1, 1 << 30, n), 0)
    eid = np.uint64(block << 32) + np.arange(n, dtype=np.uint64) + _seed_salt(params.seed)
    cols: Columns = {
        "key": ts + _arrival_delay(rng, n),
        "order": (block << 32) + np.arange(n, dtype=np.int64),
        "ts": ts,
        "eid": _mix64(eid).view(np.int64),
        "user": user[sess],
        "body": body,
        "meta": tail | int_ts | (corrupt << _CORRUPT_SHIFT),
    }
    return _with_retries(rng, cols, block, params)


def _zigzag(seed: int) -> int:
    """Any integer -> a distinct non-negative one (numpy seeds must be non-negative)."""
    return 2 * seed if seed >= 0 else -2 * seed - 1


def _seed_salt(seed: int) -> np.uint64:
    """A 64-bit salt for event ids, so that different seeds get different ids."""
    return np.uint64(int(_mix64(np.array([_zigzag(seed) % 2**64], dtype=np.uint64))[0]))


def _arrival_delay(rng: np.random.Generator, n: int) -> np.ndarray:
    """Arrival key minus event time: jitter, late-within-L and too-late delays."""
    jitter = np.where(rng.random(n) < JITTER_RATE, rng.integers(0, MAX_JITTER_MS, n), 0)
    kind = rng.random(n)
    delay = np.where(kind < LATE_RATE, rng.integers(*LATE_DELAY_MS, n), jitter)
    too_late = (kind >= LATE_RATE) & (kind < LATE_RATE + TOO_LATE_RATE)
    return np.where(too_late, rng.integers(*TOO_LATE_DELAY_MS, n), delay)


def _with_retries(
    rng: np.random.Generator, cols: Columns, block: int, params: StreamParams
) -> Columns:
    """Append producer retries: identical copies of valid events with a later arrival key."""
    n = cols["ts"].shape[0]
    valid = (cols["meta"] >> _CORRUPT_SHIFT) == 0
    pick = np.flatnonzero((rng.random(n) < DUPLICATE_RATE / (1 - DUPLICATE_RATE)) & valid)
    m = pick.shape[0]
    few_events_ms = max(2, min(3_000, round(5_000 / params.events_per_second)))
    short = rng.integers(1, few_events_ms, m)
    long = rng.integers(*LONG_RETRY_DELAY_MS, m)
    delay = np.where(rng.random(m) < LONG_RETRY_SHARE, long, short)
    out = {name: np.concatenate([col, col[pick]]) for name, col in cols.items()}
    out["key"][n:] += delay
    out["order"][n:] = (block << 32) + n + np.arange(m, dtype=np.int64)
    return out


def _arrivals(params: StreamParams) -> Iterator[Columns]:
    """Events in arrival order, block by block, cut at ``params.events`` lines.

    Every event of a block has a key at or after its block's start, so once block ``b`` is
    drawn, all pending events with keys before block ``b + 1`` are final: emit them sorted
    by (key, order) and carry the rest.  The carry holds only events of still-running
    sessions and delayed copies, so memory stays bounded.  The next block is drawn in a
    background thread while this one is formatted (numpy and Arrow release the GIL).
    """
    remaining = params.events
    carry: Columns = {name: np.empty(0, dtype=np.int64) for name in _COLUMNS}
    block = 0
    with ThreadPoolExecutor(1, "synthetic") as prefetch:
        upcoming = prefetch.submit(_block, params, 0)
        while remaining > 0:
            fresh = upcoming.result()
            block += 1
            upcoming = prefetch.submit(_block, params, block)
            carry, out = _emit(carry, fresh, block * params.block_ms)
            order = np.lexsort((out["order"], out["key"]))[:remaining]
            remaining -= order.shape[0]
            if order.shape[0]:
                yield {name: col[order] for name, col in out.items()}


def _emit(carry: Columns, fresh: Columns, cutoff: int) -> tuple[Columns, Columns]:
    """Split pending events into (still carried, ready) at arrival key ``cutoff``."""
    ready_carry = carry["key"] < cutoff
    ready_fresh = fresh["key"] < cutoff
    ready = {
        name: np.concatenate([carry[name][ready_carry], fresh[name][ready_fresh]])
        for name in _COLUMNS
    }
    kept = {
        name: np.concatenate([carry[name][~ready_carry], fresh[name][~ready_fresh]])
        for name in _COLUMNS
    }
    return kept, ready


# --------------------------------------------------------------------------------------------
# Formatting


def _lines(params: StreamParams, cols: Columns) -> pa.Array:
    """NDJSON lines (each ending in ``\n``) of a block of events, as an Arrow binary array.

    A line is a fixed-width head (event_id, user_id, ts), a body from the catalogue and a
    tail from :func:`_tails`, so the only per-byte work is two row-wise joins.
    """
    n = cols["ts"].shape[0]
    head = np.empty((n, 81), dtype=np.uint8)
    at = _literal(head, 0, b'{"event_id":"')
    head[:, at : at + 16] = _hex16(cols["eid"])
    at = _literal(head, at + 16, b'","user_id":')
    head[:, at : at + 8] = _digits(cols["user"], 8)
    at = _literal(head, at + 8, b',"ts":"')
    head[:, at : at + 24] = _rfc3339_ms(cols["ts"] + EPOCH_MS)
    _literal(head, at + 24, b'"')
    prefix = _binary_array(head)
    int_ts = (cols["meta"] & _INT_TS_BIT) != 0
    if int_ts.any():
        alt = head[int_ts, :68]
        at = _literal(alt, 49, b',"ts":')
        alt[:, at:] = _digits(cols["ts"][int_ts] + EPOCH_MS, 13)
        prefix = pc.replace_with_mask(prefix, pa.array(int_ts), _binary_array(alt))
    body = _catalogue(params.products).body.take(pa.array(cols["body"]))
    tail = _tails().take(pa.array(cols["meta"] & ((1 << _TAIL_BITS) - 1)))
    lines = _join(prefix, body, tail)
    draws = cols["meta"] >> _CORRUPT_SHIFT
    corrupt = np.flatnonzero(draws)
    if corrupt.shape[0]:
        valid_lines = lines.take(pa.array(corrupt)).to_pylist()
        bad = [
            corrupt_line(line[:-1], int(h)) + b"\n"
            for line, h in zip(valid_lines, draws[corrupt], strict=True)
        ]
        lines = pc.replace_with_mask(lines, pa.array(draws != 0), pa.array(bad, pa.binary()))
    return lines


def _data(lines: pa.Array) -> memoryview:
    """The concatenated values of a binary array (its data buffer between first and last
    offset), without copying."""
    if len(lines) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    first, last = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    return memoryview(lines.buffers()[2])[first:last]


def _typed(params: StreamParams, cols: Columns) -> pa.RecordBatch:
    """The valid events of an emitted block as Arrow columns of the SPEC §1 fields."""
    keep = (cols["meta"] >> _CORRUPT_SHIFT) == 0
    c = {name: col[keep] for name, col in cols.items()}
    catalogue = _catalogue(params.products)
    etype = np.searchsorted(catalogue.body_base, c["body"], side="right") - 1
    offset = c["body"] - catalogue.body_base[etype]
    has_product = np.isin(etype, _PRODUCT_TYPES)
    product = np.where(has_product, offset, 0)
    product_id = PRODUCT_ID_BASE + product
    qty, country, device, referrer, _ = np.unravel_index(
        c["meta"] & ((1 << _TAIL_BITS) - 1), _TAIL_SHAPE
    )
    fixed_pages = (*PAGES, "/search", "/cart", "/checkout", "/checkout/complete")
    page_code = np.select(
        [etype == _PV, etype == _SEARCH, etype == _RFC, etype == _CHECKOUT, etype == _PURCHASE],
        [offset, len(PAGES), len(PAGES) + 1, len(PAGES) + 2, len(PAGES) + 3],
        -1,
    )
    product_page = pc.binary_join_element_wise(
        "/product/", pa.array(product_id).cast(pa.string()), ""
    )
    page = pc.if_else(
        pa.array(page_code >= 0),
        pa.array(fixed_pages).take(pa.array(np.maximum(page_code, 0))),
        product_page,
    )
    has_price = np.isin(etype, (_PRODV, _ATC, _PURCHASE))

    def lookup(values: tuple[str, ...], code: np.ndarray) -> pa.Array:
        return pa.array((None, *values), pa.string()).take(pa.array(code))

    arrays = [
        _binary_array(_hex16(c["eid"]), pa.string()),
        pa.array(c["user"], pa.int64()),
        pa.array(c["ts"] + EPOCH_MS, pa.int64()).cast(schema.TS),
        pa.array(schema.EVENT_TYPES).take(pa.array(etype)),
        page,
        pa.array(product_id, pa.int64(), mask=~has_product),
        pa.array(CATEGORIES).take(pa.array(catalogue.category[product], mask=~has_product)),
        pa.array(catalogue.price_cents[product] / 100.0, pa.float64(), mask=~has_price),
        pa.array(np.maximum(qty, 1), pa.int32()),
        lookup(COUNTRIES, country),
        pa.array(schema.DEVICES).take(pa.array(device)),
        lookup(REFERRERS, referrer),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(schema.EVENT_FIELDS))


# --------------------------------------------------------------------------------------------
# Invalid records


def _sub(pattern: bytes, repl: bytes, line: bytes) -> bytes | None:
    out, count = re.subn(pattern, repl, line, count=1)
    return out if count else None


def _truncated(line: bytes, h: int) -> bytes | None:
    return line[: len(line) - 1 - h % 12]


def _not_object(line: bytes, h: int) -> bytes | None:
    return b"[" + line + b"]" if h % 2 else b"null"


def _bad_ts(line: bytes, h: int) -> bytes | None:
    bad = (
        b'"2026-13-45T25:61:00Z"',
        b'"2026-11-25 12:00:00"',
        b'"2026-02-29T00:00:00Z"',
        b'"yesterday"',
        b"-5",
        b'"2026-11-25T12:00:00.1234Z"',
    )
    return _sub(rb'"ts":("[^"]*"|\d+)', b'"ts":' + bad[h % len(bad)], line)


def _negative_price(line: bytes, h: int) -> bytes | None:
    return _sub(rb'"price":', b'"price":-', line) or _sub(rb'"user_id":', b'"user_id":-', line)


def _nan_price(line: bytes, h: int) -> bytes | None:
    literal = (b"NaN", b"Infinity", b"-Infinity")[h % 3]
    return _sub(rb'"price":[0-9.]+', b'"price":' + literal, line) or line[:-1] + (
        b',"price":' + literal + b"}"
    )


CORRUPTIONS: tuple[tuple[str, Callable[[bytes, int], bytes | None]], ...] = (
    ("truncated JSON", _truncated),
    ("missing user_id", lambda line, h: _sub(rb'"user_id":\d+,', b"", line)),
    ("user_id as string", lambda line, h: _sub(rb'"user_id":(\d+)', rb'"user_id":"\1"', line)),
    ("user_id as float", lambda line, h: _sub(rb'"user_id":(\d+)', rb'"user_id":\1.0', line)),
    (
        "unknown event_type",
        lambda line, h: _sub(rb'"event_type":"\w+"', b'"event_type":"click"', line),
    ),
    ("bad ts", _bad_ts),
    ("negative price", _negative_price),
    ("invalid UTF-8", lambda line, h: _sub(rb'"event_id":"', b'"event_id":"\xc3\x28', line)),
    ("NaN or Infinity", _nan_price),
    ("duplicate key", lambda line, h: line[:-1] + b',"event_type":"page_view"}'),
    ("not an object", _not_object),
    (
        "event_id too long",
        lambda line, h: _sub(rb'"event_id":"', b'"event_id":"' + b"x" * 49, line),
    ),
    (
        "missing product_id",
        lambda line, h: (
            _sub(rb',"product_id":\d+', b"", line) or _sub(rb',"ts":("[^"]*"|\d+)', b"", line)
        ),
    ),
)
"""The kinds of invalid records the stream contains, each a function of a valid line."""


def corrupt_line(line: bytes, h: int) -> bytes:
    """Turn a valid line (without newline) into an invalid record of kind ``h % kinds``."""
    _, corrupt = CORRUPTIONS[h % len(CORRUPTIONS)]
    out = corrupt(line, h // len(CORRUPTIONS))
    return out if out is not None else line[:-1]


# --------------------------------------------------------------------------------------------
# Public API


def generate_ndjson_chunks(events: int, seed: int, chunk_events: int = 65536) -> Iterator[bytes]:
    """The synthetic clickstream as NDJSON, ``chunk_events`` lines per chunk, in arrival order.

    The concatenation of the chunks depends only on ``(events, seed)``.
    """
    if not isinstance(chunk_events, int) or isinstance(chunk_events, bool) or chunk_events < 1:
        raise ConfigError("chunk_events", f"must be a positive integer, got {chunk_events!r}")
    params = StreamParams.of(events, seed)
    pending: list[memoryview] = []
    count = 0
    for cols in _arrivals(params):
        lines = _lines(params, cols)
        at = 0
        while at < len(lines):
            take = min(chunk_events - count, len(lines) - at)
            pending.append(_data(lines.slice(at, take)))
            count += take
            at += take
            if count == chunk_events:
                yield b"".join(pending)
                pending, count = [], 0
    if count:
        yield b"".join(pending)


def generate_arrow(events: int, seed: int) -> Iterator[pa.RecordBatch]:
    """The valid events of the same stream (the NDJSON minus its invalid records), typed.

    Batches have the SPEC §1 columns (``schema.EVENT_FIELDS``), in arrival order; this is
    what ``gpu-pipeline generate --out x.parquet`` writes.
    """
    params = StreamParams.of(events, seed)
    for cols in _arrivals(params):
        batch = _typed(params, cols)
        if batch.num_rows:
            yield batch


def write_ndjson(
    path: str | Path,
    events: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the stream to ``path`` (gzip-compressed when it ends in ``.gz``).

    ``progress`` is called with the number of events written so far after every chunk.
    Returns the number of lines written.
    """
    target = Path(path)
    chunks = generate_ndjson_chunks(events, seed)
    written = 0
    opener = gzip.open if target.suffix == ".gz" else open
    with opener(target, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            written += chunk.count(b"\n")
            if progress is not None:
                progress(written)
    return written


def write_ndjson_partitions(
    directory: str | Path,
    partitions: int,
    events: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write the stream as ``partitions`` NDJSON files ``part-00000.ndjson``, ... in
    ``directory``, a record going to the file of its ``user_id`` (crc32 of the decimal id,
    modulo the count; records without one go to file 0), as a keyed Kafka topic would hold
    it: a ``file:DIRECTORY`` job then has one partition per file."""
    import zlib

    from gpu_pipeline.sources.kafka_producer import user_key

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i:05d}.ndjson" for i in range(partitions)]
    written = 0
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(path, "wb")) for path in paths]
        for chunk in generate_ndjson_chunks(events, seed):
            parts: list[list[bytes]] = [[] for _ in range(partitions)]
            for line in chunk.splitlines():
                key = user_key(line)
                parts[zlib.crc32(key) % partitions if key is not None else 0].append(line)
            for out, lines in zip(outs, parts, strict=True):
                if lines:
                    out.write(b"\n".join(lines) + b"\n")
            written += chunk.count(b"\n")
            if progress is not None:
                progress(written)
    return paths


class SyntheticSource(Source):
    """The synthetic stream as a one-partition source: record ``i`` is line ``i`` at offset ``i``.

    Resuming regenerates the stream and skips to the start offset, which is exact because
    the stream is deterministic.
    """

    def __init__(self, events: int, seed: int) -> None:
        StreamParams.of(events, seed)
        self.events = events
        self.seed = seed
        self.name = f"synthetic:events={events},seed={seed}"

    def batches(self, max_records: int, start: dict[int, int]) -> Iterator[RawBatch]:
        if not isinstance(max_records, int) or max_records < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {max_records!r}")
        first = int(start.get(0, 0))
        offset = 0
        for chunk in generate_ndjson_chunks(self.events, self.seed, max_records):
            ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            count = ends.shape[0]
            if offset + count <= first:
                offset += count
                continue
            skip = max(0, first - offset)
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)[skip:]
            base = int(starts[0])
            yield RawBatch(
                partition=0,
                buffer=chunk[base:],
                starts=starts - base,
                ends=ends[skip:].astype(np.int64) - base,
                offsets=np.arange(offset + skip, offset + count, dtype=np.int64),
                seqs=np.zeros(count - skip, dtype=np.int32),
                source=self.name,
                next_offset=offset + count,
            )
            offset += count

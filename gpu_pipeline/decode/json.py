"""The CPU NDJSON decoder: Arrow's JSON reader for the common case, Python for the rest.

Fast path.  Records are cut into independent chunks of about ``chunk_bytes`` at record
boundaries and parsed in a thread pool (Arrow releases the GIL).  Within a chunk, every
record that Arrow could read differently from the contract is first set aside for the
slow path and blanked to ``{}`` in the parse buffer (so that row ``i`` of Arrow's output
stays record ``i``): records that are empty or do not start with ``{``, contain a line
break, or are not valid UTF-8.  Records with an integer ``ts`` are parsed separately with
an integer schema.  Arrow's own errors (duplicate keys, type changes, syntax) name the
row: that record is set aside and parsing resumes; errors without a row are narrowed down
by the token they name, else bisected.  Unknown fields are *inferred*, not ignored, so
that Arrow also reports duplicate unknown keys, and so that NaN/Infinity literals and
deep nesting (which Arrow accepts) can be found in them after parsing.  The parsed
columns are then checked with vectorised rules equal to :mod:`gpu_pipeline.decode.validate`
(:func:`check_columns`).

Slow path.  Every record the fast path set aside, and every parsed row that fails a
columnar rule, is validated by :func:`gpu_pipeline.decode.validate.validate_record`, which
therefore decides every dead letter and its message.  The result never depends on how
records were chunked: each record's verdict is the validator's.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from gpu_pipeline import schema
from gpu_pipeline.decode.base import Decoder, DecodeResult, assemble
from gpu_pipeline.decode.validate import (
    FIELD_ORDER,
    MAX_NESTING,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    Rejected,
    rows_to_table,
    validate_record,
)
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.sources.base import RawBatch

_PARSE_TYPES: dict[str, pa.DataType] = {
    "event_id": pa.string(),
    "user_id": pa.int64(),
    "ts": pa.string(),
    "event_type": pa.string(),
    "page": pa.string(),
    "product_id": pa.int64(),
    "category": pa.string(),
    "price": pa.float64(),
    "quantity": pa.int64(),
    "country": pa.string(),
    "device": pa.string(),
    "referrer": pa.string(),
}
_STRING_TS = pa.schema(list(_PARSE_TYPES.items()))
_INT_TS = pa.schema([(k, pa.int64() if k == "ts" else t) for k, t in _PARSE_TYPES.items()])


def parse_schema(*, int_ts: bool) -> pa.Schema:
    """The explicit schema the fast path gives Arrow (``ts`` as string, or as int64)."""
    return _INT_TS if int_ts else _STRING_TS


_ROW_RE = re.compile(r"in row (\d+)")
_TOKEN_RE = re.compile(r"couldn't parse:(.+)$", re.DOTALL)
_MAX_SUSPECTS = 8
_BLOCK_BYTES = 1 << 17
"""Arrow block size: an error costs at most one block of parsing."""
_NEWLINE, _RETURN, _OPEN_BRACE, _OPEN_BRACKET = 10, 13, ord("{"), ord("[")


@dataclass
class _Chunk:
    """What one chunk of records decoded to (record indices are batch-global)."""

    index: list[np.ndarray] = field(default_factory=list)
    tables: list[pa.Table] = field(default_factory=list)
    slow: list[int] = field(default_factory=list)
    """Records for the slow path."""


class ArrowJsonDecoder(Decoder):
    """The CPU engine's NDJSON decoder (see the module docstring).

    Parameters
    ----------
    threads
        Worker threads parsing chunks in parallel (the machine's cores are a good value).
    chunk_bytes
        Target bytes per independently parsed chunk; 1-4 MB keeps Arrow efficient while
        giving every thread work.
    """

    def __init__(self, threads: int = 2, chunk_bytes: int = 2 << 20) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError("decode_threads", f"must be a positive integer, got {threads!r}")
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
            raise ConfigError(
                "decode_chunk_bytes", f"must be a positive integer, got {chunk_bytes!r}"
            )
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self._pool = ThreadPoolExecutor(threads, "decode") if threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def decode_records(self, raw: RawBatch) -> DecodeResult:
        starts = np.asarray(raw.starts, dtype=np.int64)
        ends = np.asarray(raw.ends, dtype=np.int64)
        bounds = list(_chunk_bounds(ends - starts, self.chunk_bytes))
        work = [(raw, starts, ends, lo, hi) for lo, hi in bounds]
        chunks = (
            list(self._pool.map(_decode_chunk_args, work))
            if self._pool is not None and len(work) > 1
            else [_decode_chunk_args(w) for w in work]
        )
        index_parts = [i for c in chunks for i in c.index]
        tables = [t for c in chunks for t in c.tables]
        slow = sorted(i for c in chunks for i in c.slow)
        slow_index, slow_rows, dead_index, dead_errors = [], [], [], []
        for i in slow:
            verdict = validate_record(raw.record(i))
            if isinstance(verdict, Rejected):
                dead_index.append(i)
                dead_errors.append(verdict.error)
            else:
                slow_index.append(i)
                slow_rows.append(verdict)
        if slow_rows:
            tables.append(rows_to_table(slow_rows))
            index_parts.append(np.asarray(slow_index, dtype=np.int64))
        good = pa.concat_tables(tables) if tables else pa.schema(schema.EVENT_FIELDS).empty_table()
        good_index = np.concatenate(index_parts) if index_parts else np.empty(0, np.int64)
        return assemble(raw, good_index, good, np.asarray(dead_index, dtype=np.int64), dead_errors)


def _chunk_bounds(lengths: np.ndarray, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Record ranges of about ``chunk_bytes`` bytes each."""
    n = lengths.shape[0]
    total = np.cumsum(lengths + 1)
    cuts = np.searchsorted(total, np.arange(chunk_bytes, int(total[-1]), chunk_bytes))
    edges = np.unique(np.concatenate([[0], cuts + 1, [n]]).clip(0, n))
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            yield int(lo), int(hi)


def _decode_chunk_args(args: tuple[RawBatch, np.ndarray, np.ndarray, int, int]) -> _Chunk:
    return _decode_chunk(*args)


def _decode_chunk(raw: RawBatch, starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> _Chunk:
    """Decode records ``lo:hi``: parse what Arrow can, set the rest aside for Python."""
    buf, rel_s, rel_e = _parse_buffer(raw.buffer, starts[lo:hi], ends[lo:hi])
    arr = np.frombuffer(buf, dtype=np.uint8)
    slow = _screen(buf, arr, rel_s, rel_e)
    int_ts = _int_ts_records(arr, rel_s) & ~slow
    int_rows = np.flatnonzero(int_ts)
    int_buf = bytearray(b"\n".join(bytes(buf[rel_s[j] : rel_e[j]]) for j in int_rows))
    aside = slow | int_ts
    _blank(arr, rel_s, rel_e, aside)

    out = _Chunk()
    short = np.flatnonzero(rel_e - rel_s < 2)
    edges = [0, *(int(j) for j in short for j in (j, j + 1)), hi - lo]
    pieces: list[tuple[np.ndarray, pa.Table]] = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        pieces += _parse_runs(buf, rel_s, rel_e, a, b, _STRING_TS, aside)
    _check_extras(pieces, arr, rel_s, aside)
    _validate_into(pieces, aside, _STRING_TS, out, lo)
    aside &= ~int_ts
    if int_rows.shape[0]:
        int_arr = np.frombuffer(int_buf, dtype=np.uint8)
        i_s, i_e = _line_bounds(int_arr, int_rows.shape[0])
        int_aside = np.zeros(int_rows.shape[0], dtype=bool)
        int_pieces = _parse_runs(int_buf, i_s, i_e, 0, int_rows.shape[0], _INT_TS, int_aside)
        _check_extras(int_pieces, int_arr, i_s, int_aside)
        _validate_into(int_pieces, int_aside, _INT_TS, out, lo, int_rows)
        aside[int_rows[int_aside]] = True
    out.slow = [lo + int(j) for j in np.flatnonzero(aside)]
    return out


def _parse_buffer(
    buffer: bytes, starts: np.ndarray, ends: np.ndarray
) -> tuple[bytearray, np.ndarray, np.ndarray]:
    """A private copy of the records, one per line, and their bounds in it."""
    base = int(starts[0])
    adjacent = bool(np.all(starts[1:] == ends[:-1] + 1))
    if adjacent and ends.shape[0] > 1:
        seps = np.frombuffer(buffer, dtype=np.uint8)[ends[:-1]]
        adjacent = bool(np.all(seps == _NEWLINE))
    if adjacent:
        return bytearray(buffer[base : int(ends[-1])]), starts - base, ends - base
    records = [buffer[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    lengths = ends - starts
    rel_s = np.concatenate([[0], np.cumsum(lengths[:-1] + 1)]).astype(np.int64)
    return bytearray(b"\n".join(records)), rel_s, rel_s + lengths


def _line_bounds(arr: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the ``count`` newline-separated lines of a joined buffer."""
    newlines = np.flatnonzero(arr == _NEWLINE)
    rel_e = np.concatenate([newlines, [arr.shape[0]]])[:count].astype(np.int64)
    rel_s = np.concatenate([[0], newlines + 1])[:count].astype(np.int64)
    return rel_s, rel_e


def _record_of(rel_s: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(rel_s, positions, side="right") - 1


def _screen(buf: bytearray, arr: np.ndarray, rel_s: np.ndarray, rel_e: np.ndarray) -> np.ndarray:
    """Records Arrow must not see (True = slow path): empty or not starting with ``{``
    (Arrow skips blank lines and reads a bare ``null`` as a row), containing a line break
    (Arrow would split them) or not valid UTF-8 (Arrow does not check)."""
    n = rel_s.shape[0]
    lengths = rel_e - rel_s
    first = arr[np.minimum(rel_s, max(arr.shape[0] - 1, 0))] if arr.shape[0] else rel_s * 0
    slow = (lengths < 2) | (first != _OPEN_BRACE)
    if buf.count(b"\n") != n - 1 or buf.find(b"\r") != -1:
        breaks = np.flatnonzero((arr == _NEWLINE) | (arr == _RETURN))
        rec = _record_of(rel_s, breaks)
        slow[rec[breaks < rel_e[rec]]] = True
    cursor = 0
    view = memoryview(buf)
    while True:
        try:
            str(view[cursor:], "utf-8")
            break
        except UnicodeDecodeError as exc:
            bad = int(_record_of(rel_s, np.array([cursor + exc.start]))[0])
            slow[bad] = True
            cursor = int(rel_e[bad])
    return slow


def _int_ts_records(arr: np.ndarray, rel_s: np.ndarray) -> np.ndarray:
    """Records whose ``"ts":`` is followed (after spaces) by a digit or minus sign.

    Found from the colons of the buffer with a few gathers: ``re`` is several times slower.
    A spelling this misses (``"ts" :``, an escaped key) makes Arrow fail on that record,
    which then takes the slow path; a record this flags wrongly fails in the integer parse.
    """
    colons = np.flatnonzero(arr == ord(":"))
    colons = colons[colons >= 4]
    if colons.shape[0] == 0:
        return np.zeros(rel_s.shape[0], dtype=bool)
    key = (
        (arr[colons - 1] == ord('"'))
        & (arr[colons - 2] == ord("s"))
        & (arr[colons - 3] == ord("t"))
        & (arr[colons - 4] == ord('"'))
    )
    colons = colons[key]
    limit = arr.shape[0] - 1
    after = arr[np.minimum(colons + 1, limit)]
    for step in range(2, 5):
        spaced = after == ord(" ")
        after = np.where(spaced, arr[np.minimum(colons + step, limit)], after)
    number = ((after >= ord("0")) & (after <= ord("9"))) | (after == ord("-"))
    flags = np.zeros(rel_s.shape[0], dtype=bool)
    flags[_record_of(rel_s, colons[number])] = True
    return flags


def _check_extras(
    pieces: list[tuple[np.ndarray, pa.Table]],
    arr: np.ndarray,
    rel_s: np.ndarray,
    aside: np.ndarray,
) -> None:
    """Unknown fields are parsed by Arrow, which accepts what JSON forbids: set aside the
    records whose extra fields hold NaN or Infinity, and, where an extra field nests close
    to :data:`MAX_NESTING`, every record with that many brackets.  Extra columns are only
    inspected here, never combined or output."""
    for records, table in pieces:
        extra = [name for name in table.column_names if name not in _PARSE_TYPES]
        if not extra:
            continue
        suspect = np.zeros(table.num_rows, dtype=bool)
        for name in extra:
            column = table.column(name)
            depth, floats = _type_shape(column.type)
            if depth >= MAX_NESTING - 1:
                _set_aside_deep(arr, rel_s, records, aside)
            if floats:
                suspect |= np.concatenate(
                    [_float_suspects(chunk) for chunk in column.chunks] or [np.zeros(0, bool)]
                )
        aside[records[suspect]] = True


def _type_shape(dtype: pa.DataType) -> tuple[int, bool]:
    """How deeply lists and structs nest in an Arrow type, and whether it holds floats
    (iterative: the type may be deep)."""
    deepest, floats = 0, False
    stack = [(dtype, 0)]
    while stack:
        current, depth = stack.pop()
        floats |= pa.types.is_floating(current)
        if pa.types.is_struct(current) or pa.types.is_list(current):
            deepest = max(deepest, depth + 1)
            if deepest >= MAX_NESTING:
                return deepest, True
            stack += [(current.field(i).type, depth + 1) for i in range(current.num_fields)]
    return deepest, floats


def _float_suspects(array: pa.Array) -> np.ndarray:
    """Rows of an extra column that may hold NaN or Infinity.  Arrow's JSON reader can build
    an invalid list array (a null item inside an inferred list); then every row with a value
    is suspect and the slow path decides."""
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return _nonfinite_rows(array)


def _nonfinite_rows(array: pa.Array) -> np.ndarray:
    """Rows holding a NaN or infinite float anywhere inside (structs and lists included)."""
    if pa.types.is_floating(array.type):
        finite = pc.fill_null(pc.is_finite(array), True)
        return ~np.asarray(finite.to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_struct(array.type):
        rows = np.zeros(len(array), dtype=bool)
        for i in range(array.type.num_fields):
            rows |= _nonfinite_rows(array.field(i))
        return rows
    if pa.types.is_list(array.type):
        inner = _nonfinite_rows(pc.list_flatten(array))
        rows = np.zeros(len(array), dtype=bool)
        parents = np.asarray(pc.list_parent_indices(array).to_numpy(), dtype=np.int64)
        rows[parents[inner]] = True
        return rows
    return np.zeros(len(array), dtype=bool)


def _set_aside_deep(
    arr: np.ndarray, rel_s: np.ndarray, records: np.ndarray, aside: np.ndarray
) -> None:
    """Set aside records with more than MAX_NESTING brackets (the slow path measures depth)."""
    opens = np.flatnonzero((arr == _OPEN_BRACE) | (arr == _OPEN_BRACKET))
    counts = np.bincount(_record_of(rel_s, opens), minlength=rel_s.shape[0])
    deep = np.zeros(rel_s.shape[0], dtype=bool)
    deep[records] = counts[records] > MAX_NESTING
    aside |= deep


def _blank(arr: np.ndarray, rel_s: np.ndarray, rel_e: np.ndarray, rows: np.ndarray) -> None:
    """Overwrite records (those of at least 2 bytes, by mask or index) with ``{}`` and
    spaces, so that Arrow yields an all-null row for each and row numbers stay record
    numbers."""
    idx = np.flatnonzero(rows) if rows.dtype == bool else rows
    idx = idx[rel_e[idx] - rel_s[idx] >= 2]
    if idx.shape[0] == 0:
        return
    lengths = rel_e[idx] - rel_s[idx]
    spans = np.repeat(rel_s[idx] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    arr[spans + np.arange(int(lengths.sum()))] = 32
    arr[rel_s[idx]] = _OPEN_BRACE
    arr[rel_s[idx] + 1] = ord("}")


def _parse_runs(
    buf: bytearray,
    rel_s: np.ndarray,
    rel_e: np.ndarray,
    a: int,
    b: int,
    parse_schema: pa.Schema,
    aside: np.ndarray,
) -> list[tuple[np.ndarray, pa.Table]]:
    """Parse records ``a:b`` with Arrow's streaming reader, setting aside (``aside[j] =
    True``) every record Arrow rejects.

    The reader yields one batch per block of :data:`_BLOCK_BYTES`, so an error only costs
    the block it happens in.  An error that names its row sets that record aside and blanks
    it, and reading restarts at the failing block (if that row is blank already, row
    numbers are off and the block is bisected instead).  A conversion error names only the
    offending token ("couldn't parse:1.0"): the few records containing it are set aside
    (the slow path decides them exactly) and blanked.  A later block with a new unknown
    field fails without a row; a fresh reader infers it.  What remains is bisected by
    :func:`_parse_exact`, which also takes over the whole run if the row count ever
    disagrees with the record count (a record holding two JSON values).
    """
    view = memoryview(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    pieces: list[tuple[np.ndarray, pa.Table]] = []
    pos = a
    while pos < b:
        batches, failed, row, token = _stream(
            view[int(rel_s[pos]) : int(rel_e[b - 1])], parse_schema
        )
        done = sum(batch.num_rows for batch in batches)
        if done:
            pieces.append((np.arange(pos, pos + done), pa.Table.from_batches(batches)))
        pos += done
        if not failed or pos >= b:
            break
        block_end = int(np.searchsorted(rel_s, rel_s[pos] + _BLOCK_BYTES, side="right")) + 1
        q = min(b, max(block_end, pos + 1))
        if row is not None and pos + row < q and not aside[pos + row]:
            aside[pos + row] = True
            _blank(arr, rel_s, rel_e, np.array([pos + row]))
        elif row is not None:
            pieces += _parse_exact(buf, rel_s, rel_e, pos, q, parse_schema, aside)
            pos = q
        elif (suspects := _containing(buf, rel_s, rel_e, pos, q, token)) is not None:
            aside[suspects] = True
            _blank(arr, rel_s, rel_e, suspects)
        elif not done:
            pieces += _parse_exact(buf, rel_s, rel_e, pos, q, parse_schema, aside)
            pos = q
    if pos != b or sum(t.num_rows for _, t in pieces) != b - a:
        return _parse_exact(buf, rel_s, rel_e, a, b, parse_schema, aside)
    return pieces


def _stream(
    data: memoryview, parse_schema: pa.Schema
) -> tuple[list[pa.RecordBatch], bool, int | None, bytes | None]:
    """Read one buffer block by block: the batches read before any error, whether there
    was one, and what it names (a row of the failing block, or an unparsed token)."""
    batches: list[pa.RecordBatch] = []
    try:
        reader = pj.open_json(
            pa.BufferReader(pa.py_buffer(data)),
            read_options=pj.ReadOptions(use_threads=False, block_size=_BLOCK_BYTES),
            parse_options=pj.ParseOptions(
                explicit_schema=parse_schema, unexpected_field_behavior="infer"
            ),
        )
        for batch in reader:
            batches.append(batch)
    except pa.ArrowException as exc:
        return batches, True, *_error_position(str(exc))
    return batches, False, None, None


def _error_position(message: str) -> tuple[int | None, bytes | None]:
    row = _ROW_RE.search(message)
    token = _TOKEN_RE.search(message)
    return (
        int(row.group(1)) if row else None,
        token.group(1).encode("utf-8", "replace") if token else None,
    )


def _parse_exact(
    buf: bytearray,
    rel_s: np.ndarray,
    rel_e: np.ndarray,
    a: int,
    b: int,
    parse_schema: pa.Schema,
    aside: np.ndarray,
) -> list[tuple[np.ndarray, pa.Table]]:
    """Parse records ``a:b`` in one block per call, checking row counts; bisect whatever
    fails without naming a row, down to single records set aside."""
    view = memoryview(buf)
    pieces: list[tuple[np.ndarray, pa.Table]] = []
    pending = [(a, b)]
    while pending:
        lo, hi = pending.pop()
        if lo >= hi:
            continue
        table, row, token = _read(view[int(rel_s[lo]) : int(rel_e[hi - 1])], parse_schema)
        if table is not None and table.num_rows == hi - lo:
            pieces.append((np.arange(lo, hi), table))
        elif row is not None and 0 <= row < hi - lo:
            aside[lo + row] = True
            pending += [(lo + row + 1, hi), (lo, lo + row)]
        elif hi - lo == 1:
            aside[lo] = True
        elif (suspects := _containing(buf, rel_s, rel_e, lo, hi, token)) is not None:
            aside[suspects] = True
            _blank(np.frombuffer(buf, dtype=np.uint8), rel_s, rel_e, suspects)
            pending.append((lo, hi))
        else:
            mid = (lo + hi) // 2
            pending += [(mid, hi), (lo, mid)]
    return pieces


def _containing(
    buf: bytearray, rel_s: np.ndarray, rel_e: np.ndarray, lo: int, hi: int, token: bytes | None
) -> np.ndarray | None:
    """The records of ``lo:hi`` that contain ``token``, if there are a few (else None)."""
    if not token:
        return None
    found: list[int] = []
    at = buf.find(token, int(rel_s[lo]), int(rel_e[hi - 1]))
    while at != -1 and len(found) <= _MAX_SUSPECTS:
        rec = int(_record_of(rel_s, np.array([at]))[0])
        found.append(rec)
        at = buf.find(token, int(rel_e[rec]), int(rel_e[hi - 1]))
    if not found or len(found) > _MAX_SUSPECTS:
        return None
    return np.asarray(found, dtype=np.int64)


def _read(
    data: memoryview, parse_schema: pa.Schema
) -> tuple[pa.Table | None, int | None, bytes | None]:
    """Arrow's parse of one buffer as a single block, or what its error names."""
    options = pj.ReadOptions(use_threads=False, block_size=max(len(data) + 64, 1 << 16))
    parse = pj.ParseOptions(explicit_schema=parse_schema, unexpected_field_behavior="infer")
    try:
        return pj.read_json(pa.BufferReader(pa.py_buffer(data)), options, parse), None, None
    except pa.ArrowException as exc:
        return None, *_error_position(str(exc))


def _validate_into(
    pieces: list[tuple[np.ndarray, pa.Table]],
    aside: np.ndarray,
    parse_schema: pa.Schema,
    out: _Chunk,
    offset: int,
    numbers: np.ndarray | None = None,
) -> None:
    """Check the parsed rows of a chunk at once: keep the valid ones, set rule failures
    aside for the slow path.  Rows of records already set aside (placeholders) are
    dropped.  ``numbers`` maps local record numbers to chunk record numbers."""
    if not pieces:
        return
    records = np.concatenate([r for r, _ in pieces])
    tables = [t.select(list(FIELD_ORDER)) for _, t in pieces]
    combined = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    columns = {name: combined.column(name).combine_chunks() for name in FIELD_ORDER}
    errors, ts_ms = check_columns(columns, int_ts=parse_schema is _INT_TS)
    keep = ~aside[records]
    good = keep & (errors < 0)
    aside[records[keep & (errors >= 0)]] = True
    if good.any():
        local = records[good]
        out.index.append(offset + (local if numbers is None else numbers[local]))
        out.tables.append(normalize(columns, ts_ms, good))


# --------------------------------------------------------------------------------------------
# Columnar rules (the vectorised twin of gpu_pipeline.decode.validate)


def _is_null(array: pa.Array) -> np.ndarray:
    return np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _ints(array: pa.Array, fill: int = 0) -> np.ndarray:
    return np.asarray(pc.fill_null(array, fill).to_numpy(), dtype=np.int64)


def _byte_lengths(array: pa.Array) -> np.ndarray:
    return _ints(pc.binary_length(array))


def _char_lengths(array: pa.Array, byte_lengths: np.ndarray, limit: int) -> np.ndarray:
    """Code-point lengths, computed only when some value has more bytes than ``limit``."""
    if not np.any(byte_lengths > limit):
        return byte_lengths
    return _ints(pc.utf8_length(array))


def _string_bytes(array: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` bytes of every value as an ``(n, width)`` matrix (0 past the end),
    and the byte lengths; a fixed-layout string rule is then a few numpy comparisons.

    When every value is exactly ``width`` bytes (the usual ``ts``), the matrix is a view of
    Arrow's data buffer.
    """
    n = len(array)
    lengths = _byte_lengths(array)
    buffers = array.buffers()
    if n == 0 or buffers[2] is None or buffers[2].size == 0:
        return np.zeros((n, width), dtype=np.uint8), lengths
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[array.offset : array.offset + n + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8)
    first = int(offsets[0])
    if int(offsets[-1]) - first == n * width and np.all(lengths == width):
        return data[first : first + n * width].reshape(n, width), lengths
    positions = np.minimum(offsets[:-1, None] + np.arange(width, dtype=np.int32), data.shape[0] - 1)
    out = data[positions]
    out *= np.arange(width)[None, :] < lengths[:, None]
    return out, lengths


_TS_DIGITS = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def _days_from_civil(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def parse_ts_strings(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``ts`` strings -> (ok, epoch ms): the ``TS_PATTERN`` shape, a real calendar date and
    time (seconds 00-59) and 1-3 fraction digits as milliseconds, checked byte-wise."""
    m, length = _string_bytes(array, 24)
    digit = (m >= 48) & (m <= 57)
    value = m.astype(np.int64) - 48
    ok = np.isin(length, (20, 22, 23, 24)) & ~_is_null(array)
    ok &= np.all(digit[:, _TS_DIGITS], axis=1)
    ok &= (m[:, 4] == ord("-")) & (m[:, 7] == ord("-")) & (m[:, 10] == ord("T"))
    ok &= (m[:, 13] == ord(":")) & (m[:, 16] == ord(":"))
    rows = np.arange(m.shape[0])
    ok &= m[rows, np.clip(length - 1, 0, 23)] == ord("Z")
    fraction = length > 20
    ok &= ~fraction | (m[:, 19] == ord("."))
    millis = np.zeros(m.shape[0], dtype=np.int64)
    for k, weight in ((20, 100), (21, 10), (22, 1)):
        present = length - 1 > k
        ok &= ~present | digit[:, k]
        millis += np.where(present, value[:, k], 0) * weight
    ok &= (length != 20) | (m[:, 19] == ord("Z"))

    def number(a: int, b: int) -> np.ndarray:
        out = np.zeros(m.shape[0], dtype=np.int64)
        for k in range(a, b):
            out = out * 10 + value[:, k]
        return out

    year, month, day = number(0, 4), number(5, 7), number(8, 10)
    hour, minute, second = number(11, 13), number(14, 16), number(17, 19)
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    month_ok = (month >= 1) & (month <= 12)
    dim = _DAYS_IN_MONTH[np.where(month_ok, month, 1)] + (leap & (month == 2))
    ok &= month_ok & (day >= 1) & (day <= dim) & (hour <= 23) & (minute <= 59) & (second <= 59)
    days = _days_from_civil(year, np.where(month_ok, month, 1), day)
    ms = days * 86_400_000 + hour * 3_600_000 + minute * 60_000 + second * 1000 + millis
    return ok, np.where(ok, ms, 0)


def check_columns(
    columns: dict[str, pa.Array],
    *,
    int_ts: bool,
    type_errors: dict[str, tuple[np.ndarray, str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The field rules, vectorised: per row the index in ``FIELD_ORDER`` of the first failing
    field (-1 = valid), and ``ts`` in epoch ms.

    ``columns`` holds Arrow's parse: strings for text fields and (unless ``int_ts``) ``ts``,
    int64 for integer fields and ``ts`` when ``int_ts``, float64 for ``price``.  JSON-level
    checks (types, syntax) are Arrow's; these are the value rules.  ``type_errors`` marks,
    per field, rows whose value had a type the field does not accept (typed sources).
    """
    c = columns
    bad: list[np.ndarray] = []
    id_bytes = _byte_lengths(c["event_id"])
    id_chars = _char_lengths(c["event_id"], id_bytes, schema.MAX_EVENT_ID_CHARS)
    bad.append(_is_null(c["event_id"]) | (id_chars < 1) | (id_chars > schema.MAX_EVENT_ID_CHARS))
    bad.append(_is_null(c["user_id"]) | (_ints(c["user_id"]) < 0))
    if int_ts:
        ts_ms = _ints(c["ts"])
        ts_ok = ~_is_null(c["ts"])
    else:
        ts_ok, ts_ms = parse_ts_strings(c["ts"])
    bad.append(~ts_ok | (ts_ms < 0) | (ts_ms > MAX_TS_MS))
    type_code = _ints(pc.index_in(c["event_type"], value_set=pa.array(schema.EVENT_TYPES)), -1)
    bad.append(type_code < 0)
    needs_product = np.isin(type_code, [schema.EVENT_TYPE_CODE[t] for t in schema.NEEDS_PRODUCT_ID])
    needs_price = np.isin(type_code, [schema.EVENT_TYPE_CODE[t] for t in schema.NEEDS_PRICE])
    bad.append(_too_long(c["page"]))
    product_null = _is_null(c["product_id"])
    bad.append((product_null & needs_product) | (_ints(c["product_id"]) < 0))
    bad.append(_too_long(c["category"]))
    price_null = _is_null(c["price"])
    price = np.asarray(pc.fill_null(c["price"], 0.0).to_numpy(), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        price_ok = np.isfinite(price) & (price >= 0) & (price <= schema.MAX_PRICE)
        quantity = _ints(c["quantity"], 1)
        line = price * quantity
    bad.append((price_null & needs_price) | (~price_null & ~price_ok))
    bad.append(
        (quantity < 1)
        | (quantity > schema.MAX_QUANTITY)
        | (~price_null & (line > schema.MAX_LINE_REVENUE))
    )
    country, country_len = _string_bytes(c["country"], 2)
    upper = (country >= ord("A")) & (country <= ord("Z"))
    bad.append(~_is_null(c["country"]) & ((country_len != 2) | ~np.all(upper, axis=1)))
    device_ok = pc.is_in(c["device"], value_set=pa.array(schema.DEVICES))
    device_ok = np.asarray(device_ok.to_numpy(zero_copy_only=False), dtype=bool)
    bad.append(~device_ok & ~_is_null(c["device"]))
    bad.append(_too_long(c["referrer"]))
    for name, (wrong, _) in (type_errors or {}).items():
        bad[FIELD_ORDER.index(name)] |= wrong
    errors = np.full(len(c["event_id"]), -1, dtype=np.int8)
    for code in range(len(bad) - 1, -1, -1):
        errors[bad[code]] = code
    return errors, ts_ms


def _too_long(array: pa.Array) -> np.ndarray:
    lengths = _byte_lengths(array)
    return _char_lengths(array, lengths, MAX_TEXT_CHARS) > MAX_TEXT_CHARS


def normalize(columns: dict[str, pa.Array], ts_ms: np.ndarray, keep: np.ndarray) -> pa.Table:
    """The kept rows as a table of the §1 columns (``schema.EVENT_FIELDS``)."""
    mask = pa.array(keep)
    arrays = []
    for f in schema.EVENT_FIELDS:
        if f.name == "ts":
            arrays.append(pa.array(ts_ms[keep], pa.int64()).cast(schema.TS))
        elif f.name == "quantity":
            arrays.append(pc.fill_null(columns["quantity"], 1).filter(mask).cast(pa.int32()))
        else:
            arrays.append(columns[f.name].filter(mask))
    return pa.Table.from_arrays(arrays, schema=pa.schema(schema.EVENT_FIELDS))

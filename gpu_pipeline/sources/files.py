"""``file:PATH`` sources: NDJSON (optionally gzip-compressed) and Parquet files.

A file is one partition: ``file:PATH`` names one file (partition 0), a directory or a glob
(the files in name order are partitions 0, 1, ...; see :func:`partition_files`).  For NDJSON
a record's offset is its 0-based line number; blank (whitespace-only) lines separate records
but are not records, and still count as lines, so offsets are the line numbers an editor
shows minus one.  A line ends at ``\\n``; one ``\\r`` before it belongs to the terminator
(CRLF files), not to the record.  Files are read in blocks of :data:`READ_BYTES`, so memory
stays bounded whatever the file size.

For Parquet a record's offset is its 0-based row number and batches are
:class:`gpu_pipeline.decode.base.TypedBatch` es carrying the typed rows; every decoder's
``decode`` accepts them.
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.parquet as pq

from gpu_pipeline.decode.base import TypedBatch
from gpu_pipeline.errors import ConfigError, SourceError
from gpu_pipeline.sources.base import RawBatch, Source

READ_BYTES = 8 << 20
"""Bytes read from the file at a time."""
NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")
_NEWLINE, _RETURN, _OPEN_BRACE = 10, 13, ord("{")
_BLANK = b" \t\r"


def partition_files(spec: str | Path) -> list[Path]:
    """The files of ``file:SPEC`` in partition order.

    SPEC is one file (partition 0), a directory (every NDJSON or Parquet file directly in
    it, sorted by name) or a glob such as ``data/*.ndjson.gz`` (the matches, sorted by
    path).  Partition ``i`` is the ``i``-th file of that order, so adding a file that sorts
    last adds a partition and leaves the others as they were.
    """
    text = str(spec).removeprefix("file:")
    path = Path(text)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise SourceError(f"file:{text}: no file matches; check the glob given to --source")
        return files
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _format_of(p) is not None)
        if not files:
            raise SourceError(
                f"file:{text}: the directory holds no .ndjson, .jsonl, .json (optionally .gz) "
                "or .parquet file"
            )
        return files
    return [path]


def _format_of(path: Path) -> tuple[str, bool] | None:
    """(format, gzip-compressed) from a file name, or None if it is not an input file."""
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    if compressed:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in NDJSON_SUFFIXES:
        return "ndjson", compressed
    if kind == ".parquet" and not compressed:
        return "parquet", False
    return None


class FileSource(Source):
    """A bounded source reading NDJSON or Parquet files, one partition per file.

    Parameters
    ----------
    path
        A file, a directory or a glob (see :func:`partition_files`), with or without the
        ``file:`` prefix of the ``--source`` option.  ``.ndjson``, ``.jsonl`` and ``.json``
        (each optionally ``.gz``) are NDJSON; ``.parquet`` is Parquet.
    partitions
        Read only these partitions (a worker of a cluster run reads the ones it is given);
        default: all, in partition order.
    """

    def __init__(self, path: str | Path, partitions: list[int] | None = None) -> None:
        text = str(path).removeprefix("file:")
        self.name = f"file:{Path(text)}"
        self.files = partition_files(text)
        self.readers = [_FileReader(f, i) for i, f in enumerate(self.files)]
        if partitions is None:
            self.selected = list(range(len(self.readers)))
        else:
            unknown = sorted(set(partitions) - set(range(len(self.readers))))
            if unknown:
                raise SourceError(
                    f"{self.name} has {len(self.readers)} partitions (files); no partition "
                    f"{unknown[0]}"
                )
            self.selected = sorted(set(partitions))

    @property
    def partition_count(self) -> int:
        """How many partitions (files) the source has."""
        return len(self.readers)

    def batches(self, max_records: int, start: dict[int, int]) -> Iterator[RawBatch]:
        """Each selected partition in turn, from ``start[partition]``."""
        if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {max_records!r}")
        for partition in self.selected:
            yield from self.readers[partition].batches(max_records, int(start.get(partition, 0)))


class _FileReader:
    """One file, read as one partition."""

    def __init__(self, path: Path, partition: int) -> None:
        self.path = path
        self.partition = partition
        self.name = f"file:{self.path}"
        known = _format_of(self.path)
        if known is None:
            raise ConfigError(
                "source",
                f"cannot tell the format of {str(path)!r}: use a .ndjson, .jsonl or .json file "
                "(optionally .gz) or a .parquet file",
            )
        self.format, self.compressed = known
        if not self.path.is_file():
            raise SourceError(f"{self.name}: no such file; check the path given to --source")

    def batches(self, max_records: int, first: int) -> Iterator[RawBatch]:
        if self.format == "parquet":
            yield from self._parquet_batches(max_records, first)
        else:
            yield from self._ndjson_batches(max_records, first)

    def _open(self) -> BinaryIO:
        try:
            if self.compressed:
                return gzip.open(self.path, "rb")  # type: ignore[return-value]
            return open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"{self.name}: cannot open ({exc.strerror})") from exc

    def _ndjson_batches(self, max_records: int, first_line: int) -> Iterator[RawBatch]:
        """Batches of exactly ``max_records`` records (the last may be shorter), counted from
        ``first_line`` whatever the read blocks: records left over at the end of a block
        are carried into the next batch."""
        pending = _Pending.empty()
        with self._open() as stream:
            try:
                for block, line_no in _line_blocks(stream):
                    pending = pending.extend(*_block_records(block, line_no, first_line))
                    while len(pending) >= max_records:
                        batch, pending = pending.split(max_records)
                        yield self._batch(batch)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise SourceError(f"{self.name}: read failed ({exc})") from exc
        if len(pending):
            batch, _ = pending.split(len(pending))
            yield self._batch(batch)

    def _batch(self, records: _Piece) -> RawBatch:
        return RawBatch(
            partition=self.partition,
            buffer=records.buffer,
            starts=records.starts,
            ends=records.ends,
            offsets=records.offsets,
            seqs=np.zeros(len(records), dtype=np.int32),
            source=self.name,
            next_offset=int(records.offsets[-1]) + 1,
        )

    def _parquet_batches(self, max_records: int, first_row: int) -> Iterator[RawBatch]:
        try:
            parquet = pq.ParquetFile(self.path)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.name}: not a readable Parquet file ({exc})") from exc
        with parquet:
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            group_ends = np.cumsum(sizes, dtype=np.int64)
            first_group = int(np.searchsorted(group_ends, first_row, side="right"))
            if first_group >= len(sizes):
                return
            groups = list(range(first_group, len(sizes)))
            row = int(group_ends[first_group - 1]) if first_group else 0
            for batch in parquet.iter_batches(batch_size=max_records, row_groups=groups):
                skip = min(max(first_row - row, 0), batch.num_rows)
                rows = batch.slice(skip)
                row += batch.num_rows
                if rows.num_rows == 0:
                    continue
                n = rows.num_rows
                yield TypedBatch(
                    partition=self.partition,
                    buffer=b"",
                    starts=np.zeros(n, dtype=np.int64),
                    ends=np.zeros(n, dtype=np.int64),
                    offsets=np.arange(row - n, row, dtype=np.int64),
                    seqs=np.zeros(n, dtype=np.int32),
                    source=self.name,
                    next_offset=row,
                    rows=rows,
                )


@dataclass(frozen=True)
class _Piece:
    """Consecutive records of one read block: their bytes and bounds relative to ``buffer``."""

    buffer: bytes
    starts: np.ndarray
    ends: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def head(self, count: int) -> _Piece:
        stop = int(self.ends[count - 1])
        return _Piece(
            self.buffer[:stop], self.starts[:count], self.ends[:count], self.offsets[:count]
        )

    def tail(self, count: int) -> _Piece:
        base = int(self.starts[count])
        return _Piece(
            self.buffer[base:],
            self.starts[count:] - base,
            self.ends[count:] - base,
            self.offsets[count:],
        )


@dataclass(frozen=True)
class _Pending:
    """Records read but not yet batched, as pieces of blocks (joined once, when batched)."""

    pieces: tuple[_Piece, ...] = ()

    @staticmethod
    def empty() -> _Pending:
        return _Pending()

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def extend(
        self, block: bytes, starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray
    ) -> _Pending:
        """These records followed by those of ``block``."""
        if not starts.shape[0]:
            return self
        base = int(starts[0])
        piece = _Piece(block[base:], starts - base, ends - base, offsets)
        return _Pending((*self.pieces, piece))

    def split(self, count: int) -> tuple[_Piece, _Pending]:
        """The first ``count`` records as one piece, and the rest."""
        taken: list[_Piece] = []
        rest = list(self.pieces)
        need = count
        while need:
            piece = rest.pop(0)
            if len(piece) > need:
                taken.append(piece.head(need))
                rest.insert(0, piece.tail(need))
                need = 0
            else:
                taken.append(piece)
                need -= len(piece)
        return _join(taken), _Pending(tuple(rest))


def _join(pieces: list[_Piece]) -> _Piece:
    if len(pieces) == 1:
        return pieces[0]
    shifts = np.cumsum([0] + [len(p.buffer) for p in pieces[:-1]], dtype=np.int64)
    return _Piece(
        b"".join(p.buffer for p in pieces),
        np.concatenate([p.starts + shift for p, shift in zip(pieces, shifts, strict=True)]),
        np.concatenate([p.ends + shift for p, shift in zip(pieces, shifts, strict=True)]),
        np.concatenate([p.offsets for p in pieces]),
    )


def _block_records(
    block: bytes, line_no: int, first_line: int
) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """The records of a block of whole lines starting at line ``line_no``, from ``first_line``:
    the block, and the start, end and offset (line number) of each non-blank line."""
    starts, ends = _lines(block)
    offsets = np.arange(line_no, line_no + starts.shape[0], dtype=np.int64)
    keep = (offsets >= first_line) & ~_blank_lines(block, starts, ends)
    return block, starts[keep], ends[keep], offsets[keep]


def _line_blocks(stream: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines (the last one may lack its ``\\n``) and their first line number."""
    line_no = 0
    tail = b""
    while True:
        data = stream.read(READ_BYTES)
        if not data:
            break
        block = tail + data
        cut = block.rfind(b"\n")
        if cut == -1:
            tail = block
            continue
        whole, tail = block[: cut + 1], block[cut + 1 :]
        yield whole, line_no
        line_no += whole.count(b"\n")
    if tail:
        yield tail, line_no


def _lines(block: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (without ``\\n`` or ``\\r\\n``) of every line of a block."""
    arr = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(arr == _NEWLINE)
    ends = newlines if block.endswith(b"\n") else np.append(newlines, len(block))
    starts = np.concatenate([[0], newlines + 1])[: ends.shape[0]].astype(np.int64)
    ends = ends.astype(np.int64)
    has_cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == _RETURN)
    return starts, ends - has_cr


def _blank_lines(block: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Empty or whitespace-only lines; only lines not starting with ``{`` are looked at."""
    arr = np.frombuffer(block, dtype=np.uint8)
    blank = ends == starts
    first = arr[np.minimum(starts, max(len(block) - 1, 0))] if len(block) else starts
    for j in np.flatnonzero(~blank & (first != _OPEN_BRACE)):
        blank[j] = not block[int(starts[j]) : int(ends[j])].strip(_BLANK)
    return blank

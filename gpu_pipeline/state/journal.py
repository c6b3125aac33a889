"""The batch journal: where each batch of a partition began and ended, durably, before its outputs.

Exactly-once across crashes (SPEC §2.7) needs a replay to cut *the same* batches, because
the sink's ``insert_deduplication_token`` names a batch by its offset range.  A file source
can recompute the cuts from the batch size; a Kafka source cannot, since its cuts depend on
what had arrived when a batch was due (wait time, bytes, rebalances).  So the source
writes every cut here, and fsyncs it, before the batch is handed on; after a crash the
pipeline resumes from its checkpoint and the source first replays exactly the journaled
cuts from there.

Layout: one append-only text file per partition, ``p<partition>.journal``, one line per
batch: ``<first> <next_offset> <crc32 of "first next">``.  A crash during an append can
leave a torn or garbled last line; it is ignored and cut off when the file is reopened
(it belongs to a batch that was never handed on, since the append had not returned).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.state.durable import fsync_directory

_LINE_RE = re.compile(rb"(\d+) (\d+) ([0-9a-f]{8})")


def _encode(first: int, next_offset: int) -> bytes:
    body = f"{first} {next_offset}".encode()
    return body + b" " + f"{zlib.crc32(body):08x}".encode() + b"\n"


def _decode(line: bytes) -> tuple[int, int] | None:
    """The entry of one complete line, or None when it is torn or garbled."""
    match = _LINE_RE.fullmatch(line)
    if match is None:
        return None
    body = match.group(1) + b" " + match.group(2)
    if f"{zlib.crc32(body):08x}".encode() != match.group(3):
        return None
    return int(match.group(1)), int(match.group(2))


class _PartitionLog:
    """The journal of one partition: its entries in memory and its append-only file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[tuple[int, int]] = []
        self._file = self._open()

    def _open(self) -> int:
        """Read the valid prefix of the file, cut off any torn tail, open it for appends."""
        valid_bytes = 0
        if self.path.exists():
            data = self.path.read_bytes()
            for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
                entry = _decode(line)
                if entry is None:
                    break  # garbage from a crash: nothing after it was acknowledged
                self.entries.append(entry)
                valid_bytes += len(line) + 1
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(fd).st_size != valid_bytes:
            os.ftruncate(fd, valid_bytes)
            os.fsync(fd)
        if created:
            os.fsync(fd)
            fsync_directory(self.path.parent)
        return fd

    def append(self, first: int, next_offset: int) -> None:
        line = _encode(first, next_offset)
        written = os.write(self._file, line)
        if written != len(line):
            raise CheckpointError(
                f"short write to the batch journal {self.path} ({written} of {len(line)} bytes); "
                "is the disk full?"
            )
        os.fsync(self._file)
        self.entries.append((first, next_offset))

    def rewrite(self, entries: list[tuple[int, int]]) -> None:
        """Replace the file atomically by one holding ``entries`` (a crash keeps old or new)."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as out:
            out.write(b"".join(_encode(first, nxt) for first, nxt in entries))
            out.flush()
            os.fsync(out.fileno())
        os.close(self._file)
        os.replace(temporary, self.path)
        fsync_directory(self.path.parent)
        self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.entries = list(entries)

    def close(self) -> None:
        os.close(self._file)


class BatchJournal:
    """Durable log of each batch's offset range per partition, so a replay after a crash cuts
    identical batches.

    Parameters
    ----------
    directory
        Where the journal files live; created if missing.  Keep it beside the job's
        checkpoints: the two together describe what was written.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create the batch journal directory {self.directory}: {exc}"
            ) from exc
        self._logs: dict[int, _PartitionLog] = {}

    def _log(self, partition: int) -> _PartitionLog:
        log = self._logs.get(partition)
        if log is None:
            if partition < 0:
                raise ValueError(f"partition must be >= 0, got {partition}")
            log = _PartitionLog(self.directory / f"p{partition}.journal")
            self._logs[partition] = log
        return log

    def record(self, partition: int, first: int, next_offset: int) -> None:
        """Append the batch ``[first, next_offset)`` and fsync, *before* its outputs are written.

        Raises
        ------
        ValueError
            When the range is empty or negative (a batch holds at least one offset).
        """
        if not 0 <= first < next_offset:
            raise ValueError(
                "a batch covers [first, next_offset) with 0 <= first < next_offset, "
                f"got [{first}, {next_offset})"
            )
        self._log(partition).append(first, next_offset)

    def planned(self, partition: int, from_offset: int) -> list[int]:
        """The ``next_offset`` s of the journaled batches that follow on from ``from_offset``.

        The cuts form a chain: the batch that starts at ``from_offset``, then the one that
        starts where it ended, and so on.  Where the journal holds two batches with the same
        start (a replay that was not told the old cut), the later one wins, since it is the
        one whose outputs were written last.
        """
        following: dict[int, int] = {}
        for first, nxt in self._log(partition).entries:
            if first >= from_offset:
                following[first] = nxt
        cuts: list[int] = []
        position = from_offset
        while position in following:
            position = following.pop(position)
            cuts.append(position)
        return cuts

    def truncate(self, partition: int, up_to: int) -> None:
        """Forget the batches with ``next_offset <= up_to`` (a checkpoint covers them now)."""
        log = self._log(partition)
        kept = [(first, nxt) for first, nxt in log.entries if nxt > up_to]
        if len(kept) != len(log.entries):
            log.rewrite(kept)

    def forget(self, partition: int) -> None:
        """Drop the cached log of a partition that moved to another consumer.

        Its file is re-read if the partition comes back, since the other consumer may
        have appended to or rewritten it meanwhile.
        """
        log = self._logs.pop(partition, None)
        if log is not None:
            log.close()

    def close(self) -> None:
        """Close the journal files (entries are durable already)."""
        for log in self._logs.values():
            log.close()
        self._logs.clear()

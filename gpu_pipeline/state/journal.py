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

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.state.store import AppendLog, StateStore, open_state_store

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

    def __init__(self, log: AppendLog, where: str) -> None:
        self.log = log
        self.where = where
        self.entries: list[tuple[int, int]] = []
        self._open()

    def _open(self) -> None:
        """Read the valid prefix of the file and cut off any torn tail."""
        data = self.log.read()
        valid_bytes = 0
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
            entry = _decode(line)
            if entry is None:
                break  # garbage from a crash: nothing after it was acknowledged
            self.entries.append(entry)
            valid_bytes += len(line) + 1
        if valid_bytes != len(data):
            self.log.replace(data[:valid_bytes])

    def append(self, first: int, next_offset: int) -> None:
        try:
            self.log.append(_encode(first, next_offset))
        except OSError as exc:
            raise CheckpointError(
                f"cannot append to the batch journal {self.where}: {exc}"
            ) from exc
        self.entries.append((first, next_offset))

    def rewrite(self, entries: list[tuple[int, int]]) -> None:
        """Replace the file atomically by one holding ``entries`` (a crash keeps old or new)."""
        self.log.replace(b"".join(_encode(first, nxt) for first, nxt in entries))
        self.entries = list(entries)

    def close(self) -> None:
        self.log.close()


class BatchJournal:
    """Durable log of each batch's offset range per partition, so a replay after a crash cuts
    identical batches.

    Parameters
    ----------
    location
        Where the journal files live (a directory or a :class:`StateStore`); created if
        missing.  Keep it beside the job's checkpoints: the two together describe what was
        written.
    """

    def __init__(self, location: str | os.PathLike[str] | StateStore) -> None:
        self.files = location if isinstance(location, StateStore) else open_state_store(location)
        self._logs: dict[int, _PartitionLog] = {}

    def _log(self, partition: int) -> _PartitionLog:
        log = self._logs.get(partition)
        if log is None:
            if partition < 0:
                raise ValueError(f"partition must be >= 0, got {partition}")
            name = f"p{partition}.journal"
            try:
                log = _PartitionLog(self.files.log(name), f"{self.files.location}/{name}")
            except OSError as exc:
                raise CheckpointError(
                    f"cannot open the batch journal {self.files.location}/{name}: {exc}"
                ) from exc
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

"""The source seam: where raw records come from, and how far a partition has been read.

A source yields :class:`RawBatch` es: the raw bytes of consecutive records of *one*
partition, in arrival order, with the source position of every record.  Decoding happens
later (``gpu_pipeline.decode``), so a source never parses JSON.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RawBatch:
    """Consecutive raw records of one partition.

    Record ``i`` is ``buffer[starts[i]:ends[i]]`` (without its line terminator); it sits at
    source position ``offsets[i]`` (Kafka offset, or 0-based line number of a file) and is the
    ``seqs[i]``-th event of that position (several NDJSON events can share one Kafka message).
    An empty record (``starts[i] == ends[i]``) is a real record, e.g. an empty Kafka message.

    ``next_offset`` is the position to resume from once this batch is durable.
    """

    partition: int
    buffer: bytes
    starts: np.ndarray
    ends: np.ndarray
    offsets: np.ndarray
    seqs: np.ndarray
    source: str
    next_offset: int
    idle_clock_ms: int | None = field(default=None, kw_only=True)
    """Set on an empty batch that reports an idle partition (the opt-in idle policy): the
    wall clock, in epoch ms, to which the partition's event time may advance."""
    timestamps: np.ndarray | None = field(default=None, kw_only=True)
    """The source's own time of each record in epoch ms (Kafka message timestamps), or None
    when the source has none (files); 0 marks a record without one."""

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def record(self, i: int) -> bytes:
        """The raw bytes of record ``i`` (slow; for errors and tests)."""
        return self.buffer[int(self.starts[i]) : int(self.ends[i])]

    @staticmethod
    def from_lines(
        partition: int,
        lines: list[bytes],
        *,
        first_offset: int = 0,
        source: str = "test",
    ) -> RawBatch:
        """A batch of one record per line with consecutive offsets (tests and small inputs)."""
        buffer = b"\n".join(lines) + (b"\n" if lines else b"")
        lengths = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
        starts = np.zeros(len(lines), dtype=np.int64)
        if len(lines) > 1:
            starts[1:] = np.cumsum(lengths[:-1] + 1)
        offsets = np.arange(first_offset, first_offset + len(lines), dtype=np.int64)
        return RawBatch(
            partition=partition,
            buffer=buffer,
            starts=starts,
            ends=starts + lengths,
            offsets=offsets,
            seqs=np.zeros(len(lines), dtype=np.int32),
            source=source,
            next_offset=first_offset + len(lines),
        )


class Source(ABC):
    """A bounded or unbounded supply of raw records, partition by partition."""

    name: str
    bounded: bool = True
    """Bounded sources end (and the run flushes); unbounded ones run until stopped."""

    @abstractmethod
    def batches(self, max_records: int, start: dict[int, int]) -> Iterator[RawBatch]:
        """Yield batches of at most ``max_records`` records, resuming each partition at
        ``start[partition]`` (its next unread position; absent = from the beginning).

        Bounded sources stop when exhausted; the caller then flushes (SPEC §2.8).
        """

    def commit(self, positions: dict[int, int]) -> None:  # noqa: B027 - optional hook
        """Called after a checkpoint made ``positions`` durable (Kafka commits offsets)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

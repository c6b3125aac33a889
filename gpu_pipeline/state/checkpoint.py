"""Durable checkpoints: each partition's operator state and read position, atomically.

Layout under the job's checkpoint directory (one folder per partition, so a partition can
move to another consumer of the group with its state)::

    p3/CURRENT                 -> name of partition 3's newest complete checkpoint
    p3/ckpt-000000042/manifest.json     position, counters
    p3/ckpt-000000042/<operator>.arrow  one Arrow IPC file per operator state
    p3/INTENT                  -> the position the next checkpoint of partition 3 writes up to,
                                  recorded before its rows are inserted
    p3/DONE                    -> a cluster run's partition 3 (a file) was read and flushed to
                                  its end
    p3/FLUSHED                 -> the position at which a bounded Kafka run flushed partition 3
                                  (its end of input then)
    p3/LEASE                   -> locked (flock) by the process that works on partition 3
    COMPLETE                   -> written when a bounded job has flushed everything
    JOB.json                   -> the job's identity (source, sink, database, semantics; no secrets)
    sinks/<key>                -> one marker per database the job has written to

A checkpoint folder is written completely (and, in a directory, fsynced) before ``CURRENT``
points at it, so a crash at any instant leaves either the old or the new checkpoint, never
half of one.  The files live in a :class:`~gpu_pipeline.state.store.StateStore`: a local or
shared directory, or an fsspec location such as ``s3://bucket/ckpt``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.state.store import LeaseHeld, StateStore, open_state_store

CURRENT = "CURRENT"
COMPLETE = "COMPLETE"
JOB = "JOB.json"
INTENT = "INTENT"
DONE = "DONE"
FLUSHED = "FLUSHED"
LEASE = "LEASE"
LEASE_WAIT_S = 120.0
"""How long a process waits for a partition another process still works on: longer than an
NFS server keeps a dead host's locks (90 s on Linux) and dask's lease on a dead worker's
lock (30 s)."""


@dataclass
class PartitionCheckpoint:
    """What a restart of one partition needs: where to read next, its state and counters."""

    position: int
    state: dict[str, pa.Table] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    batch_size: int = 0
    sequence: int = 0


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A partition checkpoint serialised to the files it is written as."""

    partition: int
    name: str
    files: dict[str, bytes]


class CheckpointStore:
    """Reads and writes the checkpoints of one job at one location."""

    def __init__(
        self,
        location: str | os.PathLike[str] | StateStore,
        job_id: str,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.files = location if isinstance(location, StateStore) else open_state_store(location)
        self.job_id = job_id
        self.identity = identity

    @property
    def location(self) -> str:
        """Where the job's checkpoints are, for messages."""
        return self.files.location

    def partitions(self) -> list[int]:
        """Partitions that have a checkpoint."""
        return self._partitions_with(CURRENT)

    def known_partitions(self) -> list[int]:
        """Partitions with a checkpoint or an intent (a first checkpoint under way)."""
        return self._partitions_with(CURRENT, INTENT)

    def _partitions_with(self, *markers: str) -> list[int]:
        """Partitions whose folder holds any of the files ``markers``."""
        found = []
        for name in self.files.names():
            if name[:1] == "p" and name[1:].isdigit():
                inside = set(self.files.names(name))
                if inside.intersection(markers):
                    found.append(int(name[1:]))
        return sorted(found)

    def _manifest(self, partition: int) -> tuple[str, dict[str, Any]] | None:
        """The folder and manifest of ``partition``'s current checkpoint, or None."""
        pointer = self.files.read(f"p{partition}/{CURRENT}")
        if pointer is None:
            return None
        current = f"p{partition}/{pointer.decode().strip()}"
        try:
            manifest = json.loads(self.files.read(f"{current}/manifest.json") or b"")
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.location}/{current} is unreadable ({exc}); restore it from a "
                "backup or rerun with --fresh (idempotent inserts make a rerun safe)"
            ) from exc
        return current, manifest

    def load(self, partition: int) -> PartitionCheckpoint | None:
        """The newest checkpoint of ``partition``, or None."""
        found = self._manifest(partition)
        if found is None:
            return None
        current, manifest = found
        where = f"{self.location}/{current}"
        try:
            if manifest["job_id"] != self.job_id:
                raise CheckpointError(
                    f"checkpoint {where} belongs to job {manifest['job_id']}"
                    f"{self._described(manifest['job_id'])}, not to this run's job {self.job_id}:"
                    " it was copied or moved here; use another --checkpoint-dir, or --fresh to "
                    "start this job over"
                )
            state = {
                name: _read_table(self.files.read(f"{current}/{name}.arrow"))
                for name in manifest["state"]
            }
        except (OSError, KeyError, pa.ArrowInvalid) as exc:
            raise CheckpointError(
                f"checkpoint {where} is unreadable ({exc}); restore it from a backup or rerun "
                "with --fresh (idempotent inserts make a rerun safe)"
            ) from exc
        return PartitionCheckpoint(
            position=int(manifest["position"]),
            state=state,
            counters={k: int(v) for k, v in manifest["counters"].items()},
            batch_size=int(manifest.get("batch_size", 0)),
            sequence=int(manifest["sequence"]),
        )

    def counters(self, partition: int) -> dict[str, int]:
        """The counters of ``partition``'s newest checkpoint (its manifest only; {} if none)."""
        found = self._manifest(partition)
        if found is None:
            return {}
        return {k: int(v) for k, v in found[1]["counters"].items()}

    def save(self, partition: int, checkpoint: PartitionCheckpoint) -> None:
        """Write ``checkpoint`` durably, then make it the partition's current one."""
        self.write_prepared(self.prepare(partition, checkpoint))

    def prepare(self, partition: int, checkpoint: PartitionCheckpoint) -> PreparedCheckpoint:
        """``checkpoint`` serialised now (its state may change afterwards), for
        :meth:`write_prepared`, possibly on another thread."""
        checkpoint.sequence += 1
        name = f"ckpt-{checkpoint.sequence:09d}"
        manifest = {
            "job_id": self.job_id,
            "partition": partition,
            "sequence": checkpoint.sequence,
            "position": checkpoint.position,
            "state": sorted(checkpoint.state),
            "counters": checkpoint.counters,
            "batch_size": checkpoint.batch_size,
        }
        files = {f"{op}.arrow": _table_bytes(table) for op, table in checkpoint.state.items()}
        files["manifest.json"] = json.dumps(manifest, indent=1).encode()
        return PreparedCheckpoint(partition, name, files)

    def write_prepared(self, prepared: PreparedCheckpoint) -> None:
        """Write a prepared checkpoint durably, then make it the partition's current one."""
        self.describe_job()
        folder, name = f"p{prepared.partition}", prepared.name
        self.files.write_folder(f"{folder}/{name}", prepared.files)
        self.files.write(f"{folder}/{CURRENT}", name.encode())
        for entry in self.files.names(folder):
            if entry.startswith(("ckpt-", ".ckpt-")) and entry != name:
                self.files.remove(f"{folder}/{entry}")

    def describe_job(self) -> None:
        """Write JOB.json once, so a person (and an error message) can tell whose this is."""
        if self.identity is not None and not self.files.exists(JOB):
            text = json.dumps({"job_id": self.job_id, **self.identity}, indent=1, default=str)
            self.files.write(JOB, text.encode())

    def recorded_identity(self) -> dict[str, Any] | None:
        """The identity in JOB.json, or None before the job's first checkpoint."""
        try:
            recorded = json.loads(self.files.read(JOB) or b"")
        except json.JSONDecodeError:
            return None
        return recorded if isinstance(recorded, dict) else None

    def _described(self, job_id: str) -> str:
        """`` (source …, sink …)`` from JOB.json when it names ``job_id``."""
        recorded = self.recorded_identity()
        if recorded is None or recorded.get("job_id") != job_id:
            return ""
        from gpu_pipeline.runtime.job import describe_identity

        return f" ({describe_identity(recorded)})"

    def claim_sink(self, key: str, description: str) -> None:
        """Remember (durably) that this job writes to the database named by ``key``."""
        if not self.files.exists(f"sinks/{key}"):
            self.files.write(f"sinks/{key}", description.encode())

    def claimed_sinks(self) -> set[str]:
        """Keys of every database this job has written to."""
        return set(self.files.names("sinks"))

    def write_intent(self, partition: int, position: int, flushed: bool) -> None:
        """Record, durably, that the next checkpoint of ``partition`` covers input up to
        ``position`` (and the end-of-input flush, if ``flushed``); written before that
        checkpoint's rows are inserted, so that a replay after a crash cuts its rows at the
        same place, and so sends the same blocks under the same insert tokens."""
        kind = "flush" if flushed else "batch"
        self.files.write(f"p{partition}/{INTENT}", f"{int(position)} {kind}".encode())

    def intent(self, partition: int) -> tuple[int, bool] | None:
        """The recorded intent of ``partition``: (position, flushed), or None."""
        try:
            position, kind = (self.files.read(f"p{partition}/{INTENT}") or b"").decode().split()
            return int(position), kind == "flush"
        except ValueError:
            return None

    def mark_partition_done(self, partition: int) -> None:
        """Record that ``partition`` was read to its end and flushed (a cluster worker's
        share of a bounded job; a rerun of its task then does nothing)."""
        self.files.write(f"p{partition}/{DONE}", b"done\n")

    def position(self, partition: int) -> int | None:
        """The read position of ``partition``'s newest checkpoint (its manifest only)."""
        found = self._manifest(partition)
        return None if found is None else int(found[1]["position"])

    def mark_flushed(self, partition: int, position: int) -> None:
        """Record that a bounded Kafka run flushed ``partition`` at ``position`` (its end)."""
        self.files.write(f"p{partition}/{FLUSHED}", str(int(position)).encode())

    def flushed_position(self, partition: int) -> int | None:
        """Where ``partition`` was last flushed by a bounded Kafka run, or None."""
        try:
            return int((self.files.read(f"p{partition}/{FLUSHED}") or b"").decode())
        except ValueError:
            return None

    def partition_done(self, partition: int) -> bool:
        """Whether :meth:`mark_partition_done` was recorded for ``partition``."""
        return self.files.exists(f"p{partition}/{DONE}")

    @contextmanager
    def lease(self, partition: int, wait_s: float = LEASE_WAIT_S) -> Iterator[None]:
        """Hold ``partition`` exclusively while working on it: a task rerun after its worker
        was killed gets it at once (or, on an object store, once dask's lease on the dead
        worker's lock times out), while a second live process on the same partition (a task
        run twice) waits, then fails, instead of writing the same checkpoints concurrently.
        """
        with ExitStack() as held:
            try:
                held.enter_context(self.files.lease(f"p{partition}/{LEASE}", wait_s))
            except LeaseHeld as exc:
                raise CheckpointError(
                    f"partition {partition} of job {self.job_id} is held by another process "
                    f"({exc}) for more than {wait_s:.0f} s: the same job runs twice; stop the "
                    "other run first"
                ) from None
            yield

    def is_complete(self) -> bool:
        """True once a bounded job has flushed and checkpointed everything."""
        return self.files.exists(COMPLETE)

    def mark_complete(self) -> None:
        """Record that the job ran to its end (a rerun is then a no-op)."""
        self.files.write(COMPLETE, self.job_id.encode())

    def journal_has_entries(self) -> bool:
        """Whether the job's batch journal holds any batch (a Kafka run began)."""
        journal = self.files.sub("journal")
        return any(journal.read(name) for name in journal.names() if name.endswith(".journal"))

    def reset(self) -> None:
        """Forget every checkpoint of this job (``--fresh``)."""
        self.files.remove()


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _read_table(data: bytes | None) -> pa.Table:
    if data is None:
        raise pa.ArrowInvalid("a state file of the checkpoint is missing")
    with ipc.open_file(pa.BufferReader(data)) as reader:
        return reader.read_all()

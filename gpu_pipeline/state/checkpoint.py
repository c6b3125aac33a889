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
    p3/LEASE                   -> locked (flock) by the process that works on partition 3
    COMPLETE                   -> written when a bounded job has flushed everything
    JOB.json                   -> the job's identity (source, sink, database, semantics; no secrets)
    sinks/<key>                -> one marker per database the job has written to

A checkpoint folder is written completely and fsynced before ``CURRENT`` points at it, so a
crash at any instant leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.runtime.faults import crash_point
from gpu_pipeline.state.durable import fsync_directory, write_durably

CURRENT = "CURRENT"
COMPLETE = "COMPLETE"
JOB = "JOB.json"
INTENT = "INTENT"
DONE = "DONE"
LEASE = "LEASE"
LEASE_WAIT_S = 60.0
"""How long a process waits for a partition another process still works on."""


@dataclass
class PartitionCheckpoint:
    """What a restart of one partition needs: where to read next, its state and counters."""

    position: int
    state: dict[str, pa.Table] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    batch_size: int = 0
    sequence: int = 0


class CheckpointStore:
    """Reads and writes the checkpoints of one job in one directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        job_id: str,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.job_id = job_id
        self.identity = identity

    def partitions(self) -> list[int]:
        """Partitions that have a checkpoint."""
        return self._partitions_with(CURRENT)

    def known_partitions(self) -> list[int]:
        """Partitions with a checkpoint or an intent (a first checkpoint under way)."""
        return self._partitions_with(CURRENT, INTENT)

    def _partitions_with(self, *markers: str) -> list[int]:
        """Partitions whose folder holds any of the files ``markers``."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(entry.name[1:])
            for entry in self.directory.iterdir()
            if entry.name[:1] == "p"
            and entry.name[1:].isdigit()
            and any((entry / marker).is_file() for marker in markers)
        )

    def load(self, partition: int) -> PartitionCheckpoint | None:
        """The newest checkpoint of ``partition``, or None."""
        folder = self.directory / f"p{partition}"
        pointer = folder / CURRENT
        if not pointer.is_file():
            return None
        current = folder / pointer.read_text().strip()
        try:
            manifest = json.loads((current / "manifest.json").read_text())
            if manifest["job_id"] != self.job_id:
                raise CheckpointError(
                    f"checkpoint {current} belongs to job {manifest['job_id']}"
                    f"{self._described(manifest['job_id'])}, not to this run's job {self.job_id}:"
                    " it was copied or moved here; use another --checkpoint-dir, or --fresh to "
                    "start this job over"
                )
            state = {name: _read_table(current / f"{name}.arrow") for name in manifest["state"]}
        except (OSError, json.JSONDecodeError, KeyError, pa.ArrowInvalid) as exc:
            raise CheckpointError(
                f"checkpoint {current} is unreadable ({exc}); restore it from a backup or rerun "
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
        folder = self.directory / f"p{partition}"
        try:
            current = folder / (folder / CURRENT).read_text().strip()
            manifest = json.loads((current / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            if not (folder / CURRENT).is_file():
                return {}
            raise CheckpointError(
                f"checkpoint of partition {partition} is unreadable ({exc})"
            ) from exc
        return {k: int(v) for k, v in manifest["counters"].items()}

    def save(self, partition: int, checkpoint: PartitionCheckpoint) -> None:
        """Write ``checkpoint`` durably, then make it the partition's current one."""
        folder = self.directory / f"p{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        self.describe_job()
        checkpoint.sequence += 1
        name = f"ckpt-{checkpoint.sequence:09d}"
        staging = folder / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for op, table in checkpoint.state.items():
            _write_table(staging / f"{op}.arrow", table)
            crash_point("during_snapshot")
        manifest = {
            "job_id": self.job_id,
            "partition": partition,
            "sequence": checkpoint.sequence,
            "position": checkpoint.position,
            "state": sorted(checkpoint.state),
            "counters": checkpoint.counters,
            "batch_size": checkpoint.batch_size,
        }
        write_durably(staging / "manifest.json", json.dumps(manifest, indent=1).encode())
        fsync_directory(staging)
        target = folder / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        pointer_tmp = folder / f".{CURRENT}.tmp"
        write_durably(pointer_tmp, name.encode())
        os.replace(pointer_tmp, folder / CURRENT)
        fsync_directory(folder)
        for entry in folder.iterdir():
            if entry.name.startswith(("ckpt-", ".ckpt-")) and entry.name != name:
                shutil.rmtree(entry, ignore_errors=True)

    def describe_job(self) -> None:
        """Write JOB.json once, so a person (and an error message) can tell whose this is."""
        path = self.directory / JOB
        if self.identity is not None and not path.exists():
            text = json.dumps({"job_id": self.job_id, **self.identity}, indent=1, default=str)
            write_durably(path, text.encode())

    def recorded_identity(self) -> dict[str, Any] | None:
        """The identity in JOB.json, or None before the job's first checkpoint."""
        try:
            recorded = json.loads((self.directory / JOB).read_text())
        except (OSError, json.JSONDecodeError):
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
        folder = self.directory / "sinks"
        if (folder / key).is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        write_durably(folder / key, description.encode())
        fsync_directory(folder)

    def claimed_sinks(self) -> set[str]:
        """Keys of every database this job has written to."""
        folder = self.directory / "sinks"
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def write_intent(self, partition: int, position: int, flushed: bool) -> None:
        """Record, durably, that the next checkpoint of ``partition`` covers input up to
        ``position`` (and the end-of-input flush, if ``flushed``); written before that
        checkpoint's rows are inserted, so that a replay after a crash cuts its rows at the
        same place, and so sends the same blocks under the same insert tokens."""
        folder = self.directory / f"p{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / ".INTENT.tmp"
        write_durably(staging, f"{int(position)} {'flush' if flushed else 'batch'}".encode())
        os.replace(staging, folder / INTENT)
        fsync_directory(folder)

    def intent(self, partition: int) -> tuple[int, bool] | None:
        """The recorded intent of ``partition``: (position, flushed), or None."""
        try:
            position, kind = (self.directory / f"p{partition}" / INTENT).read_text().split()
            return int(position), kind == "flush"
        except (OSError, ValueError):
            return None

    def mark_partition_done(self, partition: int) -> None:
        """Record that ``partition`` was read to its end and flushed (a cluster worker's
        share of a bounded job; a rerun of its task then does nothing)."""
        folder = self.directory / f"p{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        write_durably(folder / DONE, b"done\n")
        fsync_directory(folder)

    def partition_done(self, partition: int) -> bool:
        """Whether :meth:`mark_partition_done` was recorded for ``partition``."""
        return (self.directory / f"p{partition}" / DONE).is_file()

    @contextmanager
    def lease(self, partition: int, wait_s: float = LEASE_WAIT_S) -> Iterator[None]:
        """Hold ``partition`` exclusively while working on it.

        An advisory ``flock`` on ``p<n>/LEASE``: the kernel releases it when its process
        dies, so a task rerun after its worker was killed gets it at once, while a second
        live process on the same partition (a task run twice) waits, then fails, instead
        of writing the same checkpoints concurrently.  On NFS, Linux maps it to a POSIX
        lock, which the server keeps.
        """
        folder = self.directory / f"p{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LEASE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                        raise CheckpointError(
                            f"partition {partition} of job {self.job_id} is held by another "
                            f"process ({holder or 'unknown'}) for more than {wait_s:.0f} s: the "
                            "same job runs twice; stop the other run first"
                        ) from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def is_complete(self) -> bool:
        """True once a bounded job has flushed and checkpointed everything."""
        return (self.directory / COMPLETE).is_file()

    def mark_complete(self) -> None:
        """Record that the job ran to its end (a rerun is then a no-op)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_durably(self.directory / COMPLETE, self.job_id.encode())
        fsync_directory(self.directory)

    def reset(self) -> None:
        """Forget every checkpoint of this job (``--fresh``)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_table(path: Path, table: pa.Table) -> None:
    with open(path, "wb") as handle:
        with ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        handle.flush()
        os.fsync(handle.fileno())


def _read_table(path: Path) -> pa.Table:
    with ipc.open_file(pa.OSFile(str(path), "rb")) as reader:
        return reader.read_all()

"""Durable checkpoints: every partition's operator state and read position, atomically.

Layout under the job's checkpoint directory::

    CURRENT                  -> name of the newest complete checkpoint (replaced atomically)
    ckpt-000042/manifest.json   job id, positions, counters, completion flag
    ckpt-000042/p0-dedup.arrow  one Arrow IPC file per (partition, operator)

A checkpoint directory is written completely and fsynced before ``CURRENT`` points at it,
so a crash at any instant leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from gpu_pipeline.errors import CheckpointError

CURRENT = "CURRENT"


@dataclass
class Checkpoint:
    """What a restart needs: positions, state tables and counters of every partition."""

    job_id: str
    positions: dict[int, int] = field(default_factory=dict)
    states: dict[int, dict[str, pa.Table]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    sequence: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Reads and writes the checkpoints of one job in one directory."""

    def __init__(self, directory: str | os.PathLike[str], job_id: str) -> None:
        self.directory = Path(directory)
        self.job_id = job_id

    def load(self) -> Checkpoint | None:
        """The newest checkpoint, or None when the job has none yet."""
        pointer = self.directory / CURRENT
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        folder = self.directory / name
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {folder} is unreadable ({exc}); restore it from a backup or rerun "
                "with --fresh (idempotent inserts make a rerun safe)"
            ) from exc
        if manifest["job_id"] != self.job_id:
            raise CheckpointError(
                f"checkpoint {folder} belongs to job {manifest['job_id']}, not {self.job_id}: "
                "use another --checkpoint-dir or --fresh"
            )
        states: dict[int, dict[str, pa.Table]] = {}
        for partition, names in manifest["states"].items():
            states[int(partition)] = {
                op: _read_table(folder / f"p{partition}-{op}.arrow") for op in names
            }
        return Checkpoint(
            job_id=manifest["job_id"],
            positions={int(k): int(v) for k, v in manifest["positions"].items()},
            states=states,
            counters={k: int(v) for k, v in manifest["counters"].items()},
            complete=bool(manifest["complete"]),
            sequence=int(manifest["sequence"]),
            extra=manifest.get("extra", {}),
        )

    def save(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint`` durably, then make it the current one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        checkpoint.sequence += 1
        name = f"ckpt-{checkpoint.sequence:09d}"
        folder = self.directory / name
        staging = self.directory / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for partition, tables in checkpoint.states.items():
            for op, table in tables.items():
                _write_table(staging / f"p{partition}-{op}.arrow", table)
        manifest = {
            "job_id": self.job_id,
            "sequence": checkpoint.sequence,
            "positions": {str(k): v for k, v in checkpoint.positions.items()},
            "states": {str(p): sorted(t) for p, t in checkpoint.states.items()},
            "counters": checkpoint.counters,
            "complete": checkpoint.complete,
            "extra": checkpoint.extra,
        }
        _write_bytes(staging / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        _fsync_dir(self.directory)
        pointer_tmp = self.directory / f".{CURRENT}.tmp"
        _write_bytes(pointer_tmp, name.encode())
        os.replace(pointer_tmp, self.directory / CURRENT)
        _fsync_dir(self.directory)
        self._remove_older_than(name)

    def reset(self) -> None:
        """Forget every checkpoint of this job (``--fresh``)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _remove_older_than(self, keep: str) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(("ckpt-", ".ckpt-")) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)


def _write_table(path: Path, table: pa.Table) -> None:
    with open(path, "wb") as handle:
        with ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        handle.flush()
        os.fsync(handle.fileno())


def _read_table(path: Path) -> pa.Table:
    with ipc.open_file(pa.memory_map(str(path))) as reader:
        return reader.read_all()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

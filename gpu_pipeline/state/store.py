"""Where a job's state lives: a local (or shared POSIX) directory, or any fsspec location.

Everything durable that a job keeps beside its output — checkpoints, the batch journal,
markers, blocks staged for a chdb writer — goes through a :class:`StateStore`: named files
under one root, each written whole and atomically (a reader sees the old file or the new
one, never part of one).  That is all the checkpoint protocol needs, and all an object store
offers, so a partition's state can follow it to any worker that reaches the same location:

``LocalStateStore``
    A directory (``--checkpoint-dir /shared/ckpt``).  Files are written to a temporary
    name, fsynced and renamed; leases are ``flock`` locks, which the kernel drops when the
    holder dies.  On a cluster, every worker must mount it at the same path (NFS, a
    parallel file system).
``FsspecStateStore``
    Any other fsspec URL (``--checkpoint-dir s3://bucket/ckpt``, ``gs://…``, ``abfs://…``):
    one object per file; an object store makes each PUT atomic and readable at once.
    Credentials and endpoints come from the library's own configuration (environment
    variables such as ``AWS_ACCESS_KEY_ID``, or fsspec's
    ``FSSPEC_S3_ENDPOINT_URL``-style settings), never from the URL.  Object stores have no
    locks: on a dask worker a lease is a ``distributed.Lock`` held at the scheduler
    (released 30 s after its holder dies, dask's lease timeout); in a single process it is
    a process-local lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.state.durable import fsync_directory, write_durably


class LeaseHeld(CheckpointError):
    """Another live process holds the lease."""


class AppendLog(ABC):
    """A file that grows by appends (the batch journal), each append durable on return."""

    @abstractmethod
    def read(self) -> bytes:
        """The file's content (empty when missing)."""

    @abstractmethod
    def append(self, data: bytes) -> None:
        """Add ``data`` at the end, durably."""

    @abstractmethod
    def replace(self, data: bytes) -> None:
        """Make the file hold exactly ``data``, atomically."""

    def close(self) -> None:  # noqa: B027 - most logs hold nothing open
        """Release what the log holds open."""


class StateStore(ABC):
    """Named files under one root.  Names are ``/``-separated and relative to the root."""

    location: str
    """The root, for messages (no credentials)."""

    @abstractmethod
    def sub(self, name: str) -> StateStore:
        """The store rooted at the folder ``name`` of this one."""

    @abstractmethod
    def read(self, name: str) -> bytes | None:
        """The content of ``name``, or None when it does not exist."""

    @abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole, durably and atomically (parents are created)."""

    @abstractmethod
    def write_folder(self, name: str, files: dict[str, bytes]) -> None:
        """Write the folder ``name`` holding ``files`` (replacing any folder of that name).

        Readers must not rely on the folder being complete until something written after it
        (a pointer) says so: a crash can leave part of it on an object store.
        """

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the file ``name`` exists."""

    @abstractmethod
    def names(self, folder: str = "") -> list[str]:
        """The names of the files and folders directly in ``folder`` (sorted; [] if none)."""

    @abstractmethod
    def remove(self, name: str = "") -> None:
        """Delete the file or folder ``name`` with everything in it (missing is fine)."""

    @abstractmethod
    def log(self, name: str) -> AppendLog:
        """The append-only file ``name``."""

    @abstractmethod
    def lease(self, name: str, wait_s: float) -> contextlib.AbstractContextManager[None]:
        """Hold ``name`` exclusively; :class:`LeaseHeld` after ``wait_s`` of waiting."""

    def __str__(self) -> str:
        return self.location


def open_state_store(location: str | os.PathLike[str]) -> StateStore:
    """The store at ``location``: an fsspec URL (``scheme://…``), else a local directory
    (``file://PATH`` included: a directory keeps its atomic renames and ``flock`` leases)."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return LocalStateStore(text.removeprefix("file://"))
    if is_url(text):
        return FsspecStateStore(text)
    return LocalStateStore(text)


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names an fsspec location rather than a local directory."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


# ---------------------------------------------------------------------------- local


class LocalStateStore(StateStore):
    """A directory: atomic renames, fsynced files and folders, ``flock`` leases."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.location = str(self.directory)

    def path(self, name: str) -> Path:
        return self.directory / name if name else self.directory

    def sub(self, name: str) -> LocalStateStore:
        return LocalStateStore(self.path(name))

    def read(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write(self, name: str, data: bytes) -> None:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        write_durably(staging, data)
        os.replace(staging, target)
        fsync_directory(target.parent)

    def write_folder(self, name: str, files: dict[str, bytes]) -> None:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        from gpu_pipeline.runtime.faults import crash_point

        for file, data in files.items():
            write_durably(staging / file, data)
            crash_point("during_snapshot")
        fsync_directory(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        fsync_directory(target.parent)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def names(self, folder: str = "") -> list[str]:
        path = self.path(folder)
        return sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []

    def remove(self, name: str = "") -> None:
        path = self.path(name)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def log(self, name: str) -> AppendLog:
        return _LocalLog(self.path(name))

    @contextlib.contextmanager
    def lease(self, name: str, wait_s: float) -> Iterator[None]:
        """An advisory ``flock``: the kernel releases it when its process dies, so a task
        rerun after its worker was killed gets it at once.  On NFS, Linux maps it to a POSIX
        lock, which the server keeps."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                        raise LeaseHeld(holder or "unknown") from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock


class _LocalLog(AppendLog):
    """An ``O_APPEND`` file fsynced after every append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _file(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if created:
                os.fsync(self._fd)
                fsync_directory(self.path.parent)
        return self._fd

    def append(self, data: bytes) -> None:
        fd = self._file()
        written = os.write(fd, data)
        if written != len(data):
            raise CheckpointError(
                f"short write to {self.path} ({written} of {len(data)} bytes); is the disk full?"
            )
        os.fsync(fd)

    def replace(self, data: bytes) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(temporary, data)
        self.close()
        os.replace(temporary, self.path)
        fsync_directory(self.path.parent)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------- fsspec


class FsspecStateStore(StateStore):
    """One object per file at an fsspec URL: an object store, whose PUTs are atomic."""

    def __init__(self, url: str, fs: Any = None, root: str | None = None) -> None:
        import fsspec

        if fs is None:
            try:
                fs, root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as exc:
                raise CheckpointError(
                    f"cannot open the checkpoint location {url}: {exc} (an s3:// location "
                    "needs the s3fs package, gs:// gcsfs, abfs:// adlfs)"
                ) from None
        self.fs = fs
        self.root = (root or "").rstrip("/")
        self.location = url.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def sub(self, name: str) -> FsspecStateStore:
        return FsspecStateStore(f"{self.location}/{name}", self.fs, self._key(name))

    def read(self, name: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self._key(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return bytes(data)

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(name), data)

    def write_folder(self, name: str, files: dict[str, bytes]) -> None:
        from gpu_pipeline.runtime.faults import crash_point

        self.remove(name)
        key = self._key(name)
        for file, data in files.items():
            self.fs.pipe_file(f"{key}/{file}", data)
            crash_point("during_snapshot")

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.isfile(self._key(name)))
        except FileNotFoundError:
            return False

    def names(self, folder: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._key(folder), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        return sorted(n for n in names if n)

    def remove(self, name: str = "") -> None:
        key = self._key(name)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(key):
                self.fs.rm(key, recursive=True)

    def log(self, name: str) -> AppendLog:
        return _ObjectLog(self, name)

    def lease(self, name: str, wait_s: float) -> contextlib.AbstractContextManager[None]:
        return _dask_or_local_lease(f"{self.location}/{name}", wait_s)


class _ObjectLog(AppendLog):
    """An object rewritten whole on every append (objects cannot grow in place; a journal
    holds only the batches since the last checkpoint, so it stays small)."""

    def __init__(self, store: FsspecStateStore, name: str) -> None:
        self.store, self.name = store, name
        self._data: bytes | None = None

    def read(self) -> bytes:
        self._data = self.store.read(self.name) or b""
        return self._data

    def append(self, data: bytes) -> None:
        current = self._data if self._data is not None else self.read()
        self.replace(current + data)

    def replace(self, data: bytes) -> None:
        self.store.write(self.name, data)
        self._data = data


_local_leases: dict[str, threading.Lock] = {}
_local_leases_guard = threading.Lock()


@contextlib.contextmanager
def _dask_or_local_lease(name: str, wait_s: float) -> Iterator[None]:
    """A ``distributed.Lock`` on a dask worker (the scheduler holds it for the cluster),
    else a lock of this process."""
    try:
        from distributed import Lock, get_worker

        get_worker()
    except (ImportError, ValueError):
        with _local_leases_guard:
            lock = _local_leases.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=wait_s):
            raise LeaseHeld("another thread of this process") from None
        try:
            yield
        finally:
            lock.release()
        return
    cluster_lock = Lock(f"gpu-pipeline-lease:{name}")
    if not cluster_lock.acquire(timeout=wait_s):
        raise LeaseHeld("another dask task (a cluster-wide lock at the scheduler)")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            cluster_lock.release()

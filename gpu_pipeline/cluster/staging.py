"""Blocks on their way from cluster workers to the one process that owns an embedded ClickHouse.

chdb serves a data folder to one process at a time, so with a ``chdb://`` sink the workers
of a cluster run cannot insert themselves.  Instead a worker's checkpoint *stages* each
block it would insert: an Arrow IPC file, written durably under the job's shared
checkpoint location, carrying its table and insert token.  The client's
:class:`StagedWriter` inserts staged blocks with those tokens and deletes each file once
its insert returned.

Exactly-once is the single-process argument with one more durable step: a block is staged
(written whole and durably) before the worker's state snapshot, so once the state moves
past a block the block is either inserted or still staged; the writer inserts every staged
block, a crash between its insert and its delete inserts it again under the same token, and
ClickHouse drops the duplicate.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading

import pyarrow as pa
import pyarrow.ipc as ipc

from gpu_pipeline.errors import SinkError
from gpu_pipeline.sinks.base import Sink
from gpu_pipeline.state.store import StateStore, open_state_store

MAX_STAGED = 256
"""Staged blocks waiting for the writer beyond which a worker waits (bounds disk use)."""
_TABLE, _TOKEN = b"gpu_pipeline.table", b"gpu_pipeline.token"


def staged_name(token: str) -> str:
    """The name of the block with ``token`` (one per token, so a replay overwrites it)."""
    return f"{hashlib.sha256(token.encode()).hexdigest()[:40]}.arrow"


def _staged(files: StateStore) -> list[str]:
    return [name for name in files.names() if name.endswith(".arrow")]


class StagedSink(Sink):
    """A worker's sink for a chdb job: every write becomes a durable staged block."""

    def __init__(self, location: str | os.PathLike[str] | StateStore, target: str) -> None:
        self.files = location if isinstance(location, StateStore) else open_state_store(location)
        self.target = target
        self._abandoned = threading.Event()

    def open(self, *, create_schema: bool = True) -> None:
        pass

    def abandon(self) -> None:
        """The client (the writer) is gone: a write that waits for room fails instead of
        waiting forever.  The checkpoint it belonged to is then not taken, and the next
        owner of the partition replays it under the same tokens."""
        self._abandoned.set()

    def write(self, table: str, rows: pa.Table, token: str) -> None:
        if not rows.num_rows:
            return
        while len(_staged(self.files)) >= MAX_STAGED:
            # the writer is behind: wait rather than fill the disk
            if self._abandoned.wait(0.05):
                raise SinkError(
                    f"{MAX_STAGED} blocks are staged in {self.files.location} and the client "
                    "that inserts them is gone; this task stops, and a rerun of the job "
                    "inserts them"
                )
        metadata = {_TABLE: table.encode(), _TOKEN: token.encode()}
        rows = rows.replace_schema_metadata(metadata)
        buffer = io.BytesIO()
        with ipc.new_file(buffer, rows.schema) as writer:
            writer.write_table(rows)
        self.files.write(staged_name(token), buffer.getvalue())

    def query(self, sql: str) -> pa.Table:
        raise SinkError(
            "a cluster worker of a chdb job does not query the embedded ClickHouse; "
            "the client process owns it"
        )

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.target} (blocks staged for the client's writer)"


class StagedWriter:
    """The client's single writer: inserts staged blocks into ``sink``, then deletes them.

    :meth:`start` drains in a background thread until :meth:`stop`, which drains what is
    left and re-raises the first insert error, if any.
    """

    def __init__(self, location: str | os.PathLike[str] | StateStore, sink: Sink) -> None:
        self.files = location if isinstance(location, StateStore) else open_state_store(location)
        self.sink = sink
        self.blocks = 0
        self.rows = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain(self) -> int:
        """Insert and delete every staged block; how many there were."""
        done = 0
        for name in _staged(self.files):
            data = self.files.read(name)
            if data is None:
                continue
            try:
                with ipc.open_file(pa.BufferReader(data)) as reader:
                    rows = reader.read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise SinkError(
                    f"staged block {self.files.location}/{name} is unreadable: {exc}"
                ) from exc
            metadata = rows.schema.metadata or {}
            table, token = metadata[_TABLE].decode(), metadata[_TOKEN].decode()
            self.sink.write(table, rows.replace_schema_metadata(None), token)
            self.files.remove(name)
            done += 1
            self.rows += rows.num_rows
        self.blocks += done
        return done

    def start(self) -> None:
        """Drain in the background every 100 ms."""
        self._thread = threading.Thread(target=self._loop, name="staged-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.drain():
                    self._stop.wait(0.1)
            except BaseException as exc:  # reported by check() and stop()
                self._error = exc
                return

    def check(self) -> None:
        """Re-raise an insert error of the background thread."""
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop the thread, insert what is still staged, and re-raise any error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.check()
        self.drain()

"""The sink seam: where output tables go.

A sink stores the six output tables of SPEC §3.  The runtime hands it whole Arrow tables
together with a deterministic token per write; replaying a write after a crash with the
same token must not store its rows twice.  That idempotency is what lets the checkpoint
commit source offsets *after* the sink (SPEC §2.7) without ever duplicating output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

import pyarrow as pa

DEFAULT_SINK_URL = "chdb://gpu_pipeline_data/clickhouse"
"""The sink the command line uses when none is given: embedded ClickHouse in a local folder."""

DEFAULT_DATABASE = "clickstream"


class Sink(ABC):
    """An idempotent store for the output tables.

    Usable as a context manager: ``with open_sink(url) as sink: ...`` closes it on exit.
    """

    @abstractmethod
    def open(self, *, create_schema: bool = True) -> None:
        """Connect and create the database, tables and views; calling it again is a no-op.

        ``create_schema=False`` only connects: a read-only user (dashboards, ``query``) may
        not run DDL."""

    @abstractmethod
    def write(self, table: str, rows: pa.Table, token: str) -> None:
        """Store ``rows`` (exactly ``schema.OUTPUT_TABLES[table]``) in ``table``.

        ``token`` is a deterministic name for this write: writing the same rows again with
        the same token stores them once (exactly-once on replay).  Empty tables are a no-op.
        """

    @abstractmethod
    def query(self, sql: str) -> pa.Table:
        """Run a statement and return its result (an empty table for statements without one)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (and, for the embedded engine, its data directory lock)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the data goes, for humans (never contains a password)."""

    def __enter__(self) -> Sink:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_sink(url: str, database: str = DEFAULT_DATABASE, *, create_schema: bool = True) -> Sink:
    """Parse a sink URL, connect, and create the schema (unless not ``create_schema``).

    ``chdb://PATH`` is embedded ClickHouse in the folder PATH (relative paths are allowed);
    ``http(s)://USER:PASS@HOST:PORT`` is a ClickHouse server.  A malformed URL raises
    :class:`~gpu_pipeline.errors.ConfigError` naming ``sink``; an unreachable or locked
    store raises :class:`~gpu_pipeline.errors.SinkError`.
    """
    from gpu_pipeline.sinks.clickhouse import ClickHouseSink, parse_sink_url

    sink = ClickHouseSink(parse_sink_url(url, database))
    sink.open(create_schema=create_schema)
    return sink

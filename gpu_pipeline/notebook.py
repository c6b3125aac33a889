"""Read a job's tables from a notebook: embedded ClickHouse (chdb) or a ClickHouse server.

A notebook only reads.  Unlike :class:`~gpu_pipeline.sinks.clickhouse.ClickHouseSink`, which
creates the schema whenever it opens (and so needs the right to), :func:`connect` runs no
DDL, so a read-only ClickHouse user (``readonly = 1`` or ``2``) can explore a server, and a
missing chdb folder is reported instead of being created empty.

Where to read comes from the environment, as for ``gpu-pipeline`` itself:
``GPU_PIPELINE_SINK`` (``chdb://PATH`` or ``http(s)://USER:PASS@HOST:PORT``) and
``GPU_PIPELINE_DATABASE`` (default ``clickstream``).  Without ``GPU_PIPELINE_SINK`` the
embedded folder of the quick start is used: ``gpu_pipeline_data/clickhouse`` in the working
directory or the nearest folder above it that has one (Jupyter runs a notebook in
``notebooks/``, ``make run`` writes at the top of the checkout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.config import DEFAULT_DATA_DIR, ENV_PREFIX
from gpu_pipeline.errors import ConfigError, SinkError
from gpu_pipeline.sinks.base import DEFAULT_DATABASE
from gpu_pipeline.sinks.clickhouse import (
    ClickHouseSink,
    SinkConfig,
    call_with_retries,
    parse_sink_url,
)

if TYPE_CHECKING:
    import pandas as pd

SINK_ENV = f"{ENV_PREFIX}SINK"
DATABASE_ENV = f"{ENV_PREFIX}DATABASE"
EMBEDDED_FOLDER = Path(DEFAULT_DATA_DIR) / "clickhouse"
"""Where the quick start's ``gpu-pipeline run`` puts embedded ClickHouse, relative to its
working directory."""


def default_sink_url(start: str | os.PathLike[str] | None = None) -> str:
    """``chdb://`` of the nearest ``gpu_pipeline_data/clickhouse`` at or above ``start``.

    ``start`` defaults to the working directory.  Raises ConfigError naming ``sink`` when no
    such folder exists: the pipeline has not run here, or it wrote elsewhere.
    """
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / EMBEDDED_FOLDER
        if candidate.is_dir():
            return f"chdb://{candidate}"
    raise ConfigError(
        "sink",
        f"no {EMBEDDED_FOLDER} folder in {here} or above it: run the pipeline first "
        f"(make run) or set {SINK_ENV} to chdb://PATH or http(s)://USER:PASS@HOST:PORT",
    )


def resolve(
    url: str | None = None,
    database: str | None = None,
    environ: Mapping[str, str] | None = None,
    start: str | os.PathLike[str] | None = None,
) -> SinkConfig:
    """The sink to read: arguments first, then the environment, then the quick start's folder.

    The URL is validated as ``gpu-pipeline`` validates it (a relative ``chdb://`` path is
    taken from the working directory); nothing is opened.
    """
    env = os.environ if environ is None else environ
    url = url or env.get(SINK_ENV) or default_sink_url(start)
    database = database or env.get(DATABASE_ENV) or DEFAULT_DATABASE
    return parse_sink_url(url, database)


def connect(
    url: str | None = None,
    database: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Explorer:
    """Open a job's tables for reading (see :func:`resolve` for where they are looked for).

    Raises SinkError when the store cannot be reached, or when the database lacks any of the
    output tables (the job has not written there yet).
    """
    explorer = Explorer(resolve(url, database, environ))
    explorer.open()
    return explorer


class Explorer:
    """Read-only queries on one database of a ClickHouse store, as pandas or Arrow.

    An embedded folder serves one process at a time: close the explorer (or stop the kernel)
    before running the pipeline on the same folder again.
    """

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._client: Any = None
        self._version = ""

    @property
    def database(self) -> str:
        """The database holding the job's tables (a plain identifier, safe to format into SQL)."""
        return self.config.database

    def open(self) -> None:
        """Connect and check that the output tables exist; a no-op when already open."""
        if self._client is not None:
            return
        client = self._connect()
        try:
            self._client = client
            self._version = str(client.server_version)
            missing = self.missing_tables()
        except BaseException:
            self.close()
            raise
        if missing:
            self.close()
            raise SinkError(
                f"{self.config.safe_url}: database {self.database} lacks the tables "
                f"{', '.join(missing)}; run the pipeline into it first "
                f"(or point {SINK_ENV} / {DATABASE_ENV} at the job's sink)"
            )

    def missing_tables(self) -> list[str]:
        """Output tables (SPEC §3) that the database does not have."""
        found = self.arrow(
            "SELECT name FROM system.tables WHERE database = {database:String}",
            {"database": self.database},
        )
        present = set(found.column("name").to_pylist()) if found.num_rows else set()
        return [name for name in schema.OUTPUT_TABLES if name not in present]

    def arrow(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a read query; its rows as Arrow.

        Text columns are ``string`` when they hold valid UTF-8 and ``binary`` otherwise (only
        ``dead_letters.raw`` can), whether or not the user may ask the server for strings.
        ``parameters`` fill ClickHouse placeholders such as ``{name:String}``.
        """
        client = self._require_client()
        params = dict(parameters) if parameters else None
        result = call_with_retries(
            lambda: client.query_arrow(sql, parameters=params),
            self.config.retry,
            "query",
            self._scrub,
        )
        return _text_columns(result)

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a read query; its rows as a pandas DataFrame (timestamps stay UTC-aware)."""
        return self.arrow(sql, parameters).to_pandas()

    def describe(self) -> str:
        """Where the tables are read from, for humans (never contains a password)."""
        what = "embedded ClickHouse" if self.config.kind == "chdb" else "ClickHouse server"
        version = f" {self._version}" if self._version else ""
        return f"{self.config.safe_url} ({what}{version}), database {self.database}"

    def close(self) -> None:
        """Release the connection (and an embedded folder's lock); it can be opened again."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Explorer:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"<Explorer {self.describe()} ({state})>"

    # ---- internals --------------------------------------------------------------

    def _connect(self) -> Any:
        config = self.config
        if config.kind == "chdb" and not os.path.isdir(config.path):
            raise SinkError(
                f"no embedded ClickHouse folder at {config.path}: run the pipeline into "
                f"chdb://{config.path} first, or set {SINK_ENV} to the job's sink"
            )
        # the sink's own connection (TLS, timeouts, retries, lock messages), without its DDL
        return ClickHouseSink(config)._connect()

    def _scrub(self, message: str) -> str:
        password = self.config.password
        return message.replace(password, "***") if password else message

    def _require_client(self) -> Any:
        if self._client is None:
            raise SinkError(f"{self.config.safe_url} is not open; call open() first")
        return self._client


def _text_columns(table: pa.Table) -> pa.Table:
    """Valid UTF-8 as ``string``, anything else as ``binary``, column by column.

    A server user with ``readonly = 1`` cannot ask for Arrow strings, so every text column
    arrives as ``binary``; with strings, a column holding invalid UTF-8 would break whatever
    decodes it.
    """
    for index, field_ in enumerate(table.schema):
        column = table.column(index)
        if pa.types.is_string(field_.type) and not _valid_utf8(column):
            table = table.set_column(index, field_.with_type(pa.binary()), column.cast(pa.binary()))
        elif pa.types.is_binary(field_.type):
            try:
                text = column.cast(pa.string())  # the cast checks the UTF-8
            except pa.ArrowInvalid:
                continue
            table = table.set_column(index, field_.with_type(pa.string()), text)
    return table


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    try:
        for chunk in column.chunks:
            chunk.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True

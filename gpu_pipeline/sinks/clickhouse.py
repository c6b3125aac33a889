"""The ClickHouse sink: embedded chdb and a ClickHouse server through one code path.

Both go through clickhouse-connect (``interface='chdb'`` or ``'http'``/``'https'``), so
connecting, DDL, queries, retries and error handling are shared.  Only the bulk load differs
where it pays: on chdb, Arrow tables are read in place by the engine's ``Python()`` table
function instead of being serialised to an Arrow IPC file first (see docs/tables.md for the
numbers); a server always gets ``insert_arrow``.

Exactly-once (SPEC §2.7) rests on three facts this module makes true:

* every table has ``non_replicated_deduplication_window``, so an insert carrying an
  ``insert_deduplication_token`` that the table has already seen is dropped;
* a write is cut into blocks of at most ``insert_block_rows`` rows by row index alone, block
  ``i`` carrying the token ``f"{token}:{i}"``, so a replay re-sends the very same blocks;
* the insert settings make ClickHouse keep each block whole (no re-squashing into other
  sizes, one insert thread, synchronous insert), so a block becomes one part per table
  partition, all deduplicated by its token, whether the crash came before, during or after it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.config import redact
from gpu_pipeline.errors import ConfigError, SinkError
from gpu_pipeline.secrets import CLICKHOUSE_PASSWORD, read_secret
from gpu_pipeline.sinks import ddl
from gpu_pipeline.sinks.base import DEFAULT_DATABASE, Sink

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_INSERT_BLOCK_ROWS = 2_097_152
"""Rows per insert block: above ClickHouse's default block (1,048,449 rows), so that a typical
micro-batch is one block, and small enough to bound the engine's memory per insert."""

TRANSIENT_CODES: frozenset[int] = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        252,  # TOO_MANY_PARTS
        285,  # TOO_FEW_LIVE_REPLICAS
        319,  # UNKNOWN_STATUS_OF_INSERT
        425,  # SYSTEM_ERROR
        999,  # KEEPER_EXCEPTION
    }
)
"""ClickHouse error codes worth retrying: the server is busy, overloaded or briefly away."""

RETRIES = 0
"""Calls retried after a transient error, in this process (the ``insert_retries`` metric)."""

Kind = Literal["chdb", "http", "https"]
Loader = Literal["python", "arrow"]

_READ_STATEMENT = re.compile(r"^\(*\s*(select|with|show|describe|desc|explain|exists)\b", re.I)
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)+", re.S)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient errors.

    Retrying a write is safe because its tokens make a repeated insert a no-op.
    """

    attempts: int = 5
    first_backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(
                "sink.retry_attempts", f"must be an integer >= 1, got {self.attempts!r}"
            )
        if not 0 <= self.first_backoff_s <= self.max_backoff_s:
            raise ConfigError(
                "sink.retry_backoff",
                f"need 0 <= first ({self.first_backoff_s}) <= max ({self.max_backoff_s}) seconds",
            )

    def backoff_s(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return float(min(self.max_backoff_s, self.first_backoff_s * 2**retry))


@dataclass(frozen=True)
class SinkConfig:
    """A parsed sink URL plus the tuning of writes.  ``password`` is never shown."""

    kind: Kind
    database: str = DEFAULT_DATABASE
    path: str = ""
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = field(default="", repr=False)
    ca_cert: str = ""
    """https: the CA bundle (PEM file) that verifies the server, or ``certifi``; empty: the
    system's trust store."""
    verify: bool = True
    """https: verify the server's certificate and host name (``verify=false`` only for tests)."""
    client_cert: str = ""
    client_cert_key: str = ""
    server_host_name: str = ""
    """https: the name the certificate must carry when it differs from ``host`` (SNI too)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    insert_block_rows: int = DEFAULT_INSERT_BLOCK_ROWS
    chdb_loader: Loader = "python"

    def __post_init__(self) -> None:
        ddl.check_identifier(self.database, "database")
        if not isinstance(self.insert_block_rows, int) or self.insert_block_rows < 1:
            raise ConfigError("sink.insert_block_rows", "must be a positive integer")
        if self.chdb_loader not in ("python", "arrow"):
            raise ConfigError("sink.chdb_loader", "must be 'python' or 'arrow'")

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        if self.kind == "chdb":
            return f"chdb://{self.path}"
        return f"{self.kind}://{self.username}@{self.host}:{self.port}"


def parse_sink_url(
    url: str,
    database: str = DEFAULT_DATABASE,
    *,
    retry: RetryPolicy | None = None,
    insert_block_rows: int = DEFAULT_INSERT_BLOCK_ROWS,
) -> SinkConfig:
    """Validate a sink URL without connecting; errors name the option ``sink``.

    ``chdb://PATH`` resolves PATH (relative to the working directory) to an absolute
    folder; ``http(s)://USER:PASS@HOST[:PORT]`` defaults to user ``default`` and the port
    8123 (http) or 8443 (https).  Without a password in the URL, the password comes from
    ``GPU_PIPELINE_CLICKHOUSE_PASSWORD`` or the file named by
    ``GPU_PIPELINE_CLICKHOUSE_PASSWORD_FILE`` (none: empty).

    ``https://`` takes TLS options as query parameters, named as clickhouse-connect's
    ``get_client`` names them: ``ca_cert=/path/ca.pem`` (or ``certifi``), ``verify=false``,
    ``client_cert=/path/cert.pem``, ``client_cert_key=/path/key.pem`` and
    ``server_host_name=NAME``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("sink", "is empty; expected chdb://PATH or http(s)://USER:PASS@HOST:PORT")
    if url.startswith("chdb://"):
        path = url[len("chdb://") :]
        if not path or "?" in path or "#" in path:
            raise ConfigError("sink", f"{url!r}: chdb:// needs a folder, e.g. chdb://data/ch")
        config = SinkConfig("chdb", database, path=os.path.abspath(path))
    elif urlsplit(url).scheme in ("http", "https"):
        config = _server_config(url, database)
    else:
        raise ConfigError(
            "sink", f"{_redact(url)!r}: expected chdb://PATH or http(s)://USER:PASS@HOST:PORT"
        )
    return dataclasses.replace(
        config, retry=retry or RetryPolicy(), insert_block_rows=insert_block_rows
    )


def _server_config(url: str, database: str) -> SinkConfig:
    parts = urlsplit(url)
    shown = _redact(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("sink", f"{shown!r}: the port is not a number in 0-65535") from None
    if not parts.hostname:
        raise ConfigError("sink", f"{shown!r}: no host; expected http(s)://USER:PASS@HOST:PORT")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError("sink", f"{shown!r}: unexpected path after HOST:PORT")
    kind: Kind = "https" if parts.scheme == "https" else "http"
    tls = _tls_options(parts.query, kind, shown)
    if parts.password is not None:
        password = unquote(parts.password)
    else:
        password = read_secret(CLICKHOUSE_PASSWORD) or ""
    return SinkConfig(
        kind,
        database,
        host=parts.hostname,
        port=port or (8443 if kind == "https" else 8123),
        username=unquote(parts.username) if parts.username else "default",
        password=password,
        **tls,
    )


_TLS_PARAMETERS = ("ca_cert", "verify", "client_cert", "client_cert_key", "server_host_name")
_TLS_FILES = ("ca_cert", "client_cert", "client_cert_key")


def _tls_options(query: str, kind: Kind, shown: str) -> dict[str, Any]:
    """The TLS query parameters of an ``https://`` sink URL, checked."""
    if not query:
        return {}
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _TLS_PARAMETERS:
            raise ConfigError(
                "sink",
                f"{shown!r}: unknown parameter {key!r}; an https:// sink takes "
                f"{', '.join(_TLS_PARAMETERS)}",
            )
        if key in options:
            raise ConfigError("sink", f"{shown!r}: {key!r} is given twice")
        options[key] = value
    if kind != "https":
        raise ConfigError(
            "sink", f"{shown!r}: {', '.join(options)} are TLS options: use an https:// URL"
        )
    if "verify" in options:
        text = str(options["verify"]).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError("sink", f"{shown!r}: verify must be true or false, got {text!r}")
        options["verify"] = text in ("1", "true", "yes", "on")
    for key in _TLS_FILES:
        path = options.get(key)
        if path is None or (key == "ca_cert" and path == "certifi"):
            continue
        if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError("sink", f"{shown!r}: {key} {path!r} is not a readable file")
    if "client_cert_key" in options and "client_cert" not in options:
        raise ConfigError("sink", f"{shown!r}: client_cert_key needs client_cert")
    return options


def _redact(url: str) -> str:
    """``url`` with any password (user info, ``password=``/``secret=`` query values)
    replaced by ``***``."""
    return redact(re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed (network trouble, an overloaded server)."""
    from clickhouse_connect.driver import exceptions as ch

    if _tls_verification_failed(str(exc)):
        return False  # the same certificate fails the same way next time
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, ch.DatabaseError):
        return False
    code = getattr(exc, "code", None)
    if code is not None:
        return code in TRANSIENT_CODES
    return isinstance(exc, ch.OperationalError)


def _tls_verification_failed(message: str) -> bool:
    """Whether an error says the server's certificate was refused (never transient)."""
    lowered = message.lower()
    return any(
        sign in lowered
        for sign in (
            "certificate_verify_failed",
            "certificate verify failed",
            "certificateerror",  # the host name is not the certificate's
            "hostname mismatch",
        )
    )


def call_with_retries(
    action: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    scrub: Callable[[str], str] = str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action``; retry transient failures with backoff, raise SinkError on the rest.

    ``what`` names the operation in messages; ``scrub`` removes secrets from them.
    """
    for attempt in range(policy.attempts):
        try:
            return action()
        except SinkError:
            raise
        except Exception as exc:
            message = scrub(str(exc).strip() or type(exc).__name__)
            if not is_transient(exc):
                if _tls_verification_failed(message):
                    message += (
                        "; the server's TLS certificate could not be verified: name the CA "
                        "that signed it in the sink URL, https://…/?ca_cert=/path/ca.pem, and "
                        "connect by a name the certificate carries (or set server_host_name=)"
                    )
                raise SinkError(f"{what} failed: {message}") from None
            if attempt + 1 == policy.attempts:
                raise SinkError(
                    f"{what} failed after {policy.attempts} attempts: {message}"
                ) from None
            delay = policy.backoff_s(attempt)
            logger.warning("%s failed (%s); retrying in %.1f s", what, message, delay)
            global RETRIES
            RETRIES += 1
            sleep(delay)
    raise AssertionError("unreachable: attempts >= 1")


class _BlockLoader(Protocol):
    def insert(self, table: str, block: pa.Table, settings: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _ArrowLoader:
    """``insert_arrow``: an Arrow IPC stream in ``FORMAT Arrow`` (server and chdb)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def insert(self, table: str, block: pa.Table, settings: dict[str, Any]) -> None:
        self._client.insert_arrow(table, block, settings=settings)

    def close(self) -> None:
        """Nothing of its own to release: the client belongs to the sink."""


class _ChdbPythonLoader:
    """chdb's ``INSERT … SELECT … FROM Python(table)``: the engine reads the Arrow buffers
    in place (no IPC file).  It takes its own connection handle on the sink's engine."""

    def __init__(self, path: str) -> None:
        import chdb

        self._conn = chdb.connect(os.path.realpath(path))
        self._lock = threading.Lock()

    def insert(self, table: str, block: pa.Table, settings: dict[str, Any]) -> None:
        # Python() resolves its argument by variable name in this frame, and maps columns by
        # position: the select list names every column explicitly.
        arrow_block = block
        columns = ", ".join(f"`{name}`" for name in arrow_block.column_names)
        clause = ", ".join(
            f"{key} = {ddl.quote_string(str(value))}"
            for key, value in {**settings, "max_threads": 1}.items()
        )
        sql = (
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM Python(arrow_block) "
            f"SETTINGS {clause}"
        )
        with self._lock:
            self._conn.query(sql)

    def close(self) -> None:
        self._conn.close()


def insert_settings(token: str, block_rows: int) -> dict[str, Any]:
    """Settings that make one insert exactly one deduplicated block (see module docstring)."""
    return {
        "insert_deduplicate": 1,
        "insert_deduplication_token": token,
        "async_insert": 0,
        "max_insert_threads": 1,
        "max_insert_block_size": block_rows,
        "min_insert_block_size_rows": block_rows,
        "min_insert_block_size_bytes": 0,
        "max_partitions_per_insert_block": 0,
    }


class ClickHouseSink(Sink):
    """The output tables in ClickHouse, embedded (chdb) or on a server.

    A chdb folder serves one process at a time.  ``write`` and ``query`` may be called from
    several threads; ``open`` and ``close`` belong to the owning thread.
    """

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._client: Any = None
        self._loader: _BlockLoader | None = None
        self._version = ""

    # ---- Sink -------------------------------------------------------------------

    def open(self, *, create_schema: bool = True) -> None:
        """Connect and create database, tables and views (idempotent); only connect when
        not ``create_schema`` (a read-only user cannot run DDL)."""
        if self._client is not None:
            return
        client = self._connect()
        try:
            statements = ddl.schema_statements(self.config.database) if create_schema else []
            for statement in statements:
                self._retry(partial(client.command, statement), "creating the schema")
            self._loader = self._make_loader(client)
        except BaseException:
            client.close()
            raise
        self._client = client
        self._version = str(client.server_version)

    def write(self, table: str, rows: pa.Table, token: str) -> None:
        """Insert ``rows`` into ``table`` idempotently under ``token`` (see module docstring)."""
        loader = self._require_loader()
        rows = _conform(table, rows)
        if not token:
            raise SinkError(f"write to {table}: the deduplication token is empty")
        qualified = f"{self.config.database}.{table}"
        block_rows = self.config.insert_block_rows
        for index, start in enumerate(range(0, rows.num_rows, block_rows)):
            block = rows.slice(start, block_rows)
            settings = insert_settings(f"{token}:{index}", block_rows)
            self._retry(
                partial(loader.insert, qualified, block, settings),
                f"insert into {qualified}",
            )

    def query(self, sql: str) -> pa.Table:
        """Run ``sql``.  Reads (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS) return their
        rows and are retried on transient errors; other statements run once and return an
        empty table.  String columns holding bytes that are not UTF-8 come back as binary."""
        client = self._require_client()
        if _READ_STATEMENT.match(_LEADING_COMMENTS.sub("", sql)):
            result = self._retry(lambda: client.query_arrow(sql), "query")
            return _utf8_safe(result)
        policy = RetryPolicy(attempts=1)
        call_with_retries(lambda: client.command(sql), policy, "statement", self._scrub)
        return pa.table({})

    def close(self) -> None:
        """Close the connection; the sink can be opened again."""
        loader, client = self._loader, self._client
        self._loader = self._client = None
        try:
            if loader is not None:
                loader.close()
        finally:
            if client is not None:
                client.close()

    def describe(self) -> str:
        """E.g. ``chdb:///data/ch (embedded ClickHouse 26.9.2.1), database clickstream``."""
        what = "embedded ClickHouse" if self.config.kind == "chdb" else "ClickHouse server"
        version = f" {self._version}" if self._version else ""
        return f"{self.config.safe_url} ({what}{version}), database {self.config.database}"

    # ---- internals --------------------------------------------------------------

    def _connect(self) -> Any:
        import clickhouse_connect

        config = self.config
        if config.kind == "chdb":
            return _open_chdb(config.path)
        return self._retry(
            lambda: clickhouse_connect.get_client(
                interface=config.kind,
                host=config.host,
                port=config.port,
                username=config.username,
                password=config.password,
                connect_timeout=10,
                send_receive_timeout=300,
                **client_tls_arguments(config),
            ),
            f"connecting to {config.safe_url}",
        )

    def _make_loader(self, client: Any) -> _BlockLoader:
        if self.config.kind == "chdb" and self.config.chdb_loader == "python":
            return _ChdbPythonLoader(self.config.path)
        return _ArrowLoader(client)

    def _retry(self, action: Callable[[], T], what: str) -> T:
        return call_with_retries(action, self.config.retry, what, self._scrub)

    def _scrub(self, message: str) -> str:
        password = self.config.password
        return message.replace(password, "***") if password else message

    def _require_client(self) -> Any:
        if self._client is None:
            raise SinkError(f"sink {self.config.safe_url} is not open; call open() first")
        return self._client

    def _require_loader(self) -> _BlockLoader:
        self._require_client()
        assert self._loader is not None
        return self._loader


def client_tls_arguments(config: SinkConfig) -> dict[str, Any]:
    """The TLS arguments of ``clickhouse_connect.get_client`` for ``config`` (https only;
    only those the URL set, so clickhouse-connect's defaults hold otherwise)."""
    if config.kind != "https":
        return {}
    arguments: dict[str, Any] = {"verify": config.verify}
    for name in ("ca_cert", "client_cert", "client_cert_key", "server_host_name"):
        value = getattr(config, name)
        if value:
            arguments[name] = value
    return arguments


def _open_chdb(path: str) -> Any:
    """Open the embedded engine on ``path``, explaining the two ways that commonly fails."""
    import clickhouse_connect

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot create the chdb data folder {path}: {exc.strerror}") from None
    try:
        return clickhouse_connect.get_client(interface="chdb", path=path)
    except Exception as exc:
        message = str(exc)
        if "already initialized with path" in message:
            raise SinkError(
                f"this process already runs embedded ClickHouse on another folder; chdb serves "
                f"one data folder per process, so close that sink before opening {path}"
            ) from None
        holder = _lock_holder(path)
        if holder is not None:
            raise SinkError(
                f"the chdb data folder {path} is in use by another process ({holder}), "
                f"probably another gpu-pipeline run or query; only one process may use a "
                f"chdb:// folder at a time: stop it, or use another folder or a ClickHouse server"
            ) from None
        raise SinkError(f"cannot open embedded ClickHouse at {path}: {message}") from None


def _lock_holder(path: str) -> str | None:
    """Who holds the engine's lock on ``path/status`` (its PID line), or None if nobody."""
    status = os.path.join(path, "status")
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        with open(fd, closefd=False) as handle:
            first = handle.readline().strip()
        return first or "PID unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _conform(table: str, rows: pa.Table) -> pa.Table:
    """Check ``rows`` against the table's contract schema; a mismatch is a SinkError.

    Field nullability flags may differ (tables built without an explicit schema mark every
    field nullable), but a null in a required column is refused: ClickHouse would silently
    store a default value in its place.
    """
    expected = schema.OUTPUT_TABLES.get(table)
    if expected is None:
        raise SinkError(f"unknown table {table!r}; expected one of {sorted(schema.OUTPUT_TABLES)}")
    got = [(f.name, f.type) for f in rows.schema]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        raise SinkError(f"rows for {table} have columns {got}, expected {want}")
    for field_ in expected:
        if not field_.nullable and rows.column(field_.name).null_count:
            raise SinkError(f"rows for {table}: required column {field_.name!r} has nulls")
    return rows.cast(expected) if not rows.schema.equals(expected) else rows


def _utf8_safe(table: pa.Table) -> pa.Table:
    """Turn string columns that hold invalid UTF-8 into binary columns.

    ClickHouse ``String`` is bytes; Arrow ``string`` promises UTF-8.  Reading a dead letter's
    raw bytes as ``string`` would break any consumer that decodes it, so such a column is
    returned as ``binary``, byte for byte.
    """
    for index, field_ in enumerate(table.schema):
        if not pa.types.is_string(field_.type):
            continue
        try:
            for chunk in table.column(index).chunks:
                chunk.validate(full=True)
        except pa.ArrowInvalid:
            binary = table.column(index).cast(pa.binary())
            table = table.set_column(index, field_.with_type(pa.binary()), binary)
    return table

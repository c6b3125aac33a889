"""The Kafka source: a consumer group read in micro-batches, one partition per batch.

What the pipeline relies on (SPEC §2):

* **Offset order per partition.**  Every :class:`RawBatch` holds consecutive messages of one
  partition; the next batch of that partition starts where the previous one ended.
* **Replayable cuts.**  Where a batch ends depends on timing (how much had arrived when it
  was due), so every cut is written to the :class:`BatchJournal` and fsynced *before* the
  batch is handed on.  A restart resumes each partition at its checkpointed position and
  first reproduces exactly the journaled cuts from there, whatever ``max_records`` is now;
  the sink's insert tokens, which name batches by offset range, then match.
* **Offsets are ours.**  ``enable.auto.commit`` is off; the pipeline commits through
  :meth:`KafkaSource.commit` once its checkpoint is durable, and an assigned partition is
  sought to the pipeline's own position (``resume``), the group's committed offset only
  when the pipeline has none.
* **Rebalances between batches.**  Rebalance callbacks run inside ``poll``, which this
  source calls only between batches, so ``on_revoke`` can checkpoint the partitions that
  are about to go while nothing is half-processed.  Buffered, not yet yielded messages of
  those partitions are dropped; their next owner reads them from the committed offset.

Payloads: one JSON event per message, or several newline-delimited events per message.
A record is a line of a message: record offset = message offset, ``seq`` = index of the
line within the message.  A trailing newline ends the last line (it adds no empty record);
an empty or null message value is one empty record (the decoder makes it a dead letter).

The batch buffer is built without a Python object per event: the message values of one
``consume`` call are joined once, a newline is added after each message that lacks one
(so records are adjacent lines, the decoder's fast path), and the record bounds come from
one vectorised search for ``\\n``.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from gpu_pipeline.config import redact
from gpu_pipeline.errors import ConfigError, SourceError
from gpu_pipeline.secrets import KAFKA_PASSWORD, KAFKA_SSL_KEY_PASSWORD, read_secret
from gpu_pipeline.sources.base import RawBatch, Source
from gpu_pipeline.state.journal import BatchJournal
from gpu_pipeline.state.store import is_url

if TYPE_CHECKING:
    from gpu_pipeline.config import RunConfig

log = logging.getLogger(__name__)

_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_NEWLINE = 10
_DRAIN_MESSAGES = 20_000
"""Messages taken from the client's queue per ``consume`` call once one has arrived."""
_TIMESTAMP_MS = operator.itemgetter(1)
"""``Message.timestamp()`` is ``(type, epoch ms)``."""
_POLL_S = 0.1
"""Longest wait inside the client, so that ``stop()`` and wait deadlines are noticed."""
_JOIN_GRACE_MS = 30_000
_SHARED_JOIN_GRACE_MS = 12_000
"""``until_idle`` waits at least this long for a first assignment (a group join is slow)."""
_METADATA_TIMEOUT_S = 10.0
_COMMIT_ATTEMPTS = 3


# ---------------------------------------------------------------------------- the URL


def parse_kafka_url(url: str, option: str = "source") -> tuple[str, str, dict[str, str]]:
    """``kafka://HOST:PORT/TOPIC[?property=value&...]`` -> (bootstrap, topic, properties).

    The query string passes client properties through (for example
    ``?group.protocol=classic`` for a broker older than Kafka 4.0, or
    ``?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&sasl.username=U&ssl.ca.location=CA``);
    the SASL password comes from the environment (:func:`client_properties`), not the URL.

    Raises
    ------
    ConfigError
        Naming ``option``, when the URL is not of that form or the topic name is invalid
        (the message shows the URL with any password replaced by ``***``).
    """
    parts = urlsplit(str(url))
    try:
        port = parts.port
    except ValueError:
        port = None
    topic = parts.path.strip("/")
    if parts.scheme != "kafka" or not parts.hostname or port is None or not topic:
        raise ConfigError(option, f"expected kafka://HOST:PORT/TOPIC, got {_redact(url)!r}")
    if not _TOPIC_RE.fullmatch(topic) or topic in (".", ".."):
        raise ConfigError(
            option, f"{topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-')"
        )
    properties = dict(parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.hostname}:{port}", topic, properties


def _redact(url: str) -> str:
    return redact(str(url))


# ---------------------------------------------------------------------------- security

_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
"""SASL mechanisms that authenticate with ``sasl.username`` and ``sasl.password``."""
_CONNECTION_PREFIXES = (
    "security.",
    "sasl.",
    "ssl.",
    "ssl_",
    "enable.ssl.",
    "socket.",
    "client.",
    "broker.address.",
    "reconnect.backoff",
    "connections.max.idle.ms",
    "debug",
)
"""librdkafka properties about *how to connect* (TLS, SASL, sockets, client id): what the
source URL's other clients (the dead-letter producer, admin calls) must share with it."""


def connection_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The connection properties among ``properties`` (see ``_CONNECTION_PREFIXES``).

    A source URL carries consumer properties too (``group.protocol``, ``session.timeout.ms``),
    which a producer or admin client of the same cluster must not get.
    """
    return {k: v for k, v in properties.items() if k.startswith(_CONNECTION_PREFIXES)}


def client_properties(
    properties: dict[str, Any],
    option: str = "source",
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``properties`` completed with the secrets a URL should not carry.

    With ``security.protocol=SASL_SSL`` (or ``SASL_PLAINTEXT``) and a password mechanism
    (``sasl.mechanism`` PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512), ``sasl.password`` comes from
    ``GPU_PIPELINE_KAFKA_PASSWORD`` or the file named by ``GPU_PIPELINE_KAFKA_PASSWORD_FILE``
    unless the URL sets it; ``ssl.key.password`` likewise from
    ``GPU_PIPELINE_KAFKA_SSL_KEY_PASSWORD[_FILE]`` when a client key is named.

    Raises
    ------
    ConfigError
        Naming ``option`` when SASL needs a password and none is set, or naming the
        variable when its secret file cannot be read.
    """
    completed = dict(properties)
    protocol = str(completed.get("security.protocol", "plaintext")).upper()
    mechanism = str(
        completed.get("sasl.mechanisms", completed.get("sasl.mechanism", "GSSAPI"))
    ).upper()
    if (
        protocol.startswith("SASL_")
        and mechanism in _PASSWORD_MECHANISMS
        and "sasl.password" not in completed
    ):
        password = read_secret(KAFKA_PASSWORD, environ)
        if password is None:
            raise ConfigError(
                option,
                f"security.protocol={protocol} with sasl.mechanism={mechanism} needs a "
                f"password: set {KAFKA_PASSWORD}, or {KAFKA_PASSWORD}_FILE "
                "to a file holding it (e.g. a Docker secret under /run/secrets/)",
            )
        completed["sasl.password"] = password
    if "ssl.key.location" in completed and "ssl.key.password" not in completed:
        key_password = read_secret(KAFKA_SSL_KEY_PASSWORD, environ)
        if key_password is not None:
            completed["ssl.key.password"] = key_password
    return completed


CLIENT_LOG = logging.getLogger("gpu_pipeline.kafka.client")
"""librdkafka's own log lines (retries, connection failures) go through Python logging, so
that ``--log-format json`` keeps stderr all JSON; served by the clients' ``poll``."""


class ClientErrors:
    """A client's ``error_cb``: remembers the last error and the first one that retrying
    cannot fix (failed authentication, a failed TLS handshake, the wrong security protocol
    for the listener), so that a misconfigured client fails at once, naming the cause,
    instead of retrying until a timeout.  librdkafka calls it from ``poll``."""

    def __init__(self) -> None:
        self.last = ""
        self.permanent: KafkaError | None = None
        self.fatal: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        self.last = error.str()
        if error.fatal() and self.fatal is None:
            self.fatal = error
        if self.permanent is None and is_connect_failure(error):
            self.permanent = error

    def explain(self) -> str | None:
        """Why connecting failed for good, for an error message; None if it did not."""
        return None if self.permanent is None else explain_connect_failure(self.permanent)


def is_connect_failure(error: KafkaError) -> bool:
    """Whether ``error`` says the client's security settings do not fit the broker."""
    if error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
        return True
    # librdkafka's own hint, e.g. a PLAINTEXT client on a TLS listener.
    return "incorrect security.protocol" in error.str()


def explain_connect_failure(error: KafkaError) -> str:
    """A message for :func:`is_connect_failure` errors: what failed and what to check."""
    text = error.str()
    if error.code() == KafkaError._AUTHENTICATION:
        return (
            f"Kafka authentication failed ({text}); check sasl.mechanism and sasl.username in "
            f"the URL and the password in {KAFKA_PASSWORD} or "
            f"{KAFKA_PASSWORD}_FILE"
        )
    if error.code() == KafkaError._SSL:
        hint = (
            "set ssl.ca.location in the URL to the CA certificate that signed the broker's "
            "certificate"
            if "certificate" in text
            else "check the ssl.* properties in the URL"
        )
        return f"TLS with the Kafka broker failed ({text}); {hint}"
    return f"cannot talk to the Kafka broker ({text}); check security.protocol in the URL"


def list_topics_checked(
    client: Any,
    errors: ClientErrors,
    *,
    topic: str | None,
    timeout_s: float,
    fail: Callable[[str], Exception],
) -> Any:
    """``client.list_topics`` (an AdminClient or Producer built with ``errors`` as its
    ``error_cb``) in short tries, serving the error callback between them: a permanent
    connection failure raises ``fail(message)`` within about a second, not at ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return client.list_topics(topic=topic, timeout=max(0.1, min(1.0, left)))
        except KafkaException as exc:
            client.poll(0)
            why = errors.explain()
            if why is not None:
                raise fail(why) from None
            if time.monotonic() >= deadline:
                last = f" (last client error: {errors.last})" if errors.last else ""
                raise fail(
                    f"no answer within {timeout_s:.0f} s: {exc}{last}; is the broker up, and "
                    "does security.protocol in the URL match its listener?"
                ) from None


# ---------------------------------------------------------------------------- framing


@dataclass
class _Chunk:
    """Consecutive messages of one partition, framed as newline-terminated records.

    Message ``i`` occupies ``buf[msg_ends[i-1]:msg_ends[i]]`` (its last byte is ``\\n``) and
    holds records ``rec_cum[i-1]:rec_cum[i]``; record ``r`` is ``buf[starts[r]:ends[r]]``.
    ``cursor`` counts the messages already handed out in batches.
    """

    buf: bytes
    offsets: np.ndarray
    msg_ends: np.ndarray
    rec_cum: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    rec_msg: np.ndarray
    seqs: np.ndarray
    arrived: float
    timestamps: np.ndarray | None = None
    """Message timestamps in epoch ms (0: none), one per message."""
    cursor: int = 0

    @property
    def messages(self) -> int:
        return int(self.offsets.shape[0])

    def byte_at(self, message: int) -> int:
        return int(self.msg_ends[message - 1]) if message else 0

    def record_at(self, message: int) -> int:
        return int(self.rec_cum[message - 1]) if message else 0


def frame_messages(
    values: list[bytes],
    offsets: np.ndarray,
    arrived: float = 0.0,
    timestamps: np.ndarray | None = None,
) -> _Chunk:
    """Frame message values as records (see the module docstring), vectorised.

    ``values`` are the message values (``b""`` for a null value), ``offsets`` their offsets,
    ``timestamps`` their message timestamps (epoch ms, 0 for none).
    """
    count = len(values)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=count)
    raw_ends = np.cumsum(lengths)
    joined = b"".join(values)
    data = np.frombuffer(joined, dtype=np.uint8)
    ends_with_newline = np.zeros(count, dtype=bool)
    filled = lengths > 0
    ends_with_newline[filled] = data[raw_ends[filled] - 1] == _NEWLINE
    needs = ~ends_with_newline
    if needs.all():
        buf = b"\n".join(values) + b"\n"
    elif not needs.any():
        buf = joined
    else:
        buf = np.insert(data, raw_ends[needs], _NEWLINE).tobytes()
    msg_ends = raw_ends + np.cumsum(needs)
    newlines = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == _NEWLINE).astype(np.int64)
    starts = np.empty_like(newlines)
    if newlines.shape[0]:
        starts[0] = 0
        starts[1:] = newlines[:-1] + 1
    if newlines.shape[0] == count:  # one record per message: the common case
        rec_msg = np.arange(count, dtype=np.int64)
        seqs = np.zeros(count, dtype=np.int32)
        rec_cum = rec_msg + 1
    else:
        rec_msg = np.searchsorted(msg_ends, newlines, side="right").astype(np.int64)
        rec_cum = np.searchsorted(newlines, msg_ends, side="left").astype(np.int64)
        first_record = np.concatenate([[0], rec_cum[:-1]]).astype(np.int64)
        seqs = (np.arange(newlines.shape[0], dtype=np.int64) - first_record[rec_msg]).astype(
            np.int32
        )
    return _Chunk(
        buf=buf,
        offsets=np.asarray(offsets, dtype=np.int64),
        msg_ends=msg_ends,
        rec_cum=rec_cum,
        starts=starts,
        ends=newlines,
        rec_msg=rec_msg,
        seqs=seqs,
        arrived=arrived,
        timestamps=timestamps,
    )


@dataclass
class _Piece:
    """Messages ``[lo, hi)`` of one chunk, as they go into a batch."""

    chunk: _Chunk
    lo: int
    hi: int


def assemble_batch(partition: int, pieces: list[_Piece], source: str, next_offset: int) -> RawBatch:
    """One :class:`RawBatch` from consecutive pieces (one copy of their bytes at most)."""
    buffers: list[bytes | memoryview] = []
    starts, ends, offsets, seqs, stamps = [], [], [], [], []
    base = 0
    for piece in pieces:
        chunk = piece.chunk
        b0, b1 = chunk.byte_at(piece.lo), chunk.byte_at(piece.hi)
        r0, r1 = chunk.record_at(piece.lo), chunk.record_at(piece.hi)
        whole = b0 == 0 and b1 == len(chunk.buf)
        buffers.append(chunk.buf if whole else memoryview(chunk.buf)[b0:b1])
        starts.append(chunk.starts[r0:r1] - b0 + base)
        ends.append(chunk.ends[r0:r1] - b0 + base)
        offsets.append(chunk.offsets[chunk.rec_msg[r0:r1]])
        seqs.append(chunk.seqs[r0:r1])
        times = chunk.timestamps
        stamps.append(np.zeros(r1 - r0, np.int64) if times is None else times[chunk.rec_msg[r0:r1]])
        base += b1 - b0
    first = buffers[0]
    buffer = first if len(buffers) == 1 and isinstance(first, bytes) else b"".join(buffers)
    return RawBatch(
        partition=partition,
        buffer=buffer,
        starts=np.concatenate(starts),
        ends=np.concatenate(ends),
        offsets=np.concatenate(offsets),
        seqs=np.concatenate(seqs),
        source=source,
        next_offset=next_offset,
        timestamps=np.concatenate(stamps),
    )


# ---------------------------------------------------------------------------- partitions


@dataclass
class _Partition:
    """What the source knows about one assigned partition.

    ``position`` is where the next batch starts (``None`` until known: then the first
    message tells); ``fetched`` the next offset the client will deliver; ``plan`` the
    journaled cuts still to reproduce.
    """

    position: int | None
    plan: deque[int] = field(default_factory=deque)
    chunks: deque[_Chunk] = field(default_factory=deque)
    fetched: int | None = None
    high: int = -1
    at_end: bool = False
    records: int = 0
    bytes: int = 0
    quiet_since: float = field(default_factory=time.monotonic)

    def add(self, chunk: _Chunk) -> None:
        self.quiet_since = time.monotonic()
        self.chunks.append(chunk)
        self.records += int(chunk.rec_cum[-1])
        self.bytes += int(chunk.msg_ends[-1])
        self.fetched = int(chunk.offsets[-1]) + 1
        self.high = max(self.high, self.fetched)
        self.at_end = False

    def oldest_arrival(self) -> float | None:
        return self.chunks[0].arrived if self.chunks else None

    def messages_within(self, max_records: int, max_bytes: int) -> int:
        """How many buffered messages fit in ``max_records`` records and ``max_bytes`` bytes
        (at least one: a message is never split)."""
        taken = records = size = 0
        for chunk in self.chunks:
            c = chunk.cursor
            r0, b0 = chunk.record_at(c), chunk.byte_at(c)
            fit_r = int(np.searchsorted(chunk.rec_cum, r0 + max_records - records, "right")) - c
            fit_b = int(np.searchsorted(chunk.msg_ends, b0 + max_bytes - size, "right")) - c
            fit = min(fit_r, fit_b)
            if fit < chunk.messages - c:
                taken += fit
                break
            taken += chunk.messages - c
            records += int(chunk.rec_cum[-1]) - r0
            size += int(chunk.msg_ends[-1]) - b0
        return max(taken, 1)

    def messages_below(self, offset: int) -> int:
        """How many buffered messages have an offset below ``offset``."""
        taken = 0
        for chunk in self.chunks:
            c = chunk.cursor
            below = max(int(np.searchsorted(chunk.offsets, offset, "left")) - c, 0)
            taken += below
            if below < chunk.messages - c:
                break
        return taken

    def take(self, messages: int) -> tuple[list[_Piece], int]:
        """Remove the first ``messages`` buffered messages: their pieces and last offset."""
        pieces: list[_Piece] = []
        last = -1
        while messages:
            chunk = self.chunks[0]
            hi = min(chunk.cursor + messages, chunk.messages)
            pieces.append(_Piece(chunk, chunk.cursor, hi))
            messages -= hi - chunk.cursor
            self.records -= chunk.record_at(hi) - chunk.record_at(chunk.cursor)
            self.bytes -= chunk.byte_at(hi) - chunk.byte_at(chunk.cursor)
            last = int(chunk.offsets[hi - 1])
            chunk.cursor = hi
            if hi == chunk.messages:
                self.chunks.popleft()
        return pieces, last


# ---------------------------------------------------------------------------- the source


CommittedPolicy = Literal["resume", "refuse", "earliest"]


class KafkaSource(Source):
    """A Kafka topic read by a consumer group, as replayable per-partition micro-batches.

    Parameters
    ----------
    bootstrap, topic, group_id
        Where to read and as which consumer group.
    journal
        Durable record of every cut (see the module docstring).
    resume
        Partition -> the pipeline's next offset for it from its checkpoint, or None (then
        ``committed_offsets`` decides).
    committed_offsets
        What a partition that ``resume`` knows nothing about starts from when the group has
        a committed offset for it: ``resume`` from it; ``refuse`` (the pipeline: offsets
        committed by a run whose state is not here, so resuming would continue with empty
        dedup, session and window state, losing exactly-once) raises a SourceError;
        ``earliest`` ignores it (``--fresh``).  Without a committed offset a partition
        starts at its earliest offset.
    on_revoke
        Called with the partitions about to be revoked (or lost), before they go and
        between batches: the pipeline checkpoints them then.  Not called by :meth:`close`.
    max_bytes, max_wait_ms
        A batch holds at most ``max_bytes`` bytes of messages (at least one message), and a
        partly filled batch is handed on once its first message has waited ``max_wait_ms``.
    until_idle, idle_timeout_ms
        End once every assigned partition has been at its end for ``idle_timeout_ms``.
    consumer_config
        librdkafka properties that override the defaults.  The default is the classic
        group protocol with the ``cooperative-sticky`` assignor (only partitions that change
        owner pause) and a 10 s session timeout.  KIP-848's ``group.protocol=consumer``
        joins faster, but a member killed with SIGKILL keeps its partitions for the
        broker's session timeout (45 s) and a static member cannot rejoin before it ends,
        so a crashed pipeline would wait that long; with the classic protocol a static
        member (:meth:`from_config`) is back at once.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        *,
        journal: BatchJournal,
        resume: Callable[[int], int | None],
        on_revoke: Callable[[list[int]], None] | None,
        max_bytes: int,
        max_wait_ms: int,
        until_idle: bool,
        idle_timeout_ms: int,
        consumer_config: dict[str, Any] | None = None,
        idle_partition_timeout_ms: int = 0,
        committed_offsets: CommittedPolicy = "resume",
        shares_group: bool = False,
    ) -> None:
        _require(bool(group_id), "group_id", "must not be empty")
        _require(
            committed_offsets in ("resume", "refuse", "earliest"),
            "committed_offsets",
            f"must be resume, refuse or earliest, got {committed_offsets!r}",
        )
        self.committed_offsets = committed_offsets
        self.shares_group = shares_group
        self.group_id = group_id
        _require(max_bytes > 0, "max_batch_bytes", f"must be positive, got {max_bytes}")
        _require(max_wait_ms >= 0, "max_batch_wait_ms", f"must be >= 0, got {max_wait_ms}")
        _require(idle_timeout_ms >= 0, "idle_timeout_ms", f"must be >= 0, got {idle_timeout_ms}")
        self.topic = topic
        self.name = f"kafka:{topic}"
        self.journal = journal
        self._resume = resume
        self._on_revoke = on_revoke
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_ms / 1000
        self.until_idle = until_idle
        self.bounded = until_idle  # only a --until-idle run ends by itself (then it flushes)
        self.idle_timeout_s = idle_timeout_ms / 1000
        _require(
            idle_partition_timeout_ms >= 0,
            "idle_partition_timeout_ms",
            f"must be >= 0, got {idle_partition_timeout_ms}",
        )
        self.idle_partition_timeout_s = idle_partition_timeout_ms / 1000
        config = _consumer_config(bootstrap, group_id, consumer_config or {})
        self._cooperative = _is_cooperative(config)
        self.consumer_config = dict(config)
        self._errors = ClientErrors()
        try:
            self._consumer = Consumer({**config, "error_cb": self._errors, "logger": CLIENT_LOG})
        except KafkaException as exc:
            raise ConfigError(
                "source", f"the Kafka client rejected its configuration: {exc}"
            ) from None
        self._parts: dict[int, _Partition] = {}
        self._start: dict[int, int] = {}
        self._stop = threading.Event()
        self._closing = False
        self._closed = False
        self._subscribed = False
        self._ever_assigned = False
        self._last_activity = time.monotonic()
        self._last_error = ""

    @classmethod
    def from_config(
        cls,
        config: RunConfig,
        *,
        job_id: str = "",
        journal: BatchJournal,
        resume: Callable[[int], int | None],
        on_revoke: Callable[[list[int]], None] | None,
        member: int | None = None,
    ) -> KafkaSource:
        """The source named by ``config.source`` (``kafka://HOST:PORT/TOPIC[?prop=value]``).

        Joins the group as a static member (:func:`static_instance_id`) unless the URL
        chooses ``group.protocol=consumer`` or its own ``group.instance.id``.  ``member``
        numbers the consumer among a cluster run's consumers of the job: each is its own
        static member, and a consumer task rerun on another worker after its worker died
        rejoins under the dead one's name and takes its partitions back at once.  In a
        bounded (``--until-idle``) cluster run the consumers are dynamic members instead: one
        that is done leaves the group at once, so the others need not wait out its session
        timeout, while a dead one's partitions move once its session (10 s) times out.
        """
        from gpu_pipeline.runtime.job import consumer_group
        from gpu_pipeline.runtime.job import job_id as job_id_of

        bootstrap, topic, properties = parse_kafka_url(config.source, "source")
        job_id = job_id or job_id_of(config)
        config = replace(config, group_id=consumer_group(config, job_id))
        classic = str(properties.get("group.protocol", "classic")).lower() == "classic"
        # A static member does not leave the group when it closes, so the others wait out
        # its session timeout before they rebalance: right for a process that restarts,
        # wrong for a cluster consumer of a bounded (--until-idle) job that is done.
        bounded_member = member is not None and config.until_idle
        if classic and not bounded_member:
            properties.setdefault("group.instance.id", static_instance_id(config, job_id, member))
        return cls(
            bootstrap,
            topic,
            config.group_id,
            journal=journal,
            resume=resume,
            on_revoke=on_revoke,
            max_bytes=config.max_batch_bytes,
            max_wait_ms=config.max_batch_wait_ms,
            until_idle=config.until_idle,
            idle_timeout_ms=config.idle_timeout_ms,
            idle_partition_timeout_ms=config.idle_partition_timeout_ms,
            consumer_config=properties,
            committed_offsets="earliest" if config.fresh else "refuse",
            shares_group=member is not None,
        )

    # ------------------------------------------------------------------ batches

    def batches(self, max_records: int, start: dict[int, int]) -> Iterator[RawBatch]:
        """Yield batches until stopped, or (``until_idle``) until every partition is idle.

        ``start`` gives positions for partitions that ``resume`` knows nothing about.
        """
        if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {max_records!r}")
        if self._closed:
            raise SourceError("this Kafka source is closed; open a new one")
        self._start = dict(start)
        if not self._subscribed:
            self._consumer.subscribe(
                [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
            self._subscribed = True
            self._last_activity = time.monotonic()
        while not self._stop.is_set():
            for batch in self._ready(max_records):
                yield batch
                if self._stop.is_set():
                    return
            yield from self._idle_ticks()
            if self.until_idle and self._idle():
                return
            self._poll(self._poll_timeout())

    def _ready(self, max_records: int) -> Iterator[RawBatch]:
        """Cut every batch that is due now, journaling each just before it is yielded."""
        now = time.monotonic()
        for partition in sorted(self._parts):
            part = self._parts.get(partition)
            while part is not None and part is self._parts.get(partition):
                batch = self._cut(partition, part, max_records, now)
                if batch is None:
                    break
                yield batch

    def _idle_ticks(self) -> Iterator[RawBatch]:
        """The opt-in idle policy: an empty batch for each partition quiet for the timeout.

        It carries the wall clock, so the pipeline can advance that partition's watermark
        and close its windows and sessions without new data (freshness over determinism:
        when the tick comes depends on wall-clock time, so a replay may differ).
        """
        if self.idle_partition_timeout_s <= 0:
            return
        now = time.monotonic()
        for partition in sorted(self._parts):
            part = self._parts.get(partition)
            if part is None or part.position is None or part.chunks or part.plan:
                continue
            if not part.at_end or now - part.quiet_since < self.idle_partition_timeout_s:
                continue
            part.quiet_since = now
            empty = np.zeros(0, dtype=np.int64)
            yield RawBatch(
                partition=partition,
                buffer=b"",
                starts=empty,
                ends=empty,
                offsets=empty,
                seqs=np.zeros(0, dtype=np.int32),
                source=self.name,
                next_offset=part.position,
                idle_clock_ms=int(time.time() * 1000),
            )

    def _cut(
        self, partition: int, part: _Partition, max_records: int, now: float
    ) -> RawBatch | None:
        if part.position is None:
            return None
        if part.plan:
            return self._cut_planned(partition, part)
        if not part.chunks:
            return None
        full = part.records >= max_records or part.bytes >= self.max_bytes
        oldest = part.oldest_arrival()
        waited = oldest is not None and now - oldest >= self.max_wait_s
        if not (full or waited or (self.until_idle and part.at_end)):
            return None
        count = part.messages_within(max_records, self.max_bytes)
        pieces, last = part.take(count)
        first, part.position = part.position, last + 1
        self.journal.record(partition, first, last + 1)
        return assemble_batch(partition, pieces, self.name, last + 1)

    def _cut_planned(self, partition: int, part: _Partition) -> RawBatch | None:
        """Reproduce the next journaled cut once every message below it has arrived."""
        target = part.plan[0]
        if part.fetched is None or part.fetched < target:
            return None
        count = part.messages_below(target)
        part.plan.popleft()
        part.position = target
        if count == 0:  # the range holds no message any more (retention, compaction)
            return None
        pieces, _ = part.take(count)
        return assemble_batch(partition, pieces, self.name, target)

    def _idle(self) -> bool:
        idle_for = time.monotonic() - self._last_activity
        if not self._parts:
            if self._ever_assigned:
                return idle_for >= self.idle_timeout_s
            # a cluster run's client checks that every partition was finished, and runs
            # its consumers again if not: one the group gives nothing need not wait long
            grace_ms = _SHARED_JOIN_GRACE_MS if self.shares_group else _JOIN_GRACE_MS
            if idle_for < max(self.idle_timeout_s, grace_ms / 1000):
                return False
            if self.shares_group:
                # one of a cluster run's consumers, and the others hold every partition
                log.info(
                    "no partition of %r was assigned to this consumer within %.0f s: the "
                    "group's other consumers hold them all",
                    self.topic,
                    idle_for,
                )
                return True
            # A bounded run that read nothing must not look complete (it would flush).
            raise SourceError(
                f"no partition of topic {self.topic!r} was assigned to this consumer within "
                f"{idle_for:.0f} s (last client error: {self._last_error or 'none'}); does "
                "the topic exist, and do other members of the group hold every partition?"
            )
        if idle_for < self.idle_timeout_s:
            return False
        for partition, part in self._parts.items():
            if part.chunks or not part.at_end:
                return False
            if part.plan:
                raise SourceError(
                    f"the batch journal says partition {partition} of {self.topic!r} was read up "
                    f"to offset {part.plan[-1]}, but it now ends at {part.fetched}: the topic was "
                    "deleted or recreated; run with --fresh to start this job over"
                )
        return True

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = _POLL_S
        for part in self._parts.values():
            oldest = part.oldest_arrival()
            if oldest is not None and not part.plan:
                timeout = min(timeout, max(0.0, oldest + self.max_wait_s - now))
        return timeout

    def _poll(self, timeout: float) -> None:
        """Take what has arrived: one message (waiting up to ``timeout``), then the queue.

        The first message is filed before the queue is drained: a rebalance served while
        draining then drops it with its partition's buffer if its partition is revoked.
        """
        first = self._consumer.poll(timeout)
        self._check_client_errors()
        if first is None:
            return
        self._file([first])
        more = self._consumer.consume(_DRAIN_MESSAGES, 0)
        if more:
            self._file(more)

    def _check_client_errors(self) -> None:
        """Act on what the client's error callback saw during the last poll.

        A fatal error ends the run.  Failed authentication or a failed TLS handshake ends
        it too while the consumer has never had an assignment (a misconfigured client,
        which no retry fixes); later, with a broker restarting for example, they are
        logged and the client retries.
        """
        errors = self._errors
        if errors.fatal is not None:  # librdkafka reports these as consumer errors too
            raise SourceError(
                f"the Kafka consumer of {self.topic!r} failed: {errors.fatal.str()} (a fenced "
                "static member means another process runs this job with the same checkpoint "
                "directory)"
            )
        permanent, errors.permanent = errors.permanent, None
        if permanent is not None:
            why = explain_connect_failure(permanent)
            if not self._ever_assigned:
                raise SourceError(f"cannot consume {self.topic!r}: {why}")
            if why != self._last_error:
                log.warning("Kafka consumer of %r: %s (the client retries)", self.topic, why)
                self._last_error = why
        elif errors.last and errors.last != self._last_error:
            self._last_error = errors.last

    def _file(self, messages: list[Message]) -> None:
        """Sort delivered messages into the partitions' buffers, then apply client events.

        Events come after messages: an end-of-partition event counts only if no message
        of its partition followed it.
        """
        now = time.monotonic()
        errors = list(map(Message.error, messages))
        events: list[Message] = []
        # Identity tests only: KafkaError == None leaves a stray TypeError set in the client.
        if any(map(operator.is_not, errors, repeat(None))):
            events = [m for m, e in zip(messages, errors, strict=True) if e is not None]
            messages = [m for m, e in zip(messages, errors, strict=True) if e is None]
        if messages:
            self._last_activity = now
            partitions = np.fromiter(map(Message.partition, messages), np.int64, len(messages))
            if (partitions == partitions[0]).all():
                self._file_partition(int(partitions[0]), messages, now)
            else:
                for partition in np.unique(partitions).tolist():
                    picked = np.flatnonzero(partitions == partition).tolist()
                    self._file_partition(partition, [messages[i] for i in picked], now)
        for event in events:
            self._event(event)

    def _file_partition(self, partition: int, messages: list[Message], now: float) -> None:
        part = self._parts.get(partition)
        if part is None:
            return  # revoked while in flight
        offsets = np.fromiter(map(Message.offset, messages), np.int64, len(messages))
        if part.fetched is not None and offsets[0] < part.fetched:
            fresh = np.flatnonzero(offsets >= part.fetched)
            if not fresh.shape[0]:
                return
            messages = [messages[i] for i in fresh.tolist()]
            offsets = offsets[fresh]
        raw = list(map(Message.value, messages))
        values = [b"" if v is None else v for v in raw] if None in raw else cast(list[bytes], raw)
        stamps = np.fromiter(
            map(_TIMESTAMP_MS, map(Message.timestamp, messages)), np.int64, len(messages)
        )
        np.maximum(stamps, 0, out=stamps)  # TIMESTAMP_NOT_AVAILABLE is -1: none
        if part.position is None:
            self._place(partition, part, int(offsets[0]))
        part.add(frame_messages(values, offsets, now, stamps))

    def _place(self, partition: int, part: _Partition, position: int) -> None:
        """Learn a partition's position late (its offset lookup had failed)."""
        part.position = position
        part.plan = deque(self.journal.planned(partition, position))

    def _event(self, event: Message) -> None:
        error = event.error()
        if error is None:
            return
        if error.code() == KafkaError._PARTITION_EOF:
            part = self._parts.get(event.partition() or 0)
            offset = event.offset()
            if part is None or offset is None:
                return
            part.high = max(part.high, offset)
            if part.fetched is None or offset >= part.fetched:
                part.at_end = True
                part.fetched = offset
                if part.position is None:
                    self._place(event.partition() or 0, part, offset)
            return
        if error.fatal() or error.code() in (KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID):
            raise SourceError(
                f"the Kafka consumer of {self.topic!r} failed: {error.str()} (a fenced static "
                "member means another process runs this job with the same checkpoint directory)"
            )
        text = error.str()
        if text != self._last_error:
            log.warning("Kafka consumer of %r: %s (the client retries)", self.topic, text)
            self._last_error = text

    # ------------------------------------------------------------------ rebalances

    def _position_of(self, partition: int) -> int | None:
        resumed = self._resume(partition)
        if resumed is not None:
            return int(resumed)
        return self._start.get(partition)

    def _look_up_positions(self, consumer: Consumer, partitions: list[int]) -> dict[int, int]:
        """The group's committed offsets, else the earliest offsets; what could be learned."""
        found: dict[int, int] = {}
        if not partitions:
            return found
        try:
            committed = consumer.committed(
                [TopicPartition(self.topic, p) for p in partitions], timeout=_METADATA_TIMEOUT_S
            )
        except KafkaException as exc:
            log.warning("cannot read committed offsets of %r: %s", self.topic, exc)
            return found
        for tp in committed:
            if tp.error is None and tp.offset >= 0 and self.committed_offsets != "earliest":
                found[tp.partition] = tp.offset
        if found and self.committed_offsets == "refuse":
            listed = ", ".join(f"{p} at offset {o}" for p, o in sorted(found.items()))
            raise SourceError(
                f"consumer group {self.group_id!r} has committed offsets for partitions of "
                f"{self.topic!r} ({listed}) but this process has no checkpoint for them: "
                "resuming there would continue with empty dedup, session and window state and "
                "lose exactly-once. Point --checkpoint-dir at the job's checkpoints, or run "
                "with --fresh to start the job over from the earliest offsets"
            )
        for partition in partitions:
            if partition in found:
                continue
            try:
                marks = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=_METADATA_TIMEOUT_S
                )
            except KafkaException as exc:
                log.warning("cannot read the offsets of %r [%d]: %s", self.topic, partition, exc)
                continue
            if marks is not None and marks[0] >= 0:
                found[partition] = marks[0]
        return found

    def _assigned(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Seek each new partition to the pipeline's position and load its journaled cuts."""
        self._last_activity = time.monotonic()
        # an empty assignment (the first round of a cooperative rebalance) is not yet one:
        # the member gets its share in the next round
        self._ever_assigned = self._ever_assigned or bool(assigned)
        positions = {tp.partition: self._position_of(tp.partition) for tp in assigned}
        unknown = [p for p, position in positions.items() if position is None]
        positions.update(self._look_up_positions(consumer, unknown))
        for tp in assigned:
            position = positions[tp.partition]
            part = _Partition(position=None, fetched=position)
            if position is not None:
                self._place(tp.partition, part, position)
            self._parts[tp.partition] = part
            tp.offset = position if position is not None else OFFSET_STORED
        if self._cooperative:
            consumer.incremental_assign(assigned)
        else:
            consumer.assign(assigned)

    def _revoked(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Drop what was buffered, let the pipeline checkpoint, then let the partitions go.

        The partitions stay owned during ``on_revoke``, so :meth:`commit` still works there.
        Revocations by :meth:`close` do not call ``on_revoke``: after an error the
        pipeline's state may be half-updated and must not be checkpointed.
        """
        partitions = sorted(tp.partition for tp in revoked)
        for partition in partitions:
            part = self._parts.get(partition)
            if part is not None:
                part.chunks.clear()
        if self._on_revoke is not None and not self._closing and partitions:
            self._on_revoke(partitions)
        self._forget(consumer, revoked)

    def _lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        """Partitions taken away without a revocation (the group expelled this member).

        They may have a new owner already, so they are forgotten *before* ``on_revoke``:
        the pipeline can still checkpoint its state, but :meth:`commit` skips them.
        """
        partitions = sorted(tp.partition for tp in lost)
        for partition in partitions:
            self._parts.pop(partition, None)
        if self._on_revoke is not None and not self._closing and partitions:
            self._on_revoke(partitions)
        self._forget(consumer, lost)

    def _forget(self, consumer: Consumer, gone: list[TopicPartition]) -> None:
        for tp in gone:
            self._parts.pop(tp.partition, None)
        self._last_activity = time.monotonic()
        if self._cooperative:
            consumer.incremental_unassign(gone)
        else:
            consumer.unassign()

    # ------------------------------------------------------------------ control

    def assignment(self) -> list[int]:
        """The partitions this consumer holds now."""
        return sorted(self._parts)

    def commit(self, positions: dict[int, int]) -> None:
        """Commit ``positions`` (partition -> next offset) synchronously, once checkpointed.

        Partitions this consumer does not hold are skipped: their new owner commits them,
        and a late commit from here would move its offset back.

        A commit that still fails with a retriable error (a broker restarting) after a few
        tries is logged and skipped: the checkpoint is durable already, so a restart still
        resumes exactly, and the next checkpoint commits newer offsets.

        Raises
        ------
        SourceError
            When the broker refuses the commit for good (authorization, a fenced member).
        """
        offsets = [
            TopicPartition(self.topic, p, int(offset))
            for p, offset in sorted(positions.items())
            if p in self._parts and offset >= 0
        ]
        if not offsets:
            return
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                result = self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is not None and error.code() in _REBALANCING:
                    _skip_commit_during_rebalance(self.topic, error)
                    return
                if error is None or not error.retriable():
                    raise SourceError(
                        f"committing offsets of {self.topic!r} failed: {exc}; the checkpoint "
                        "is durable, so a restart resumes from it"
                    ) from None
                if attempt < _COMMIT_ATTEMPTS:
                    time.sleep(0.5 * attempt)
                    continue
                # The checkpoint is durable: only the group's offsets lag until the next one.
                log.warning("committing offsets of %r failed, retried later: %s", self.topic, exc)
                return
            failed = [tp for tp in result or [] if tp.error is not None]
            errors = [tp.error for tp in failed if tp.error is not None]
            if errors and all(e.code() in _REBALANCING for e in errors):
                _skip_commit_during_rebalance(self.topic, errors[0])
                return
            if failed:
                raise SourceError(
                    f"committing offsets of {self.topic!r} failed for partitions "
                    f"{[tp.partition for tp in failed]}: {failed[0].error}"
                )
            return

    def lag(self) -> dict[int, int]:
        """Consumer lag per assigned partition: high watermark - the next batch's first offset.

        Uses the watermarks the client already knows (no broker round trip), so it is cheap
        enough to call after every batch; a partition whose watermark is not known yet is left out.
        """
        lags: dict[int, int] = {}
        for partition, part in self._parts.items():
            high = part.high
            try:
                marks = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), cached=True
                )
            except KafkaException:
                marks = None
            if marks is not None:
                high = max(high, marks[1])
            if high >= 0 and part.position is not None:
                lags[partition] = max(0, high - part.position)
        return lags

    def stop(self) -> None:
        """Make :meth:`batches` return after the current batch (thread-safe; for SIGTERM)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and close the client (does not call ``on_revoke``)."""
        if self._closed:
            return
        self._closing = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the Kafka consumer of %r: %s", self.topic, exc)
        self._closed = True
        self._parts.clear()


_REBALANCING = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)
"""Commit errors that mean the group is moving partitions: the commit is skipped."""


def _skip_commit_during_rebalance(topic: str, error: KafkaError) -> None:
    """The group rebalances under a commit: the checkpoint is durable, and whoever owns the
    partition next resumes from it (not from the group's offsets), so nothing is lost; the
    group's offsets lag until the next checkpoint's commit."""
    log.warning(
        "offsets of %r not committed: the consumer group is rebalancing (%s); the "
        "checkpoint is durable and the next one commits",
        topic,
        error.str(),
    )


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(option, message)


_OWN_PROPERTIES = (
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
)
"""Properties the source's guarantees rest on: set here, never overridden."""


def _consumer_config(bootstrap: str, group_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
    for key in overrides:
        if key in _OWN_PROPERTIES:
            raise ConfigError("source", f"the Kafka property {key!r} is set by gpu-pipeline itself")
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "group.protocol": "classic",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    }
    config.update(client_properties(overrides, "source"))
    if str(config["group.protocol"]).lower() == "classic":
        # Only the partitions that change owner pause; a dead member is noticed in 10 s.
        config.setdefault("partition.assignment.strategy", "cooperative-sticky")
        config.setdefault("session.timeout.ms", 10_000)
    return config


def _is_cooperative(config: dict[str, Any]) -> bool:
    """Whether rebalances hand over partitions incrementally (KIP-848 or cooperative-sticky)."""
    if str(config.get("group.protocol", "classic")).lower() == "consumer":
        return True
    return "cooperative-sticky" in str(config.get("partition.assignment.strategy", ""))


def static_instance_id(config: RunConfig, job_id: str = "", member: int | None = None) -> str:
    """A ``group.instance.id`` naming this pipeline: host, checkpoint directory, group and job.

    With it a pipeline that restarts after a crash takes its partitions back at once (a
    classic-protocol static member), and gets the same ones, so its local checkpoint is the
    one that matches them.  Two processes on one checkpoint directory would be one job run
    twice: the broker fences the older one.

    A cluster run's consumers (``member`` 0, 1, ...) share the job's checkpoint location and
    may run on any host, so their names are the group, the job and the member number only:
    a consumer task that dask reruns elsewhere after its worker died rejoins as the same
    member.
    """
    if member is not None:
        where = f"{config.group_id}|{job_id}"
        digest = hashlib.sha256(where.encode()).hexdigest()[:12]
        return f"gpu-pipeline-{digest}-m{member}"
    location = config.checkpoint_dir
    checkpoints = location if is_url(location) else Path(location).resolve()
    where = f"{socket.gethostname()}|{checkpoints}|{config.group_id}|{job_id}"
    digest = hashlib.sha256(where.encode()).hexdigest()[:12]
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60]
    return f"gpu-pipeline-{host}-{digest}"


__all__ = [
    "ClientErrors",
    "KafkaSource",
    "assemble_batch",
    "client_properties",
    "connection_properties",
    "explain_connect_failure",
    "frame_messages",
    "list_topics_checked",
    "parse_kafka_url",
    "static_instance_id",
]

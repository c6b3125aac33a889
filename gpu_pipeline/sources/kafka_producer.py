"""Writing to Kafka: the synthetic clickstream (``gpu-pipeline generate --out kafka://…``) and
the optional dead-letter topic.

The synthetic stream goes one event per message, keyed by ``user_id`` as a decimal string
(SPEC §1), so that every event of a user lands in one partition and that partition sees
them in arrival order: sessions and dedup are per partition.  A record that does not parse
as a JSON object with an integer ``user_id`` (the stream's deliberate dirt) keeps a null
key, and the client spreads those over the partitions.

Keys are hashed by librdkafka's default partitioner (``consistent_random``, CRC32), the
same as kcat's, so the two can feed one topic; the Java client uses murmur2 (see
docs/kafka.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from gpu_pipeline import schema
from gpu_pipeline.errors import ConfigError, SinkError
from gpu_pipeline.sources.kafka import (
    CLIENT_LOG,
    ClientErrors,
    client_properties,
    connection_properties,
    list_topics_checked,
    parse_kafka_url,
)
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks

DEFAULT_PARTITIONS = 4
_TIMEOUT_S = 30.0
_CHUNK_EVENTS = 20_000
_MAX_MESSAGE_BYTES = 10 << 20
"""The broker of deploy/kafka accepts 10 MiB records; librdkafka's own default is 1 MB."""
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 500_000,
    "compression.type": "lz4",
    "enable.idempotence": True,
    "message.max.bytes": _MAX_MESSAGE_BYTES,
    "delivery.report.only.error": True,
}


class _Deliveries:
    """Counts failed deliveries (reports arrive for failures only) and keeps the first error."""

    def __init__(self) -> None:
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = error.str()

    def check(self, topic: str) -> None:
        if self.failed:
            raise SinkError(
                f"{self.failed} message(s) to Kafka topic {topic!r} were not delivered; first "
                f"error: {self.first_error}"
            )


def _producer(
    bootstrap: str,
    deliveries: _Deliveries,
    extra: dict[str, Any],
    errors: ClientErrors,
    option: str = "out",
) -> Producer:
    """A producer with our defaults, ``extra`` (URL properties, secrets added) over them."""
    config = {
        "bootstrap.servers": bootstrap,
        **_PRODUCER_DEFAULTS,
        **client_properties(extra, option),
    }
    config["on_delivery"] = deliveries
    config["error_cb"] = errors
    config["logger"] = CLIENT_LOG
    try:
        return Producer(config)
    except KafkaException as exc:
        raise ConfigError(option, f"the Kafka client rejected its configuration: {exc}") from None


def _admin(
    bootstrap: str, properties: dict[str, Any], errors: ClientErrors, option: str
) -> AdminClient:
    """An admin client sharing the connection properties (TLS, SASL) of ``properties``."""
    config = {
        "bootstrap.servers": bootstrap,
        **client_properties(connection_properties(properties), option),
        "error_cb": errors,
        "logger": CLIENT_LOG,
    }
    try:
        return AdminClient(config)
    except KafkaException as exc:
        raise ConfigError(option, f"the Kafka client rejected its configuration: {exc}") from None


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int | None,
    properties: dict[str, Any] | None = None,
    *,
    option: str = "out",
) -> int:
    """Create ``topic`` if it is missing (``partitions``, default 4); return its partition count.

    ``properties`` are the URL's client properties: their connection part (security
    protocol, TLS, SASL; the password from the environment) configures the admin client.

    Raises
    ------
    ConfigError
        ``partitions`` was given and the existing topic has another count, or SASL needs a
        password that is not set.
    SinkError
        The broker cannot be reached, refuses the credentials or the TLS handshake (at
        once, naming the cause), or refuses to create the topic.
    """
    errors = ClientErrors()
    admin = _admin(bootstrap, properties or {}, errors, option)
    existing = _partition_count(admin, errors, bootstrap, topic)
    if existing is None:
        wanted = partitions or DEFAULT_PARTITIONS
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=wanted, replication_factor=-1)],
            operation_timeout=_TIMEOUT_S,
            request_timeout=_TIMEOUT_S,
        )
        try:
            futures[topic].result(timeout=_TIMEOUT_S)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise SinkError(f"cannot create Kafka topic {topic!r}: {exc}") from None
        existing = _wait_for_leaders(admin, topic)
    if partitions is not None and existing != partitions:
        raise ConfigError(
            "partitions", f"topic {topic!r} exists with {existing} partitions, not {partitions}"
        )
    return existing


def _partition_count(
    admin: AdminClient, errors: ClientErrors, bootstrap: str, topic: str
) -> int | None:
    metadata = list_topics_checked(
        admin,
        errors,
        topic=topic,
        timeout_s=_TIMEOUT_S,
        fail=lambda why: SinkError(f"cannot reach the Kafka broker at {bootstrap}: {why}"),
    )
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return None
    return len(found.partitions)


def _wait_for_leaders(admin: AdminClient, topic: str) -> int:
    """Wait until every partition of a new topic has a leader (else the first sends fail)."""
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic=topic, timeout=_TIMEOUT_S).topics.get(topic)
        if (
            metadata is not None
            and metadata.error is None
            and metadata.partitions
            and all(p.leader >= 0 for p in metadata.partitions.values())
        ):
            return len(metadata.partitions)
        time.sleep(0.1)
    raise SinkError(f"Kafka topic {topic!r} has no leader for every partition after {_TIMEOUT_S} s")


def user_key(line: bytes) -> bytes | None:
    """The message key of one record: its ``user_id`` as a decimal string, or None."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    user_id = event.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        return str(user_id).encode()
    return None


def _lines(events: int, seed: int) -> Iterator[list[bytes]]:
    for chunk in generate_ndjson_chunks(events, seed, _CHUNK_EVENTS):
        lines = chunk.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        yield lines


def _send(producer: Producer, topic: str, lines: list[bytes]) -> None:
    for line in lines:
        key = user_key(line)
        while True:
            try:
                producer.produce(topic, line, key)
                break
            except BufferError:  # the client's queue is full: let it drain
                producer.poll(0.05)
    producer.poll(0)


def produce_synthetic(
    url: str,
    events: int,
    seed: int,
    *,
    rate: int | None = None,
    partitions: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce the synthetic stream of ``(events, seed)`` into ``kafka://HOST:PORT/TOPIC``.

    Creates the topic if it is missing (``partitions``, default 4).  ``rate`` caps the
    events per second (flat out when None); ``progress`` is called with the number of
    records sent so far.  Returns the number of records produced, once all are delivered.

    Raises
    ------
    ConfigError
        A bad URL, rate or partition count.
    SinkError
        The broker is unreachable or did not acknowledge every record.
    """
    bootstrap, topic, properties = parse_kafka_url(url, "out")
    if rate is not None and rate < 1:
        raise ConfigError("rate", f"must be a positive number of events per second, got {rate}")
    if partitions is not None and partitions < 1:
        raise ConfigError("partitions", f"must be a positive integer, got {partitions}")
    ensure_topic(bootstrap, topic, partitions, properties)
    deliveries = _Deliveries()
    producer = _producer(bootstrap, deliveries, properties, ClientErrors())
    step = max(1, rate // 20) if rate else _CHUNK_EVENTS
    started = time.monotonic()
    sent = 0
    for lines in _lines(events, seed):
        for at in range(0, len(lines), step):
            part = lines[at : at + step]
            _send(producer, topic, part)
            sent += len(part)
            if rate:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            deliveries.check(topic)
            if progress is not None:
                progress(sent)
    _flush(producer, topic)
    deliveries.check(topic)
    return sent


def _flush(producer: Producer, topic: str) -> None:
    remaining = producer.flush(_TIMEOUT_S * 4)
    if remaining:
        raise SinkError(
            f"{remaining} message(s) to Kafka topic {topic!r} were still undelivered after "
            f"{_TIMEOUT_S * 4:.0f} s; is the broker up?"
        )


class DeadLetterProducer:
    """Copies dead letters to a Kafka topic, for consumers that watch bad input live.

    Each message's value is the record's raw bytes; headers say where it came from and why
    it was rejected: ``original_topic``, ``original_partition``, ``original_offset``,
    ``original_seq`` and ``error``.  Delivery is at least once: a batch replayed after a
    crash sends its dead letters again (the ``dead_letters`` table stays exact).
    """

    def __init__(
        self, bootstrap: str, topic: str, properties: dict[str, Any] | None = None
    ) -> None:
        """``properties``: the source URL's client properties; their connection part (TLS,
        SASL; the password from the environment) is shared, consumer settings are not."""
        self.topic = topic
        self._deliveries = _Deliveries()
        errors = ClientErrors()
        self._producer = _producer(
            bootstrap,
            self._deliveries,
            connection_properties(properties or {}),
            errors,
            "source",
        )
        metadata = list_topics_checked(
            self._producer,
            errors,
            topic=topic,
            timeout_s=_TIMEOUT_S,
            fail=lambda why: SinkError(
                f"the dead-letter producer cannot reach the Kafka broker at {bootstrap}: {why}"
            ),
        ).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise SinkError(
                f"dead-letter topic {topic!r} does not exist on {bootstrap}; create it first "
                "(deploy/kafka/kafka.sh topic NAME)"
            )

    def send(self, dead: pa.Table, source_topic: str) -> None:
        """Send ``dead`` (rows of ``schema.DEAD_LETTERS``) and wait until all are delivered."""
        missing = set(schema.DEAD_LETTERS.names) - set(dead.column_names)
        if missing:
            raise ValueError(f"dead letters lack the columns {sorted(missing)}")
        columns = {name: dead.column(name).to_pylist() for name in schema.DEAD_LETTERS.names}
        for raw, error, partition, offset, seq in zip(
            columns["raw"],
            columns["error"],
            columns["partition"],
            columns["offset"],
            columns["seq"],
            strict=True,
        ):
            headers = [
                ("original_topic", source_topic.encode()),
                ("original_partition", str(partition).encode()),
                ("original_offset", str(offset).encode()),
                ("original_seq", str(seq).encode()),
                ("error", error.encode()),
            ]
            while True:
                try:
                    self._producer.produce(self.topic, raw, headers=headers)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        _flush(self._producer, self.topic)
        self._deliveries.check(self.topic)

    def close(self) -> None:
        """Deliver anything still queued."""
        _flush(self._producer, self.topic)


__all__ = [
    "DEFAULT_PARTITIONS",
    "DeadLetterProducer",
    "ensure_topic",
    "produce_synthetic",
    "user_key",
]

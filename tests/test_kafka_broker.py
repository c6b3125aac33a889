"""The real Kafka broker does what the pipeline's Kafka source relies on.

Keyed messages land in a stable partition per key, come back in offset order
through a consumer group, and manually committed offsets are where a restarted
consumer, or a consumer after a broker restart, resumes: nothing skipped,
nothing read twice.  The first tests need no broker: they pin kafka.sh's
refusals.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import NamedTuple

import orjson
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from tests.kafka_broker import (
    KAFKA_SH,
    KafkaBrokerError,
    create_topic,
    free_port_pair,
    owns_broker,
    restart_broker,
    unavailable_reason,
)

N_MESSAGES = 3000
N_USERS = 97
PARTITIONS = 3
POLL_DEADLINE_S = 60.0

# (partition, offset) -> (key, value): what the broker acknowledged or delivered.
Acked = dict[tuple[int, int], tuple[bytes, bytes]]


class Record(NamedTuple):
    """A delivered or acknowledged message, with the optional fields made definite."""

    partition: int
    offset: int
    key: bytes
    value: bytes

    @classmethod
    def of(cls, msg: Message) -> Record:
        partition, offset, key, value = msg.partition(), msg.offset(), msg.key(), msg.value()
        assert partition is not None and offset is not None, "message without a position"
        assert isinstance(key, bytes) and isinstance(value, bytes), "message without key or value"
        return cls(partition, offset, key, value)


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh three-partition topic, so tests never see each other's messages."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_topic(kafka_bootstrap, name, PARTITIONS)
    return name


def _event(i: int) -> tuple[bytes, bytes]:
    user_id = (i * 7919) % N_USERS
    value = {
        "event_id": f"e{i}",
        "user_id": user_id,
        "ts": 1_795_608_000_000 + i,
        "event_type": "page_view",
    }
    return str(user_id).encode(), orjson.dumps(value)


def _produce(bootstrap: str, topic: str, first: int, count: int) -> Acked:
    """Produce events ``first .. first+count-1`` keyed by user and return the acks."""
    acked: Acked = {}
    failures: list[str] = []

    def on_delivery(err: object, msg: Message) -> None:
        if err is not None:
            failures.append(str(err))
            return
        rec = Record.of(msg)
        acked[(rec.partition, rec.offset)] = (rec.key, rec.value)

    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    for i in range(first, first + count):
        key, value = _event(i)
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages still in flight after 30 s"
    assert not failures, failures[:3]
    assert len(acked) == count
    return acked


def _consumer(bootstrap: str, topic: str, group: str, protocol: str = "classic") -> Consumer:
    config: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "group.protocol": protocol,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    if protocol == "classic":
        config["session.timeout.ms"] = 6000
    consumer = Consumer(config)
    consumer.subscribe([topic])
    return consumer


def _consume(consumer: Consumer, count: int) -> Iterator[Record]:
    """Yield exactly ``count`` messages, or fail once the deadline passes."""
    received = 0
    deadline = time.monotonic() + POLL_DEADLINE_S
    while received < count:
        assert time.monotonic() < deadline, (
            f"only {received} of {count} messages within {POLL_DEADLINE_S} s"
        )
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        received += 1
        yield Record.of(msg)


def _commit_processed(consumer: Consumer, topic: str, processed: list[Record]) -> None:
    """Commit, per partition, the position after the last processed message."""
    last: dict[int, int] = {}
    for rec in processed:
        last[rec.partition] = max(last.get(rec.partition, -1), rec.offset)
    offsets = [TopicPartition(topic, p, off + 1) for p, off in sorted(last.items())]
    consumer.commit(offsets=offsets, asynchronous=False)


def _committed(consumer: Consumer, topic: str) -> dict[int, int]:
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}


def _as_acked(records: list[Record]) -> Acked:
    return {(r.partition, r.offset): (r.key, r.value) for r in records}


def test_kafka_sh_rejects_a_port_it_cannot_use() -> None:
    done = subprocess.run(
        ["bash", str(KAFKA_SH), "start", "80"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "port must be an integer in 1024..65534" in done.stderr


def test_kafka_sh_status_says_when_nothing_runs_on_a_port() -> None:
    port = free_port_pair()
    done = subprocess.run(
        ["bash", str(KAFKA_SH), "status", str(port)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 3
    assert done.stdout.strip() == f"not running on port {port}"


def test_no_broker_without_java_unless_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("JAVA_HOME", str(KAFKA_SH.parent / "no-such-jdk"))
    reason = unavailable_reason()
    assert reason is not None and "no java" in reason
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    assert unavailable_reason() is None


@pytest.mark.kafka
@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_keyed_messages_round_trip_through_a_group(
    kafka_bootstrap: str, topic: str, protocol: str
) -> None:
    acked = _produce(kafka_bootstrap, topic, 0, N_MESSAGES)
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for (partition, _), (key, _) in acked.items():
        partitions_of_key[key].add(partition)
    assert all(len(ps) == 1 for ps in partitions_of_key.values()), "a key spread over partitions"
    assert {p for p, _ in acked} == set(range(PARTITIONS))

    consumer = _consumer(kafka_bootstrap, topic, f"g-{uuid.uuid4().hex}", protocol)
    try:
        got = list(_consume(consumer, N_MESSAGES))
        _commit_processed(consumer, topic, got)
        committed = _committed(consumer, topic)
    finally:
        consumer.close()

    assert _as_acked(got) == acked
    for p in range(PARTITIONS):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == sorted(offsets), f"partition {p} not delivered in offset order"
    ends = {p: max(off for q, off in acked if q == p) + 1 for p in range(PARTITIONS)}
    assert committed == ends


@pytest.mark.kafka
def test_committed_offsets_survive_a_consumer_restart(kafka_bootstrap: str, topic: str) -> None:
    acked = _produce(kafka_bootstrap, topic, 0, N_MESSAGES)
    group = f"g-{uuid.uuid4().hex}"

    first = _consumer(kafka_bootstrap, topic, group)
    try:
        processed = list(_consume(first, N_MESSAGES // 3))
        _commit_processed(first, topic, processed)
    finally:
        first.close()

    second = _consumer(kafka_bootstrap, topic, group)
    try:
        rest = list(_consume(second, N_MESSAGES - len(processed)))
        assert second.poll(2.0) is None, "a message beyond the produced ones arrived"
    finally:
        second.close()

    before, after = _as_acked(processed), _as_acked(rest)
    assert before.keys().isdisjoint(after.keys()), "a committed message was read again"
    assert before | after == acked


@pytest.mark.kafka
def test_messages_and_committed_offsets_survive_a_broker_restart(
    kafka_bootstrap: str, topic: str
) -> None:
    if not owns_broker():
        pytest.skip("KAFKA_BOOTSTRAP names an external broker, which tests never restart")
    acked = _produce(kafka_bootstrap, topic, 0, N_MESSAGES)
    group = f"g-{uuid.uuid4().hex}"
    consumer = _consumer(kafka_bootstrap, topic, group)
    try:
        processed = list(_consume(consumer, N_MESSAGES // 2))
        _commit_processed(consumer, topic, processed)
        committed = _committed(consumer, topic)
    finally:
        consumer.close()

    restart_broker()

    more = _produce(kafka_bootstrap, topic, N_MESSAGES, 500)
    consumer = _consumer(kafka_bootstrap, topic, group)
    try:
        assert _committed(consumer, topic) == committed
        rest = list(_consume(consumer, N_MESSAGES + 500 - len(processed)))
    finally:
        consumer.close()
    assert _as_acked(processed) | _as_acked(rest) == acked | more


@pytest.mark.kafka
def test_a_message_of_several_megabytes_round_trips(kafka_bootstrap: str, topic: str) -> None:
    value = b"".join(_event(i)[1] + b"\n" for i in range(60_000))
    assert len(value) > 4_000_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_485_760})
    producer.produce(topic, key=b"batch", value=value)
    assert producer.flush(30) == 0
    consumer = _consumer(kafka_bootstrap, topic, f"g-{uuid.uuid4().hex}")
    try:
        (msg,) = _consume(consumer, 1)
    finally:
        consumer.close()
    assert msg.value == value


@pytest.mark.kafka
def test_create_topic_is_idempotent_but_refuses_another_partition_count(
    kafka_bootstrap: str, topic: str
) -> None:
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    with pytest.raises(KafkaBrokerError, match="exists with 3 partitions, not 5"):
        create_topic(kafka_bootstrap, topic, 5)

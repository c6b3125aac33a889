"""The Kafka source against the real broker: order, framing, replay, commits, rebalances, restarts.

Every test reads a fresh topic with its own consumer group, so the session's one broker
serves them all.  The framing tests at the top need no broker.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from gpu_pipeline import schema
from gpu_pipeline.config import RunConfig
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.runtime.job import job_id
from gpu_pipeline.sources.base import RawBatch
from gpu_pipeline.sources.kafka import KafkaSource, frame_messages, parse_kafka_url
from gpu_pipeline.sources.kafka_producer import DeadLetterProducer, produce_synthetic, user_key
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from gpu_pipeline.state.journal import BatchJournal
from tests.kafka_broker import create_topic, owns_broker, restart_broker

PARTITIONS = 3
WAIT_S = 90.0
# (partition, offset) of every record a consumer saw, with its seq and bytes.
Seen = list[tuple[int, int, int, bytes]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def event(i: int, user: int | None = None) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "user_id": user if user is not None else i % 50})


def produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[int, bytes | None]],
    *,
    extra: dict[str, object] | None = None,
) -> list[tuple[int, int, bytes]]:
    """Send (partition, value) pairs; return the acknowledged (partition, offset, value)s."""
    acked: list[tuple[int, int, bytes]] = []

    def delivered(error: KafkaError | None, message: object) -> None:
        assert error is None, error
        acked.append((message.partition(), message.offset(), message.value() or b""))  # type: ignore[attr-defined]

    # Idempotence keeps each partition in send order even when a request is retried.
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "enable.idempotence": True,
            **(extra or {}),
        }
    )
    for partition, value in messages:
        producer.produce(topic, value, partition=partition, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(WAIT_S) == 0, "not every message was delivered"
    return acked


def make_source(
    bootstrap: str,
    topic: str,
    journal: BatchJournal,
    *,
    group: str | None = None,
    resume: Callable[[int], int | None] | None = None,
    on_revoke: Callable[[list[int]], None] | None = None,
    until_idle: bool = True,
    idle_timeout_ms: int = 1500,
    max_wait_ms: int = 200,
    max_bytes: int = 64 << 20,
    config: dict[str, object] | None = None,
) -> KafkaSource:
    return KafkaSource(
        bootstrap,
        topic,
        group or unique("group"),
        journal=journal,
        resume=resume or (lambda partition: None),
        on_revoke=on_revoke,
        max_bytes=max_bytes,
        max_wait_ms=max_wait_ms,
        until_idle=until_idle,
        idle_timeout_ms=idle_timeout_ms,
        consumer_config=dict(config or {}),
    )


def drain(source: KafkaSource, max_records: int) -> list[RawBatch]:
    try:
        return list(source.batches(max_records, {}))
    finally:
        source.close()


def seen(batches: list[RawBatch]) -> Seen:
    return [
        (b.partition, int(b.offsets[i]), int(b.seqs[i]), b.record(i))
        for b in batches
        for i in range(len(b))
    ]


def assert_well_formed(batches: list[RawBatch], max_records: int | None = None) -> None:
    """One partition per batch, offsets ascending, and each batch starting where the last ended."""
    ends: dict[int, int] = {}
    for batch in batches:
        assert len(batch) > 0
        if max_records is not None:
            assert len(batch) <= max_records
        assert np.all(np.diff(batch.offsets) >= 0)
        assert batch.next_offset == int(batch.offsets[-1]) + 1
        if batch.partition in ends:
            assert int(batch.offsets[0]) == ends[batch.partition]
        ends[batch.partition] = batch.next_offset
        # Records are adjacent lines of the buffer: the decoder's zero-copy fast path.
        assert np.all(batch.starts[1:] == batch.ends[:-1] + 1)
        assert all(batch.buffer[e] == 10 for e in batch.ends.tolist())


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique("source")
    create_topic(kafka_bootstrap, name, PARTITIONS)
    return name


# ---------------------------------------------------------------------------- no broker


def test_framing_splits_lines_and_keeps_empty_messages() -> None:
    values = [b'{"a":1}', b"", b"x\ny\n", b"\n", b"p\n\nq", b'{"b":2}\n', b"\xff\xfe"]
    chunk = frame_messages(values, np.arange(10, 17))
    records = [
        chunk.buf[s:e] for s, e in zip(chunk.starts.tolist(), chunk.ends.tolist(), strict=True)
    ]
    assert records == [b'{"a":1}', b"", b"x", b"y", b"", b"p", b"", b"q", b'{"b":2}', b"\xff\xfe"]
    assert chunk.offsets[chunk.rec_msg].tolist() == [10, 11, 12, 12, 13, 14, 14, 14, 15, 16]
    assert chunk.seqs.tolist() == [0, 0, 0, 1, 0, 0, 1, 2, 0, 0]


def test_kafka_urls_are_parsed_and_bad_ones_name_the_option() -> None:
    assert parse_kafka_url("kafka://127.0.0.1:9092/clicks") == ("127.0.0.1:9092", "clicks", {})
    assert parse_kafka_url("kafka://h:1/t?group.protocol=classic")[2] == {
        "group.protocol": "classic"
    }
    for bad in ["kafka://host/topic", "kafka://host:9092/", "http://h:1/t", "kafka://h:1/a b"]:
        with pytest.raises(ConfigError) as caught:
            parse_kafka_url(bad, "out")
        assert caught.value.option == "out"


def test_from_config_validates_options(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    base = replace(RunConfig(), source="kafka://127.0.0.1:9/clicks")
    cases = {
        "source": replace(base, source="kafka://127.0.0.1:9/clicks?enable.auto.commit=true"),
        "max_batch_bytes": replace(base, max_batch_bytes=0),
    }
    for option, config in cases.items():
        with pytest.raises(ConfigError) as caught:
            KafkaSource.from_config(config, journal=journal, resume=lambda p: None, on_revoke=None)
        assert caught.value.option == option
    source = KafkaSource.from_config(base, journal=journal, resume=lambda p: None, on_revoke=None)
    assert source.topic == "clicks"
    assert source.group_id == f"gpu-pipeline-{job_id(base)}"  # the default: one group per job
    with pytest.raises(ConfigError):
        next(iter(source.batches(0, {})))
    source.close()


def test_from_config_joins_as_a_static_member_of_its_checkpoint(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path / "journal")
    config = replace(RunConfig(), source="kafka://127.0.0.1:9/clicks", checkpoint_dir=str(tmp_path))

    def instance_id(config: RunConfig) -> object:
        source = KafkaSource.from_config(
            config, journal=journal, resume=lambda p: None, on_revoke=None
        )
        source.close()
        return source.consumer_config.get("group.instance.id")

    same = instance_id(config)
    assert isinstance(same, str) and same == instance_id(config)
    assert instance_id(replace(config, checkpoint_dir=str(tmp_path / "other"))) != same
    kip848 = replace(config, source="kafka://127.0.0.1:9/clicks?group.protocol=consumer")
    assert instance_id(kip848) is None


# ---------------------------------------------------------------------------- round trips


@pytest.mark.kafka
def test_every_record_arrives_once_in_offset_order(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    acked = produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(3000)])
    journal = BatchJournal(tmp_path)
    batches = drain(make_source(kafka_bootstrap, topic, journal), max_records=137)

    assert_well_formed(batches, max_records=137)
    got = seen(batches)
    assert sorted((p, o, v) for p, o, _, v in got) == sorted(acked)
    for partition in range(PARTITIONS):
        offsets = [o for p, o, _, _ in got if p == partition]
        assert offsets == list(range(1000))
        cuts = [b.next_offset for b in batches if b.partition == partition]
        assert journal.planned(partition, 0) == cuts
    assert {len(b) for b in batches} >= {137}


@pytest.mark.kafka
def test_ndjson_messages_split_into_records_with_seq(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(
        kafka_bootstrap,
        topic,
        [
            (0, event(0) + b"\n" + event(1) + b"\n" + event(2)),
            (0, event(3) + b"\n"),
            (0, b"a\n\nb"),
        ],
    )
    batches = drain(make_source(kafka_bootstrap, topic, BatchJournal(tmp_path)), 100)
    assert_well_formed(batches)
    assert [(o, s, v) for _, o, s, v in seen(batches)] == [
        (0, 0, event(0)),
        (0, 1, event(1)),
        (0, 2, event(2)),
        (1, 0, event(3)),
        (2, 0, b"a"),
        (2, 1, b""),
        (2, 2, b"b"),
    ]


@pytest.mark.kafka
def test_bad_payloads_arrive_as_records(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    oversized = b'{"event_id":"' + b"x" * (4 << 20) + b'"}'
    garbage = bytes(b for b in range(256) if b != 10) * 3
    payloads: list[bytes | None] = [b"", None, garbage, b'{"event_id":"\xff\xfe"}', oversized]
    acked = produce(
        kafka_bootstrap,
        topic,
        [(1, p) for p in payloads],
        extra={"message.max.bytes": 10 << 20},
    )
    batches = drain(make_source(kafka_bootstrap, topic, BatchJournal(tmp_path)), 2)
    assert_well_formed(batches, max_records=2)
    assert [(o, s, v) for _, o, s, v in seen(batches)] == [(o, 0, v) for _, o, v in sorted(acked)]
    assert sorted(v for _, _, v in acked) == sorted(p or b"" for p in payloads)


@pytest.mark.kafka
def test_max_bytes_bounds_batches_but_never_splits_a_message(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topic, [(2, b"y" * 1000) for _ in range(50)])
    source = make_source(kafka_bootstrap, topic, BatchJournal(tmp_path), max_bytes=4500)
    batches = drain(source, 1000)
    assert_well_formed(batches)
    assert sum(len(b) for b in batches) == 50
    assert max(len(b) for b in batches) == 4  # 4 x 1001 bytes fit in 4500, 5 do not


# ---------------------------------------------------------------------------- replay


@pytest.mark.kafka
def test_replay_from_a_checkpoint_cuts_the_journaled_batches_again(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(900)])
    first_run = drain(make_source(kafka_bootstrap, topic, BatchJournal(tmp_path)), 50)
    # The pipeline checkpointed after the second batch of every partition, then crashed.
    checkpoint = {
        p: [b.next_offset for b in first_run if b.partition == p][1] for p in range(PARTITIONS)
    }
    journal = BatchJournal(tmp_path)  # a new process reopens the same journal
    for partition, position in checkpoint.items():
        journal.truncate(partition, position)
    produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(900, 1200)])

    replay = drain(
        make_source(kafka_bootstrap, topic, journal, resume=checkpoint.get), max_records=17
    )

    assert_well_formed(replay)
    for partition in range(PARTITIONS):
        old = [
            b
            for b in first_run
            if b.partition == partition and b.offsets[0] >= checkpoint[partition]
        ]
        new = [b for b in replay if b.partition == partition]
        assert [(b.next_offset, b.buffer) for b in new[: len(old)]] == [
            (b.next_offset, b.buffer) for b in old
        ]
        assert int(new[0].offsets[0]) == checkpoint[partition]
        tail = new[len(old) :]  # beyond the journal: cut afresh with the new batch size
        assert tail and all(len(b) <= 17 for b in tail)
        assert tail[-1].next_offset == 400


@pytest.mark.kafka
def test_commit_is_where_a_new_member_of_the_group_starts(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(90)])
    group = unique("group")
    first = make_source(kafka_bootstrap, topic, BatchJournal(tmp_path / "a"), group=group)
    try:
        assert sum(len(b) for b in first.batches(100, {})) == 90
        first.commit({0: 5, 1: 10, 2: 30, 7: 3})  # 7 is not ours: skipped
    finally:
        first.close()
    second = make_source(kafka_bootstrap, topic, BatchJournal(tmp_path / "b"), group=group)
    batches = drain(second, 100)
    starts = {p: min(int(b.offsets[0]) for b in batches if b.partition == p) for p in (0, 1)}
    assert starts == {0: 5, 1: 10}
    assert not [b for b in batches if b.partition == 2]  # committed at its end
    assert sum(len(b) for b in batches) == 25 + 20


@pytest.mark.kafka
def test_until_idle_ends_and_lag_counts_down(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(600)])
    source = make_source(kafka_bootstrap, topic, BatchJournal(tmp_path), idle_timeout_ms=1000)
    lags: list[tuple[RawBatch, dict[int, int]]] = []
    last = time.monotonic()
    try:
        for batch in source.batches(50, {}):
            lags.append((batch, source.lag()))
            last = time.monotonic()
        ended = time.monotonic() - last
        final = source.lag()
    finally:
        source.close()
    assert 0.5 <= ended < 10.0  # idle counts from the last message, a bit before its batch
    assert final == {0: 0, 1: 0, 2: 0}
    for batch, lag in lags:
        assert lag[batch.partition] == 200 - batch.next_offset
    assert max(lag[b.partition] for b, lag in lags) > 0


# ---------------------------------------------------------------------------- rebalances


class Member:
    """One consumer of a group in its own thread, the way the pipeline drives the source.

    Offsets are committed only when partitions are revoked and at stop: if ``on_revoke``
    were missed, the next owner would re-read from older offsets and the test would see
    duplicates.  ``resume`` answers from the member's own positions, as the pipeline's
    checkpoint does.
    """

    def __init__(
        self, bootstrap: str, topic: str, group: str, directory: Path, protocol: str
    ) -> None:
        self.positions: dict[int, int] = {}
        self.revoked: list[list[int]] = []
        self.batches: list[RawBatch] = []
        self.error: BaseException | None = None
        self.source = make_source(
            bootstrap,
            topic,
            BatchJournal(directory),
            group=group,
            resume=self.positions.get,
            on_revoke=self._on_revoke,
            until_idle=False,
            config={"group.protocol": protocol},
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_revoke(self, partitions: list[int]) -> None:
        """Checkpoint (here: commit) the partitions, then forget them: their next owner
        moves them on, so a position kept here would be stale when they come back."""
        self.revoked.append(partitions)
        self.source.commit({p: self.positions[p] for p in partitions if p in self.positions})
        for partition in partitions:
            self.positions.pop(partition, None)

    def _run(self) -> None:
        try:
            for batch in self.source.batches(64, {}):
                self.batches.append(batch)
                self.positions[batch.partition] = batch.next_offset
        except BaseException as exc:  # reported by the test
            self.error = exc

    def records(self) -> int:
        return sum(len(b) for b in self.batches)

    def leave(self) -> None:
        self.source.stop()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        owned = self.source.assignment()
        self.source.commit({p: self.positions[p] for p in owned if p in self.positions})
        self.source.close()
        assert self.error is None, self.error


def wait_for(condition: Callable[[], bool], what: str, members: list[Member]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for member in members:
            assert member.error is None, member.error
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.kafka
@pytest.mark.parametrize("protocol", ["consumer", "classic"])
def test_a_rebalance_loses_and_doubles_nothing(
    kafka_bootstrap: str, topic: str, tmp_path: Path, protocol: str
) -> None:
    group = unique("group")
    acked = produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(600)])
    first = Member(kafka_bootstrap, topic, group, tmp_path / "a", protocol)
    wait_for(lambda: first.records() == 600, "the first member to read phase 1", [first])

    second = Member(kafka_bootstrap, topic, group, tmp_path / "b", protocol)
    wait_for(
        lambda: bool(second.source.assignment()) and bool(first.revoked),
        "the second member to get partitions",
        [first, second],
    )
    acked += produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(600, 1200)])
    wait_for(lambda: first.records() + second.records() == 1200, "phase 2", [first, second])

    second.leave()
    wait_for(lambda: len(first.source.assignment()) == PARTITIONS, "the partitions back", [first])
    acked += produce(
        kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(1200, 1800)]
    )
    wait_for(lambda: first.records() + second.records() == 1800, "phase 3", [first])
    time.sleep(0.5)  # anything doubled would arrive now
    first.leave()

    got = seen(first.batches) + seen(second.batches)
    assert Counter((p, o) for p, o, _, _ in got) == Counter((p, o) for p, o, _ in acked)
    assert second.batches, "the second member read nothing"
    for member in (first, second):
        for partition in range(PARTITIONS):
            offsets = [o for p, o, _, _ in seen(member.batches) if p == partition]
            assert offsets == sorted(offsets)


@pytest.mark.kafka
def test_the_source_rides_out_a_broker_restart(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    if not owns_broker():
        pytest.skip("the broker belongs to KAFKA_BOOTSTRAP's owner; a restart needs our own")
    acked = produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(300)])
    member = Member(kafka_bootstrap, topic, unique("group"), tmp_path, "consumer")
    wait_for(lambda: member.records() == 300, "the records before the restart", [member])

    restart_broker()
    acked += produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(300, 600)])
    wait_for(lambda: member.records() == 600, "the records after the restart", [member])
    time.sleep(0.5)
    member.leave()

    got = seen(member.batches)
    assert Counter((p, o) for p, o, _, _ in got) == Counter((p, o) for p, o, _ in acked)


_CHILD = """
import sys
from dataclasses import replace
from gpu_pipeline.config import RunConfig
from gpu_pipeline.sources.kafka import KafkaSource
from gpu_pipeline.state.journal import BatchJournal
config = replace(RunConfig(), source=sys.argv[1], group_id=sys.argv[2], checkpoint_dir=sys.argv[3])
source = KafkaSource.from_config(
    config, journal=BatchJournal(sys.argv[3] + "/journal"), resume=lambda p: None, on_revoke=None
)
for batch in source.batches(10, {}):
    print(batch.partition, batch.next_offset, flush=True)
"""


@pytest.mark.kafka
def test_a_pipeline_killed_with_sigkill_gets_its_partitions_back_at_once(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topic, [(i % PARTITIONS, event(i)) for i in range(30)])
    url, group = f"kafka://{kafka_bootstrap}/{topic}", unique("group")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, group, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline(), "the first consumer read nothing"
    finally:
        child.kill()
        child.wait(WAIT_S)
        if child.stdout is not None:
            child.stdout.close()

    config = replace(RunConfig(), source=url, group_id=group, checkpoint_dir=str(tmp_path))
    restarted = KafkaSource.from_config(
        replace(config, until_idle=True, idle_timeout_ms=500),
        journal=BatchJournal(tmp_path / "journal-2"),
        resume=lambda p: None,
        on_revoke=None,
    )
    started = time.monotonic()
    batches = drain(restarted, 100)
    # A dynamic member would wait out the dead one's session (10 s here, 45 s with KIP-848).
    assert time.monotonic() - started < 8.0
    assert sum(len(b) for b in batches) == 30


# ---------------------------------------------------------------------------- producers


def read_all(
    bootstrap: str, topic: str, partitions: int
) -> list[tuple[int, int, bytes | None, bytes, list]]:
    """Every message of the topic: (partition, offset, key, value, headers)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("reader"), "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[tuple[int, int, bytes | None, bytes, list]] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + WAIT_S
    try:
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, "the topic was not read to its end"
            for message in consumer.consume(10_000, 0.2):
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition() or 0)
                    continue
                assert error is None, error
                out.append(
                    (
                        message.partition() or 0,
                        message.offset() or 0,
                        message.key(),
                        message.value() or b"",
                        message.headers() or [],
                    )
                )
                at_end.discard(message.partition() or 0)
    finally:
        consumer.close()
    return out


@pytest.mark.kafka
def test_produce_synthetic_keys_events_by_user(kafka_bootstrap: str, tmp_path: Path) -> None:
    name = unique("synthetic")
    progress: list[int] = []
    sent = produce_synthetic(
        f"kafka://{kafka_bootstrap}/{name}", 20_000, 11, partitions=3, progress=progress.append
    )
    assert sent == 20_000 and progress[-1] == 20_000
    expected = b"".join(generate_ndjson_chunks(20_000, 11)).split(b"\n")[:-1]

    messages = read_all(kafka_bootstrap, name, 3)
    assert Counter(v for *_, v, _ in messages) == Counter(expected)
    partition_of: dict[bytes, set[int]] = defaultdict(set)
    null_keys = 0
    for partition, _, key, value, _ in messages:
        assert key == user_key(value)
        if key is None:
            null_keys += 1
        else:
            assert key == str(orjson.loads(value)["user_id"]).encode()
            partition_of[key].add(partition)
    assert all(len(parts) == 1 for parts in partition_of.values())
    assert len({p for parts in partition_of.values() for p in parts}) == 3
    assert null_keys < 0.01 * len(messages)
    # Each user's events keep the stream's order in their partition (sessions depend on it).
    stream: dict[bytes, list[bytes]] = defaultdict(list)
    for line in expected:
        key = user_key(line)
        if key is not None:
            stream[key].append(line)
    delivered: dict[bytes, list[bytes]] = defaultdict(list)
    for _, _, key, value, _ in sorted(messages, key=lambda m: (m[0], m[1])):
        if key is not None:
            delivered[key].append(value)
    assert delivered == stream
    with pytest.raises(ConfigError):
        produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", 1, 1, partitions=5)


@pytest.mark.kafka
def test_kcat_can_feed_the_source(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("kcat is not installed (Debian: apt-get install kcat)")
    lines = [event(i, user=i % 7) for i in range(200)]
    keyed = b"".join(str(i % 7).encode() + b":" + line + b"\n" for i, line in enumerate(lines))
    subprocess.run(
        [kcat, "-P", "-b", kafka_bootstrap, "-t", topic, "-K:"],
        input=keyed,
        check=True,
        timeout=WAIT_S,
    )
    batches = drain(make_source(kafka_bootstrap, topic, BatchJournal(tmp_path)), 64)
    assert_well_formed(batches)
    records = seen(batches)
    assert Counter(v for *_, v in records) == Counter(lines)
    users_by_partition = defaultdict(set)
    for partition, _, _, value in records:
        users_by_partition[orjson.loads(value)["user_id"]].add(partition)
    assert all(len(parts) == 1 for parts in users_by_partition.values())


@pytest.mark.kafka
def test_dead_letters_go_to_the_dlq_topic_with_their_origin(kafka_bootstrap: str) -> None:
    dlq = unique("dlq")
    create_topic(kafka_bootstrap, dlq, 1)
    dead = pa.table(
        {
            "raw": pa.array([b"", b"\xff{not json"], pa.binary()),
            "error": ["record: empty record", "record: invalid UTF-8 at byte 0"],
            "source": ["kafka:clicks"] * 2,
            "partition": pa.array([2, 0], pa.int32()),
            "offset": pa.array([17, 4], pa.int64()),
            "seq": pa.array([0, 3], pa.int32()),
        },
        schema=schema.DEAD_LETTERS,
    )
    producer = DeadLetterProducer(kafka_bootstrap, dlq)
    producer.send(dead, "clicks")
    producer.close()
    messages = read_all(kafka_bootstrap, dlq, 1)
    assert [v for *_, v, _ in messages] == [b"", b"\xff{not json"]
    assert [dict(h) for *_, h in messages] == [
        {
            "original_topic": b"clicks",
            "original_partition": b"2",
            "original_offset": b"17",
            "original_seq": b"0",
            "error": b"record: empty record",
        },
        {
            "original_topic": b"clicks",
            "original_partition": b"0",
            "original_offset": b"4",
            "original_seq": b"3",
            "error": b"record: invalid UTF-8 at byte 0",
        },
    ]


class _RebalancingConsumer:
    """A consumer whose commits meet a rebalance (the broker's answer, without a broker)."""

    def __init__(self, code: int) -> None:
        self.code, self.calls = code, 0

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> object:
        from confluent_kafka import KafkaException

        self.calls += 1
        raise KafkaException(KafkaError(self.code))

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "code",
    [KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS],
)
def test_a_commit_that_meets_a_rebalance_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """The checkpoint is durable before the commit and the next owner resumes from it, so a
    commit refused because the group moved on only leaves the group's offsets behind."""
    source = make_source("127.0.0.1:9", "t", BatchJournal(tmp_path))
    fake = _RebalancingConsumer(code)
    real, source._consumer = source._consumer, fake  # type: ignore[assignment]
    try:
        source._parts[0] = object()  # type: ignore[assignment]  # held: worth committing
        with caplog.at_level("WARNING"):
            source.commit({0: 10})
        assert fake.calls == 1
        assert "consumer group is rebalancing" in caplog.text
    finally:
        source._consumer = real
        source._parts.clear()
        source.close()

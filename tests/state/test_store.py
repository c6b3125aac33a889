"""The StateStore contract, on a local directory, fsspec's in-memory store and a real S3
API (moto's server over HTTP), and the checkpoint store and journal on each."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from gpu_pipeline.errors import CheckpointError
from gpu_pipeline.state.checkpoint import CheckpointStore, PartitionCheckpoint
from gpu_pipeline.state.journal import BatchJournal
from gpu_pipeline.state.store import (
    FsspecStateStore,
    LocalStateStore,
    StateStore,
    is_url,
    open_state_store,
)
from tests.object_store import S3Endpoint, s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "local":
        return LocalStateStore(tmp_path / "state")
    if request.param == "memory":
        import fsspec

        root = f"/state-{uuid.uuid4().hex[:8]}"
        return FsspecStateStore(f"memory://{root}", fsspec.filesystem("memory"), root)
    endpoint: S3Endpoint = request.getfixturevalue("s3")
    bucket = endpoint.new_bucket()
    return FsspecStateStore(f"s3://{bucket}/ckpt", endpoint.filesystem(), f"{bucket}/ckpt")


def test_files_are_written_whole_listed_and_removed(store: StateStore) -> None:
    assert store.read("a/b") is None and store.names() == [] and not store.exists("a/b")
    store.write("a/b", b"one")
    store.write("a/b", b"two")  # replaced whole
    store.write("a/c", b"")
    store.write("top", b"x")
    assert store.read("a/b") == b"two" and store.read("a/c") == b""
    assert store.exists("a/b") and not store.exists("a")  # a folder is not a file
    assert store.names() == ["a", "top"] and store.names("a") == ["b", "c"]
    assert store.sub("a").read("b") == b"two" and store.sub("a").names() == ["b", "c"]
    store.remove("a/c")
    store.remove("a/missing")
    assert store.names("a") == ["b"]
    store.remove()
    assert store.names() == [] and store.read("top") is None


def test_a_folder_is_replaced_as_a_whole(store: StateStore) -> None:
    store.write_folder("p0/ckpt-1", {"x.arrow": b"1", "manifest.json": b"{}"})
    store.write_folder("p0/ckpt-1", {"manifest.json": b"{2}"})
    assert store.names("p0/ckpt-1") == ["manifest.json"]
    assert store.read("p0/ckpt-1/manifest.json") == b"{2}"


def test_a_log_grows_by_appends_and_is_replaced_atomically(store: StateStore) -> None:
    log = store.log("journal/p0.journal")
    assert log.read() == b""
    log.append(b"1\n")
    log.append(b"2\n")
    assert store.read("journal/p0.journal") == b"1\n2\n"
    log.replace(b"2\n")
    log.append(b"3\n")
    log.close()
    assert store.log("journal/p0.journal").read() == b"2\n3\n"


def test_a_lease_is_exclusive(store: StateStore) -> None:
    from gpu_pipeline.state.store import LeaseHeld

    with store.lease("p0/LEASE", wait_s=1):
        other: list[BaseException] = []

        def contend() -> None:
            try:
                with store.lease("p0/LEASE", wait_s=0.3):
                    pass
            except BaseException as exc:
                other.append(exc)

        if isinstance(store, LocalStateStore):
            # flock is per open file: a second open in this process contends like another
            # process would
            contend()
        else:
            thread = threading.Thread(target=contend)
            thread.start()
            thread.join()
        assert other and isinstance(other[0], LeaseHeld)
    with store.lease("p0/LEASE", wait_s=1):
        pass  # free again


def test_checkpoints_round_trip_and_a_new_one_replaces_the_old(store: StateStore) -> None:
    checkpoints = CheckpointStore(store, "job1", {"source": "file:x"})
    assert checkpoints.partitions() == [] and checkpoints.load(0) is None
    state = {"dedup": pa.table({"id": pa.array([1, 2, 3], pa.int64())})}
    first = PartitionCheckpoint(position=10, state=state, counters={"events": 3})
    checkpoints.save(0, first)
    checkpoints.write_intent(1, 5, flushed=True)
    assert checkpoints.partitions() == [0] and checkpoints.known_partitions() == [0, 1]
    assert checkpoints.intent(1) == (5, True) and checkpoints.intent(0) is None
    second = PartitionCheckpoint(position=20, state=state, counters={"events": 4}, sequence=1)
    checkpoints.save(0, second)
    loaded = checkpoints.load(0)
    assert loaded is not None and loaded.position == 20 and loaded.sequence == 2
    assert loaded.state["dedup"].equals(state["dedup"]) and loaded.counters == {"events": 4}
    assert [n for n in store.names("p0") if n.startswith("ckpt-")] == ["ckpt-000000002"]
    assert checkpoints.counters(0) == {"events": 4}
    assert checkpoints.recorded_identity() == {"job_id": "job1", "source": "file:x"}
    checkpoints.claim_sink("k1", "db")
    assert checkpoints.claimed_sinks() == {"k1"}
    checkpoints.mark_partition_done(0)
    assert checkpoints.partition_done(0) and not checkpoints.partition_done(1)
    assert not checkpoints.is_complete()
    checkpoints.mark_complete()
    assert checkpoints.is_complete()
    with pytest.raises(CheckpointError, match="belongs to job job1"):
        CheckpointStore(store, "job2").load(0)
    checkpoints.reset()
    assert checkpoints.partitions() == [] and not checkpoints.is_complete()


def test_a_checkpoint_cut_short_keeps_the_previous_one(store: StateStore) -> None:
    """A crash while a checkpoint folder is written (before CURRENT moves) loses nothing."""
    checkpoints = CheckpointStore(store, "job1")
    checkpoints.save(0, PartitionCheckpoint(position=10, counters={"events": 1}))
    store.write_folder("p0/ckpt-000000002", {"dedup.arrow": b"torn"})  # no manifest yet
    loaded = checkpoints.load(0)
    assert loaded is not None and loaded.position == 10


def test_the_journal_cuts_off_a_torn_tail(store: StateStore) -> None:
    journal = BatchJournal(store.sub("journal"))
    journal.record(0, 0, 10)
    journal.record(0, 10, 25)
    journal.close()
    log = store.log("journal/p0.journal")
    log.append(b"25 40 dead")  # a torn last line
    log.close()
    reopened = BatchJournal(store.sub("journal"))
    assert reopened.planned(0, 0) == [10, 25]
    reopened.record(0, 25, 30)
    reopened.truncate(0, 10)
    assert BatchJournal(store.sub("journal")).planned(0, 10) == [25, 30]


def test_locations_name_their_kind(tmp_path: Path) -> None:
    assert isinstance(open_state_store(tmp_path), LocalStateStore)
    assert isinstance(open_state_store(f"file://{tmp_path}"), LocalStateStore)
    assert isinstance(open_state_store("memory://x"), FsspecStateStore)
    assert is_url("s3://b/k") and not is_url(tmp_path) and not is_url(f"file://{tmp_path}")
    with pytest.raises(CheckpointError, match="cannot open the checkpoint location"):
        open_state_store("nosuchscheme://bucket/x")


def test_a_partition_held_by_another_process_is_refused_naming_it(tmp_path: Path) -> None:
    checkpoints = CheckpointStore(LocalStateStore(tmp_path), "job1")
    held = pytest.raises(CheckpointError, match=r"partition 3 of job job1 is held by another")
    with checkpoints.lease(3), held, checkpoints.lease(3, wait_s=0.3):
        pass
    with checkpoints.lease(3, wait_s=0.3):
        pass

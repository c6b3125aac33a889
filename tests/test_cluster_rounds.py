"""Which partitions a bounded Kafka cluster job still owes (the client's end-of-job check)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gpu_pipeline.cluster import driver
from gpu_pipeline.state.checkpoint import CheckpointStore, PartitionCheckpoint


def test_a_partition_is_finished_only_when_flushed_at_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, "job")
    store.save(0, PartitionCheckpoint(position=10))
    store.mark_flushed(0, 10)  # read to its end and flushed: finished
    store.save(1, PartitionCheckpoint(position=20))
    store.mark_flushed(1, 12)  # read on after an earlier flush, then handed over: not
    store.save(2, PartitionCheckpoint(position=5))  # revoked mid-way, never flushed: not
    extent = {0: (0, 10), 1: (0, 20), 2: (0, 9), 3: (4, 4), 4: (0, 7)}
    # 3: no data and no checkpoint: nothing owed; 4: data that nobody read: owed
    monkeypatch.setattr(driver, "topic_extent", lambda config: extent)
    run = SimpleNamespace(pipeline=SimpleNamespace(store=store), config=None)
    assert driver.ClusterRun._unfinished_partitions(run) == [1, 2, 4]  # type: ignore[arg-type]

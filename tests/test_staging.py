"""Staged blocks (a chdb cluster job's worker -> client hand-off), without a cluster."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pytest

from gpu_pipeline.cluster import staging
from gpu_pipeline.cluster.staging import StagedSink, StagedWriter
from gpu_pipeline.errors import SinkError
from tests.test_outbox import RecordingSink


def rows(n: int) -> pa.Table:
    return pa.table({"x": pa.array(range(n), pa.int64())})


def test_the_writer_inserts_each_staged_block_once_with_its_token(tmp_path: Path) -> None:
    sink = StagedSink(tmp_path, "chdb://x")
    sink.open()
    sink.write("events", rows(3), "job:0:c1:start-3:events")
    sink.write("events", rows(3), "job:0:c1:start-3:events")  # a replay overwrites
    sink.write("sessions", rows(0), "job:0:c1:start-3:sessions")  # empty: nothing staged
    target = RecordingSink()
    writer = StagedWriter(tmp_path, target)
    assert writer.drain() == 1
    assert target.writes == [("events", 3, "job:0:c1:start-3:events")]
    assert writer.drain() == 0 and not list(tmp_path.glob("*.arrow"))


def test_a_full_stage_waits_for_the_writer_and_fails_once_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the client gone nobody makes room: the write must fail, not hang."""
    monkeypatch.setattr(staging, "MAX_STAGED", 1)
    sink = StagedSink(tmp_path, "chdb://x")
    sink.open()
    sink.write("events", rows(1), "t1")
    failure: list[BaseException] = []

    def second_write() -> None:
        try:
            sink.write("events", rows(1), "t2")
        except BaseException as exc:
            failure.append(exc)

    waiting = threading.Thread(target=second_write)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive(), "a full stage must wait for the writer"
    sink.abandon()
    waiting.join(5)
    assert not waiting.is_alive()
    assert failure and isinstance(failure[0], SinkError)
    assert "client that inserts them is gone" in str(failure[0])

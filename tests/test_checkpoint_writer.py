"""The background checkpoint writer: the main thread computes the next batches while a
checkpoint is written, checkpoints are written strictly one after another (intent, inserts,
state), and a failed write fails the run without moving the durable state.

A sink that blocks stands in for a slow ClickHouse; the crash and replay proofs against the
real engine are in test_recovery.py and the Kafka tests.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig
from gpu_pipeline.errors import SinkError
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from tests.test_outbox import RecordingSink

WAIT_S = 60


def config(tmp_path: Path) -> RunConfig:
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(generate_ndjson_chunks(6000, 3)))
    return dataclasses.replace(
        RunConfig(),
        source=f"file:{data}",
        sink=f"chdb://{tmp_path / 'unused'}",
        checkpoint_dir=str(tmp_path / "ckpt"),
        batch_size=1000,
        checkpoint_interval_ms=0,
        progress="never",
    )


class GatedSink(RecordingSink):
    """Blocks the first write of checkpoint 1 until the main thread has processed a later
    batch: a run whose main thread waited for its writes would never get there."""

    def __init__(self) -> None:
        super().__init__()
        self.later_batch_done = threading.Event()
        self.order: list[str] = []

    def write(self, table: str, rows: pa.Table, token: str) -> None:
        if ":c1:" in token and not self.order:
            assert self.later_batch_done.wait(WAIT_S), "the main thread waited for the write"
        self.order.append(token)
        super().write(table, rows, token)


def test_batches_are_computed_while_a_checkpoint_is_written(
    tmp_path: Path, cpu_backend: Backend
) -> None:
    sink = GatedSink()
    pipeline = Pipeline(config(tmp_path), sink=sink, backend=cpu_backend)
    original = pipeline._process_batch
    batches = 0

    def counting(raw, decoded):  # type: ignore[no-untyped-def]
        nonlocal batches
        original(raw, decoded)
        batches += 1
        if batches == 2:
            sink.later_batch_done.set()

    pipeline._process_batch = counting  # type: ignore[method-assign]
    try:
        result = pipeline.run()
    finally:
        pipeline.close()
    assert result.completed
    # checkpoint n's blocks all come before checkpoint n+1's: strictly sequential
    sequences = [int(token.split(":")[2][1:]) for token in sink.order]
    assert sequences == sorted(sequences) and sequences[-1] >= 6


class FailingSink(RecordingSink):
    def write(self, table: str, rows: pa.Table, token: str) -> None:
        if ":c2:" in token:
            raise SinkError("ClickHouse said no")
        super().write(table, rows, token)


def test_a_failed_write_fails_the_run_and_the_checkpoint_stays_where_it_was(
    tmp_path: Path, cpu_backend: Backend
) -> None:
    settings = config(tmp_path)
    pipeline = Pipeline(settings, sink=FailingSink(), backend=cpu_backend)
    with pytest.raises(SinkError, match="ClickHouse said no"):
        try:
            pipeline.run()
        finally:
            pipeline.close()
    again = Pipeline(settings, sink=RecordingSink(), backend=cpu_backend)
    try:
        checkpoint = again.store.load(0)
    finally:
        again.close()
    assert checkpoint is not None and checkpoint.position == 1000, "only checkpoint 1 is durable"
    assert again.store.intent(0) == (2000, False), "checkpoint 2 was under way"

"""Writes sized for ClickHouse: rows wait for the checkpoint, one block per partition and table.

A recording sink stands in for ClickHouse here (the real engine is used by test_recovery,
test_cli and the Kafka tests); these tests pin down how many inserts a run makes and how
their tokens are named, which the exactly-once argument of docs/semantics.md relies on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig
from gpu_pipeline.runtime.outbox import Outbox
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.sinks.base import Sink
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks


class RecordingSink(Sink):
    """Remembers every write; answers the job-record queries as an empty database would."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int, str]] = []

    def open(self, *, create_schema: bool = True) -> None:
        pass

    def write(self, table: str, rows: pa.Table, token: str) -> None:
        self.writes.append((table, rows.num_rows, token))

    def query(self, sql: str) -> pa.Table:
        if "count()" in sql:
            return pa.table({"name": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
        return pa.table(
            {
                "job_id": pa.array([], pa.string()),
                "identity": pa.array([], pa.string()),
                "cuts": pa.array([], pa.string()),
            }
        )

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "recording sink"


def run(tmp_path: Path, backend: Backend, interval_ms: int) -> RecordingSink:
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(generate_ndjson_chunks(5000, 3)))
    config = dataclasses.replace(
        RunConfig(),
        source=f"file:{data}",
        sink=f"chdb://{tmp_path / 'unused'}",
        checkpoint_dir=str(tmp_path / f"ckpt{interval_ms}"),
        batch_size=1000,
        checkpoint_interval_ms=interval_ms,
        progress="never",
    )
    sink = RecordingSink()
    Pipeline(config, sink=sink, backend=backend).run()
    return sink


def test_a_run_that_checkpoints_once_inserts_once_per_table(
    tmp_path: Path, cpu_backend: Backend
) -> None:
    sink = run(tmp_path, cpu_backend, 3_600_000)
    tables = [table for table, _, _ in sink.writes]
    assert sorted(tables) == sorted(set(tables)), "one insert per table"
    assert {"events", "sessions", "traffic_1m", "product_5m"} <= set(tables)
    assert all(":0:c1:start-5000:" in token for _, _, token in sink.writes)


def test_a_checkpoint_per_batch_inserts_per_batch_with_ranges(
    tmp_path: Path, cpu_backend: Backend
) -> None:
    sink = run(tmp_path, cpu_backend, 0)
    events = [token for table, _, token in sink.writes if table == "events"]
    ranges = [token.split(":")[3] for token in events]
    assert ranges == ["start-1000", "1000-2000", "2000-3000", "3000-4000", "4000-5000"]
    sequences = [token.split(":")[2] for token in events]
    assert sequences == ["c1", "c2", "c3", "c4", "c5"]


def test_the_outbox_keeps_arrival_order_and_counts_rows() -> None:
    outbox = Outbox()
    outbox.add(1, {"events": pa.table({"x": [1, 2]}), "sessions": pa.table({"y": []})})
    outbox.add(1, {"events": pa.table({"x": [3]})})
    outbox.add(2, {"events": pa.table({"x": [9]})})
    assert outbox.rows == 4
    taken = outbox.take(1)
    assert taken["events"]["x"].to_pylist() == [1, 2, 3] and "sessions" not in taken
    assert outbox.rows == 1 and outbox.take(1) == {}
    outbox.drop(2)
    assert outbox.rows == 0

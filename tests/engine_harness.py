"""Run the engine the way the pipeline does, on in-memory records, for comparisons.

``engine_run`` feeds each partition's records through the decoder and a
:class:`PartitionProcessor` in micro-batches of a chosen size, optionally snapshotting and
restoring the operators into fresh ones between batches (as a restart would), flushes, and
returns the tables as the reference model does (window tables reduced to their final
versions, as ``FINAL`` shows them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.runtime.partition import BatchCounts, PartitionProcessor
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sources.base import RawBatch
from tests.reference import Record, canonical, keep_final_versions


@dataclass
class EngineResult:
    """The engine's tables (final window versions) and counts."""

    tables: dict[str, pa.Table]
    counts: BatchCounts = field(default_factory=BatchCounts)
    all_window_rows: dict[str, pa.Table] = field(default_factory=dict)


def raw_batch(partition: int, records: Sequence[Record], source: str = "test") -> RawBatch:
    """The records as one RawBatch, with their source timestamps if the records carry them."""
    buffer = bytearray()
    starts, ends = [], []
    for record in records:
        starts.append(len(buffer))
        buffer += record[2]
        ends.append(len(buffer))
        buffer += b"\n"
    next_offset = records[-1][0] + 1 if records else 0
    stamped = bool(records) and len(records[0]) == 4
    return RawBatch(
        partition=partition,
        buffer=bytes(buffer),
        starts=np.array(starts, dtype=np.int64),
        ends=np.array(ends, dtype=np.int64),
        offsets=np.array([r[0] for r in records], dtype=np.int64),
        seqs=np.array([r[1] for r in records], dtype=np.int32),
        source=source,
        next_offset=next_offset,
        timestamps=np.array([r[-1] for r in records], dtype=np.int64) if stamped else None,
    )


def engine_run(
    partitions: Mapping[int, Sequence[Record]],
    semantics: Semantics,
    backend: Backend,
    batch_size: int = 1_000_000,
    *,
    restore_every_batch: bool = False,
    source: str = "test",
) -> EngineResult:
    """Run every partition through decode + operators in batches of ``batch_size`` records."""
    decoder = ArrowJsonDecoder()
    collected: dict[str, list[pa.Table]] = {name: [] for name in schema.OUTPUT_TABLES}
    counts = BatchCounts()
    for partition in sorted(partitions):
        records = list(partitions[partition])
        processor = PartitionProcessor(partition, semantics, backend)
        for start in range(0, len(records), batch_size):
            raw = raw_batch(partition, records[start : start + batch_size], source)
            output = processor.process(raw, decoder.decode(raw))
            counts.add(output.counts)
            for name, table in output.tables.items():
                collected[name].append(table)
            if restore_every_batch:
                state = processor.snapshot()
                processor = PartitionProcessor(partition, semantics, backend)
                processor.restore(state)
        for name, table in processor.flush().tables.items():
            collected[name].append(table)
    tables: dict[str, pa.Table] = {}
    all_windows: dict[str, pa.Table] = {}
    for name, table_schema in schema.OUTPUT_TABLES.items():
        parts = [t.select(table_schema.names).cast(table_schema) for t in collected[name]]
        table = pa.concat_tables(parts) if parts else table_schema.empty_table()
        if name in schema.VERSIONED_TABLES:
            all_windows[name] = table
            table = keep_final_versions(name, table)
        tables[name] = canonical(name, table)
    return EngineResult(tables, counts, all_windows)


def without_ingest_lag(tables: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """The tables with ``quality_1m``'s ingest-lag columns zeroed: for comparing a Kafka run
    with a run over the same records from a file, which has no message timestamps."""
    out = dict(tables)
    quality = out["quality_1m"]
    for column in ("lag_events", "lag_ms_sum", "lag_ms_max"):
        index = quality.schema.get_field_index(column)
        zeros = pa.array([0] * quality.num_rows, pa.int64())
        quality = quality.set_column(index, quality.schema.field(index), zeros)
    out["quality_1m"] = quality
    return out


def dead_letter_fields(table: pa.Table) -> list[tuple[object, ...]]:
    """Dead letters reduced to what must agree: position, raw bytes and the field named."""
    return sorted(
        (r["partition"], r["offset"], r["seq"], r["raw"], r["error"].split(":", 1)[0])
        for r in table.to_pylist()
    )


def assert_tables_equal(actual: Mapping[str, pa.Table], expected: Mapping[str, pa.Table]) -> None:
    """Every output table equal, row by row; dead letters compared by field, not wording."""
    for name in schema.OUTPUT_TABLES:
        if name == "dead_letters":
            a = canonical(name, actual[name])
            e = canonical(name, expected[name])
            assert dead_letter_fields(a) == dead_letter_fields(e), name
            continue
        assert_table_equal(name, actual[name], expected[name])


def assert_table_equal(name: str, actual: pa.Table, expected: pa.Table) -> None:
    """Row-by-row equality of one table, every column; the first differences on failure."""
    a_rows = canonical(name, actual).to_pylist()
    e_rows = canonical(name, expected).to_pylist()
    if a_rows != e_rows:
        missing = [r for r in e_rows if r not in a_rows][:3]
        extra = [r for r in a_rows if r not in e_rows][:3]
        raise AssertionError(
            f"{name}: {len(a_rows)} rows vs {len(e_rows)} expected\n"
            f"missing (first 3): {missing}\nunexpected (first 3): {extra}"
        )

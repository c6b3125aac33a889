"""The event-time guard (SPEC §2.9): far-future times set apart, legitimate pauses kept.

The vectorised scan is checked against a one-event-at-a-time model of the rule; the whole
partition processor against the reference model on streams with planted corrupt times and
long legitimate gaps, at every batch size and across snapshot/restore.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.operators.guard import screen
from gpu_pipeline.operators.watermark import NEG_INF
from gpu_pipeline.runtime.partition import PartitionProcessor
from gpu_pipeline.semantics import HOUR_MS, MINUTE_MS, Semantics
from tests.engine_harness import assert_tables_equal, engine_run, raw_batch
from tests.reference import Record, reference_run

BASE = 1_795_608_000_000  # 2026-11-25T08:00:00Z
YEAR_MS = 365 * 86_400_000


def sequential_screen(ts: list[int], max_ts: int, bound: int) -> tuple[list[int], bool]:
    """The rule, one event at a time: (rejected indices, whether the last one is held)."""
    rejected: list[int] = []
    reference = max_ts
    for i, t in enumerate(ts):
        suspect = reference == NEG_INF or t > reference + bound
        if suspect and i == len(ts) - 1:
            return rejected, True
        if suspect and ts[i + 1] < t - bound:
            rejected.append(i)
            continue
        reference = max(reference, t)
    return rejected, False


steps = st.one_of(
    st.integers(-3 * MINUTE_MS, 3 * MINUTE_MS),
    st.integers(-3 * HOUR_MS, 3 * HOUR_MS),
    st.sampled_from([HOUR_MS, HOUR_MS + 1, -HOUR_MS, -HOUR_MS - 1, 40 * YEAR_MS]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(steps, max_size=80),
    st.sampled_from([NEG_INF, BASE, BASE - 2 * HOUR_MS]),
    st.sampled_from([1, MINUTE_MS, HOUR_MS]),
)
def test_scan_equals_the_one_event_at_a_time_rule(
    deltas: list[int], max_ts: int, bound: int
) -> None:
    ts = [max(0, BASE + d) for d in deltas]
    verdict = screen(np.array(ts, dtype=np.int64), max_ts, bound)
    assert ([r.index for r in verdict.rejected], verdict.hold_last) == sequential_screen(
        ts, max_ts, bound
    )
    for r in verdict.rejected:
        assert r.ts_ms == ts[r.index] and r.successor_ts_ms == ts[r.index + 1]


@pytest.mark.parametrize("seed", range(6))
def test_dense_corruption_takes_the_plain_pass_with_the_same_verdicts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    ts = BASE + np.cumsum(rng.integers(0, 3 * MINUTE_MS, n))
    corrupt = rng.random(n) < rng.choice([0.05, 0.3, 0.6])
    # far apart from each other too, so that consecutive corrupt times never confirm each other
    spread = rng.integers(0, 10**6, int(corrupt.sum())) * 2 * HOUR_MS
    ts[corrupt] += 40 * YEAR_MS + spread
    verdict = screen(ts.astype(np.int64), int(BASE), HOUR_MS)
    expected = sequential_screen(ts.tolist(), int(BASE), HOUR_MS)
    assert ([r.index for r in verdict.rejected], verdict.hold_last) == expected
    assert len(expected[0]) > 32


def test_scan_stays_linear_when_every_other_time_is_corrupt() -> None:
    n = 200_000
    ts = BASE + np.arange(n, dtype=np.int64) * 10
    ts[1::2] += 40 * YEAR_MS
    verdict = screen(ts, BASE, HOUR_MS)
    assert len(verdict.rejected) == n // 2 - 1 and verdict.hold_last


# ---------------------------------------------------------------------------- streams


def event(i: int, ts_ms: int, user: int = 1) -> bytes:
    return json.dumps(
        {"event_id": f"e{i}", "user_id": user, "ts": ts_ms, "event_type": "page_view", "page": "/"}
    ).encode()


def steady(n: int, start: int = BASE, step_ms: int = 7_000) -> list[int]:
    return [start + i * step_ms for i in range(n)]


def records(times: list[int]) -> list[Record]:
    return [(i, 0, event(i, t, user=i % 5)) for i, t in enumerate(times)]


BATCH_SIZES = [1, 2, 3, 7, 1000]


@pytest.mark.parametrize("position", [0, 1, 17, 38, 39])
@pytest.mark.parametrize("ahead_ms", [HOUR_MS + 1, 3 * HOUR_MS, 40 * YEAR_MS])
def test_one_far_future_time_changes_nothing_else(
    cpu_backend: Backend, position: int, ahead_ms: int
) -> None:
    clean = records(steady(40))
    corrupt_raw = event(999, BASE + position * 7_000 + ahead_ms)
    planted = clean[:position] + [(position, 0, corrupt_raw)]
    planted += [(offset + 1, 0, raw) for offset, _, raw in clean[position:]]
    expected = reference_run({0: planted}).tables
    without = reference_run({0: [r for r in planted if r[2] != corrupt_raw]}).tables
    assert expected["dead_letters"].to_pylist()[0]["raw"] == corrupt_raw
    assert expected["dead_letters"].num_rows == 1
    for name in ("sessions", "traffic_1m", "product_5m", "late_events"):
        assert expected[name].equals(without[name]), name
    assert expected["events"].num_rows == without["events"].num_rows == 40
    for batch_size in BATCH_SIZES:
        for restore in (False, True):
            result = engine_run(
                {0: planted}, Semantics(), cpu_backend, batch_size, restore_every_batch=restore
            )
            assert_tables_equal(result.tables, expected)
            assert result.counts.future_ts == 1
    error = engine_run({0: planted}, Semantics(), cpu_backend, 5).tables["dead_letters"]
    assert error["error"][0].as_py().startswith("ts: ")
    assert "max_future_skew (1h)" in error["error"][0].as_py()


def test_without_the_guard_one_corrupt_time_makes_the_partition_late(
    cpu_backend: Backend,
) -> None:
    """The failure the guard exists for (SPEC §2.9), as the contract without it describes."""
    planted = records(steady(5) + [BASE + 40 * YEAR_MS] + steady(30, BASE + 35_000))
    off = Semantics(max_future_skew_ms=0)
    result = engine_run({0: planted}, off, cpu_backend, 4)
    assert result.counts.late == 30
    guarded = engine_run({0: planted}, Semantics(), cpu_backend, 4)
    assert guarded.counts.late == 0 and guarded.counts.future_ts == 1


@pytest.mark.parametrize("gap_ms", [HOUR_MS + 1, 5 * HOUR_MS, 30 * 86_400_000])
def test_a_long_legitimate_pause_loses_nothing(cpu_backend: Backend, gap_ms: int) -> None:
    times = steady(20) + steady(20, BASE + 20 * 7_000 + gap_ms) + [BASE + 2 * gap_ms] * 2
    stream = {0: records(times)}
    guarded = reference_run(stream).tables
    unguarded = reference_run(stream, Semantics(max_future_skew_ms=0)).tables
    assert guarded["dead_letters"].num_rows == 0
    for name, table in unguarded.items():
        assert guarded[name].equals(table), name
    for batch_size in BATCH_SIZES:
        assert_tables_equal(
            engine_run(stream, Semantics(), cpu_backend, batch_size).tables, guarded
        )


def test_a_suspect_last_event_passes_at_end_of_input(cpu_backend: Backend) -> None:
    stream = {0: records(steady(10) + [BASE + 40 * YEAR_MS])}
    expected = reference_run(stream).tables
    assert expected["dead_letters"].num_rows == 0 and expected["events"].num_rows == 11
    assert_tables_equal(engine_run(stream, Semantics(), cpu_backend, 3).tables, expected)


def test_the_first_event_of_a_partition_is_checked_against_the_next(
    cpu_backend: Backend,
) -> None:
    stream = {0: records([BASE + 40 * YEAR_MS, *steady(10)])}
    expected = reference_run(stream).tables
    assert expected["dead_letters"]["offset"].to_pylist() == [0]
    for batch_size in (1, 4):
        assert_tables_equal(
            engine_run(stream, Semantics(), cpu_backend, batch_size).tables, expected
        )


# ---------------------------------------------------------------------------- the processor


def processor_with_held(cpu_backend: Backend) -> tuple[PartitionProcessor, int]:
    processor = PartitionProcessor(0, Semantics(), cpu_backend)
    decoder = ArrowJsonDecoder()
    lines = records(steady(5))
    far = BASE + 40 * YEAR_MS
    lines.append((5, 0, event(5, far)))
    raw = raw_batch(0, lines)
    output = processor.process(raw, decoder.decode(raw))
    assert output.tables["events"].num_rows == 5
    assert processor.guard.held.num_rows == 1
    return processor, far


def test_a_held_event_survives_snapshot_and_restore(cpu_backend: Backend) -> None:
    processor, far = processor_with_held(cpu_backend)
    state = processor.snapshot()
    restored = PartitionProcessor(0, Semantics(), cpu_backend)
    restored.restore(state)
    held = restored.guard.held
    assert held["raw"][0].as_py() == event(5, far) and held["source"][0].as_py() == "test"
    flushed = restored.flush()
    assert flushed.tables["events"]["offset"].to_pylist() == [5]


def test_the_idle_clock_decides_a_held_event(cpu_backend: Backend) -> None:
    processor, far = processor_with_held(cpu_backend)
    output = processor.advance_idle(BASE + 2 * MINUTE_MS)
    dead = output.tables["dead_letters"].to_pylist()
    assert [d["offset"] for d in dead] == [5] and "wall clock" in dead[0]["error"]
    assert output.counts.future_ts == 1
    plausible, _ = processor_with_held(cpu_backend)
    output = plausible.advance_idle(far - MINUTE_MS)
    assert output.tables["events"]["offset"].to_pylist() == [5]
    assert "dead_letters" not in output.tables


def test_old_checkpoints_without_guard_state_restore(cpu_backend: Backend) -> None:
    processor = PartitionProcessor(0, Semantics(), cpu_backend)
    state = processor.snapshot()
    del state["guard"]
    processor.restore(state)
    assert processor.guard.held.num_rows == 0


def test_the_bound_must_cover_the_declared_disorder() -> None:
    with pytest.raises(ConfigError) as caught:
        Semantics(max_out_of_orderness_ms=5_000, allowed_lateness_ms=60_000, max_future_skew_ms=1)
    assert caught.value.option == "max_future_skew_ms"
    Semantics(max_future_skew_ms=0)
    Semantics(max_future_skew_ms=65_000)


def test_guard_rows_keep_the_decoded_schema() -> None:
    from gpu_pipeline import schema
    from gpu_pipeline.operators.guard import HELD_SCHEMA

    assert HELD_SCHEMA.names[: len(schema.DECODED_EVENTS)] == schema.DECODED_EVENTS.names
    assert pa.types.is_binary(HELD_SCHEMA.field("raw").type)

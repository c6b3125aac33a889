"""The engines agree with the reference model of the semantics on random streams.

Properties: engine tables == reference tables on adversarial small streams; the result
does not depend on the micro-batch size; snapshot + restore between any batches changes
nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.semantics import Semantics
from tests.engine_harness import assert_tables_equal, engine_run
from tests.reference import reference_run
from tests.streams import StreamCase, random_stream, record_streams


@settings(max_examples=150, deadline=None)
@given(case=record_streams(), batch_size=st.integers(1, 25))
def test_engine_matches_reference(backend: Backend, case: StreamCase, batch_size: int) -> None:
    expected = reference_run(case.partitions, case.semantics)
    actual = engine_run(case.partitions, case.semantics, backend, batch_size)
    assert_tables_equal(actual.tables, expected.tables)
    assert actual.counts.duplicates == expected.stats["duplicates"]
    assert actual.counts.late == expected.stats["late"]


@settings(max_examples=60, deadline=None)
@given(case=record_streams(), batch_size=st.integers(1, 10))
def test_snapshot_restore_between_batches_changes_nothing(
    backend: Backend, case: StreamCase, batch_size: int
) -> None:
    expected = reference_run(case.partitions, case.semantics)
    actual = engine_run(
        case.partitions, case.semantics, backend, batch_size, restore_every_batch=True
    )
    assert_tables_equal(actual.tables, expected.tables)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_larger_streams_are_batch_size_invariant(backend: Backend, seed: int) -> None:
    semantics = Semantics()
    partitions = random_stream(seed, 3000, partitions=2, users=40)
    expected = reference_run(partitions, semantics)
    results = [engine_run(partitions, semantics, backend, size) for size in (1000000, 997, 64, 7)]
    for result in results:
        assert_tables_equal(result.tables, expected.tables)

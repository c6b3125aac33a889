"""hash_strings against the Python definition in gpu_pipeline.hashing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.hashing import hash_bytes

ALL_ONES = np.uint64(2**64 - 1)


def _hash(backend: Backend, values: list[str], mask: np.uint64 = ALL_ONES) -> np.ndarray:
    strings = backend.strings(pa.array(values, type=pa.string()))
    out = backend.xp.zeros(len(values), dtype=backend.xp.uint64)
    backend.kernels.hash_strings(len(values), strings.offsets, strings.chars, mask, out)
    return backend.to_host(out)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=70), max_size=40))
def test_hash_matches_python(backend: Backend, values: list[str]) -> None:
    expected = [hash_bytes(v.encode()) for v in values]
    assert _hash(backend, values).tolist() == expected


def test_hash_of_sliced_array_and_mask(backend: Backend) -> None:
    arr = pa.array(["x", "abc", "", "é"]).slice(1)
    strings = backend.strings(arr)
    out = backend.xp.zeros(3, dtype=backend.xp.uint64)
    backend.kernels.hash_strings(3, strings.offsets, strings.chars, np.uint64(0xF), out)
    assert backend.to_host(out).tolist() == [hash_bytes(s.encode()) & 0xF for s in ["abc", "", "é"]]


def test_empty_input(backend: Backend) -> None:
    assert _hash(backend, []).tolist() == []

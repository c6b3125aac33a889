"""The array primitives every engine must provide, on every engine.

``Backend.running_max`` is written once in portable form (the GPU engine's code path) and
overridden by the CPU engine; both are compared with numpy here.  The portable version runs
on numpy too, so its logic is checked on machines without a GPU, and the ``gpu`` run checks
it on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.backend.cpu import CpuBackend
from gpu_pipeline.operators.watermark import NEG_INF

INT64 = st.integers(NEG_INF, 2**63 - 1)


class PortableNumpy(CpuBackend):
    """The CPU engine with the base class's portable primitives (the GPU engine's code)."""

    def running_max(self, values: Any) -> Any:
        return Backend.running_max(self, values)


@pytest.fixture(scope="module")
def portable() -> Backend:
    return PortableNumpy()


@given(arrays(np.int64, st.integers(0, 300), elements=INT64))
def test_portable_running_max_equals_numpy(portable: Backend, values: np.ndarray) -> None:
    np.testing.assert_array_equal(portable.running_max(values), np.maximum.accumulate(values))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025, 100_003])
def test_running_max_on_every_engine(backend: Backend, portable: Backend, n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.integers(-(10**15), 10**15, n, dtype=np.int64)
    values[: n // 3] = np.sort(values[: n // 3])  # runs that rise, and stretches that do not
    expected = np.maximum.accumulate(values)
    for engine in (backend, portable):
        got = engine.to_host(engine.running_max(engine.asarray(values)))
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.int64

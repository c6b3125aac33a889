"""The backend seam: the array module, the kernels and host/device transfers of one engine.

Operators are written once against a :class:`Backend`; they see ``backend.xp`` (numpy or
cupy), ``backend.kernels`` (the typed launchers of ``kernels/*.cu`` for this target) and the
transfer helpers below, never a GPU library directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline.backend.kernels import KernelLibrary


@dataclass(frozen=True)
class DeviceStrings:
    """A string column in Arrow layout on the backend's device.

    String ``i`` is ``chars[offsets[i]:offsets[i + 1]]`` (UTF-8 bytes); offsets are int64.
    """

    offsets: Any
    chars: Any

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1


def host_strings(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Int64 offsets and uint8 chars of a (large_)string/binary array, zero-copy where possible.

    Nulls are read as empty strings; callers pass non-null columns.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        array = array.cast(pa.large_binary())
    elif pa.types.is_large_string(array.type):
        array = array.view(pa.large_binary())
    n = len(array)
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1, offset=array.offset * 8)
    chars = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None and buffers[2].size
        else np.zeros(1, dtype=np.uint8)
    )
    return np.ascontiguousarray(offsets), chars


class Backend(ABC):
    """One engine's array module, kernels and transfers."""

    name: str
    xp: Any
    kernels: KernelLibrary

    @abstractmethod
    def asarray(self, host: np.ndarray) -> Any:
        """Move a host array to the device (no copy on the CPU)."""

    @abstractmethod
    def to_host(self, array: Any) -> np.ndarray:
        """Bring a device array back to a numpy array."""

    def running_max(self, values: Any) -> Any:
        """Inclusive prefix maximum of a 1-D int64 array, on the device.

        The portable formulation: Hillis-Steele doubling, ``ceil(log2 n)`` steps of one
        elementwise ``maximum`` over shifted slices into a fresh buffer (no aliasing), which
        every array module supports.  CuPy implements ``ufunc.accumulate`` only for ``add``
        and ``multiply``, so ``maximum.accumulate`` is not an option there; the CPU engine
        overrides this with numpy's sequential ``maximum.accumulate``.
        """
        xp = self.xp
        out = values.copy()
        n = int(out.shape[0])
        shift = 1
        while shift < n:
            step = out.copy()
            xp.maximum(out[shift:], out[:-shift], out=step[shift:])
            out, shift = step, shift * 2
        return out

    def strings(self, array: pa.Array | pa.ChunkedArray) -> DeviceStrings:
        """A non-null Arrow string column on the device."""
        offsets, chars = host_strings(array)
        return DeviceStrings(self.asarray(offsets), self.asarray(chars))

    def describe(self) -> str:
        """A one-line description for logs and the run summary."""
        return self.name

"""Every kernel builds for both targets: NVRTC for sm_90 (no GPU needed) and C++/OpenMP."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_pipeline.backend import kernels
from gpu_pipeline.errors import KernelError


def test_nvrtc_compiles_every_kernel_for_sm90() -> None:
    ptx = kernels.compile_with_nvrtc("sm_90")
    assert ".target sm_90" in ptx
    for name in kernels.parse_signatures(kernels.kernel_source()):
        assert f".entry {name}(" in ptx, f"kernel {name} missing from the PTX"


def test_nvrtc_failure_surfaces_the_log(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path  # type: ignore[assignment]
    (folder / "portable.cuh").write_text(kernels.kernels_dir().joinpath("portable.cuh").read_text())  # type: ignore[operator]
    (folder / "broken.cu").write_text(
        '#include "portable.cuh"\nKERNEL void broken(i64 n) { undefined_thing(); }\n'
    )  # type: ignore[operator]
    monkeypatch.setenv("GPU_PIPELINE_KERNELS_DIR", str(folder))
    with pytest.raises(KernelError, match="undefined_thing"):
        kernels.compile_with_nvrtc("sm_90")


def test_cpu_build_exposes_every_kernel() -> None:
    lib = kernels.load_cpu()
    assert set(lib.names) == set(kernels.parse_signatures(kernels.kernel_source()))


def test_launcher_rejects_wrong_dtype_and_arity() -> None:
    lib = kernels.load_cpu()
    offsets = np.array([0, 1], dtype=np.int64)
    chars = np.frombuffer(b"a", dtype=np.uint8).copy()
    with pytest.raises(KernelError, match="out must be uint64"):
        lib.hash_strings(1, offsets, chars, np.uint64(0), np.zeros(1, dtype=np.int64))
    with pytest.raises(KernelError, match="takes 5 arguments"):
        lib.hash_strings(1, offsets)
    with pytest.raises(KernelError, match="C-contiguous"):
        lib.hash_strings(1, offsets, chars, np.uint64(0), np.zeros(4, dtype=np.uint64)[::2])


def test_missing_compiler_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("GPU_PIPELINE_CACHE_DIR", str(tmp_path))
    with pytest.raises(KernelError, match="no C\\+\\+ compiler"):
        kernels.build_cpu_library("release")

"""The kernel tests under ThreadSanitizer + Archer with several OpenMP threads.

First proves the detector catches a deliberately racy kernel (so a clean run means
something), then runs every kernel test module under it and requires zero reports.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.kernels import tsan

pytestmark = pytest.mark.tsan
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = tsan.unavailable_reason()
    if reason:
        pytest.skip(f"race detector unavailable: {reason}")
    return tsan.build_launcher(tmp_path_factory.mktemp("tsan"))


def _racy_env(tmp: Path) -> dict[str, str]:
    folder = tmp / "racy-kernels"
    folder.mkdir()
    shutil.copy(HERE.parents[1] / "kernels" / "portable.cuh", folder)
    shutil.copy(HERE / "racy" / "racy.cu", folder)
    return {"GPU_PIPELINE_KERNELS_DIR": str(folder), "GPU_PIPELINE_CACHE_DIR": str(tmp / "cache")}


SCRIPT = """
import sys
import numpy as np
from gpu_pipeline.backend.kernels import load_cpu
lib = load_cpu()
counter = np.zeros(1, dtype=np.int64)
getattr(lib, sys.argv[1])(200000, counter)
print("count", int(counter[0]))
"""


def test_detector_reports_a_racy_kernel(launcher: Path, tmp_path: Path) -> None:
    result = tsan.run_under_tsan(launcher, ["-c", SCRIPT, "racy_count"], _racy_env(tmp_path))
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert result.returncode == 66


def test_detector_is_quiet_on_the_atomic_twin(launcher: Path, tmp_path: Path) -> None:
    result = tsan.run_under_tsan(launcher, ["-c", SCRIPT, "atomic_count"], _racy_env(tmp_path))
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0
    assert "count 200000" in result.stdout


def test_kernel_tests_are_race_free(launcher: Path, tmp_path: Path) -> None:
    modules = sorted(
        str(p)
        for p in HERE.glob("test_*.py")
        if p.name not in (Path(__file__).name, "test_build.py")
    )
    result = tsan.run_under_tsan(
        launcher,
        [
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not tsan and not gpu",
            *modules,
        ],
        {"GPU_PIPELINE_CACHE_DIR": str(tmp_path / "cache"), "HYPOTHESIS_PROFILE": "tsan"},
    )
    output = result.stdout[-4000:] + result.stderr[-6000:]
    assert "ThreadSanitizer" not in result.stderr, output
    assert result.returncode == 0, output
    assert " passed" in result.stdout, output
    assert sys.executable  # the launcher embeds this interpreter's libpython

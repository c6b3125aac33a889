"""benchmarks/gpu_check.py, the script a GPU machine runs, stays runnable: its every step with
the CPU engine on both sides, and a clear exit where there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gpu_pipeline.backend.gpu import gpu_unavailable_reason
from tests.pipeline_runs import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--events", "30000", "--batch-size", "7000"]
        + ["--self-test", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every output equal on both engines" in done.stdout
    report = json.loads(out.read_text())
    assert report["table_differences"] == [] and report["decode"]["mismatches"] == 0
    assert report["operators_s"]["gpu"]["whole batch loop"] > 0


def test_without_a_gpu_it_says_why() -> None:
    reason = gpu_unavailable_reason()
    if reason is None:
        return  # a GPU is here: the check itself runs in benchmarks/gpu_check.sh
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--events", "100"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "no usable GPU" in done.stdout

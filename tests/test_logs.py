"""``--log-format json``: nothing but JSON on stderr, the summary as JSON on stdout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from gpu_pipeline.logs import JsonFormatter

REPO = Path(__file__).resolve().parents[1]


def cli(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_")}
    if "GPU_PIPELINE_CACHE_DIR" in os.environ:
        clean["GPU_PIPELINE_CACHE_DIR"] = os.environ["GPU_PIPELINE_CACHE_DIR"]
    return subprocess.run(
        [sys.executable, "-m", "gpu_pipeline.cli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **(env or {}), "PYTHONPATH": str(REPO)},
        timeout=300,
    )


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def test_a_record_is_one_json_object_with_its_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "gpu_pipeline", "levelname": "WARNING", "msg": "lag %d", "args": (3,)}
    )
    record.partition = 2
    payload = json.loads(JsonFormatter().format(record))
    assert payload["level"] == "warning" and payload["message"] == "lag 3"
    assert payload["partition"] == 2 and payload["ts"].endswith("Z")


def test_a_run_logs_json_and_prints_its_summary_as_json(tmp_path: Path) -> None:
    done = cli(
        "run",
        "--log-format",
        "json",
        "--events",
        "3000",
        "--sink",
        "chdb://ch",
        "--checkpoint-dir",
        "ck",
        "--progress",
        "always",  # JSON mode turns bars off anyway: they are not JSON
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stderr)
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    job = next(r["job"] for r in records if "job" in r)
    (summary,) = json_lines(done.stdout)
    assert summary["outcome"] == "completed" and summary["job"] == job
    counters = summary["counters"]
    assert isinstance(counters, dict) and counters["records"] == 3000
    assert counters["records"] == counters["events"] + counters["dead_letters"]
    rerun = cli(
        "run",
        "--events",
        "3000",
        "--sink",
        "chdb://ch",
        "--checkpoint-dir",
        "ck",
        cwd=tmp_path,
        env={"GPU_PIPELINE_LOG_FORMAT": "json"},
    )
    assert rerun.returncode == 0, rerun.stderr
    assert json_lines(rerun.stdout)[0]["outcome"] == "already complete"
    assert any(r.get("outcome") == "already complete" for r in json_lines(rerun.stderr))


def test_errors_are_json_naming_the_option_and_a_bad_format_is_refused(tmp_path: Path) -> None:
    bad = cli("run", "--log-format", "json", "--batch-size", "-3", cwd=tmp_path)
    assert bad.returncode == 2
    (error,) = json_lines(bad.stderr)
    assert error["level"] == "error" and error["option"] == "batch_size"
    wrong = cli("run", "--log-format", "yaml", cwd=tmp_path)
    assert wrong.returncode == 2 and "log_format" in wrong.stderr

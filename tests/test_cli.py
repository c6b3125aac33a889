"""The command line end to end: generate, run (file source), embedded ClickHouse; bad options.

The tables in ClickHouse must equal the reference model's tables for the same records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from gpu_pipeline import schema
from gpu_pipeline.sinks.base import open_sink
from tests.engine_harness import assert_tables_equal
from tests.reference import reference_run

CLI = [sys.executable, "-m", "gpu_pipeline.cli"]


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )


def run_job(source: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``gpu-pipeline run`` of ``source`` on the CPU engine into this test's chdb folder."""
    return cli(
        "run", "--source", source, "--sink", f"chdb://{tmp_path / 'ch'}",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--engine", "cpu", "--progress", "never",
        *extra,
    )  # fmt: skip


def read_tables(sink_url: str) -> dict[str, pa.Table]:
    sink = open_sink(sink_url, "clickstream")
    try:
        tables = {}
        for name in schema.OUTPUT_TABLES:
            final = " FINAL" if name in schema.VERSIONED_TABLES else ""
            tables[name] = sink.query(f"SELECT * FROM clickstream.{name}{final}")
        return tables
    finally:
        sink.close()


def test_generate_then_run_file_matches_reference(tmp_path: Path) -> None:
    data = tmp_path / "events.ndjson"
    gen = cli("generate", "--events", "30000", "--seed", "5", "--out", str(data))
    assert gen.returncode == 0, gen.stderr
    sink = f"chdb://{tmp_path / 'ch'}"
    run = run_job(f"file:{data}", tmp_path, "--batch-size", "7000")
    assert run.returncode == 0, run.stderr
    assert "engine: cpu" in run.stderr
    assert "records in" in run.stdout and "30,000" in run.stdout
    records = [
        (i, 0, line) for i, line in enumerate(data.read_bytes().splitlines()) if line.strip()
    ]
    expected = reference_run({0: records}, source=f"file:{data}")
    actual = read_tables(sink)
    assert_tables_equal(actual, expected.tables)
    assert expected.tables["dead_letters"].num_rows > 0
    assert expected.tables["late_events"].num_rows > 0
    # a second run of the same job is a no-op that says so
    again = run_job(f"file:{data}", tmp_path, "--batch-size", "7000")
    assert again.returncode == 0 and "already ran to completion" in again.stderr
    # --fresh reruns it; idempotent inserts keep the tables identical
    fresh = run_job(f"file:{data}", tmp_path, "--batch-size", "7000", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert_tables_equal(read_tables(sink), expected.tables)


def test_query_only_reads_it_creates_no_schema(tmp_path: Path) -> None:
    """``query`` runs no DDL (a read-only user could not): a fresh store stays empty."""
    sink = f"chdb://{tmp_path / 'ch'}"
    shown = cli("query", "--sink", sink, "--format", "csv", "SELECT name FROM system.databases")
    assert shown.returncode == 0, shown.stderr
    assert '"clickstream"' not in shown.stdout.splitlines()
    again = cli("query", "--sink", sink, "--format", "csv", "SELECT name FROM system.databases")
    assert '"clickstream"' not in again.stdout.splitlines(), again.stdout


def test_query_formats(tmp_path: Path) -> None:
    sink = f"chdb://{tmp_path / 'ch'}"
    run = run_job("synthetic", tmp_path, "--events", "3000")
    assert run.returncode == 0, run.stderr
    as_json = cli(
        "query", "--sink", sink, "--format", "json", "SELECT count() AS n FROM clickstream.events"
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout.splitlines()[0])["n"] > 0
    as_csv = cli("query", "--sink", sink, "--format", "csv", "SELECT 1 AS a, 'x' AS b")
    assert as_csv.stdout.splitlines() == ['"a","b"', '1,"x"']
    table = cli(
        "query",
        "--sink",
        sink,
        "SELECT event_type, count() AS n FROM clickstream.events GROUP BY event_type",
    )
    assert "page_view" in table.stdout and "row(s)" in table.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["run", "--batch-size", "0"], {}, "batch_size"),
        (["run", "--engine", "tpu"], {}, "engine"),
        (["run", "--session-gap", "soon"], {}, "session_gap_ms"),
        (["run", "--sink", "ftp://x"], {}, "sink"),
        (["run", "--source", "kafka://nohost"], {}, "source"),
        (["run"], {"GPU_PIPELINE_BATCH_SIZE": "many"}, "batch_size"),
        (["run"], {"GPU_PIPELINE_ALLOWED_LATENESS": "-5s"}, "allowed_lateness_ms"),
    ],
)
def test_bad_options_fail_at_once_naming_the_option(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    result = cli(*args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert named in result.stderr
    assert not (tmp_path / "gpu_pipeline_data").exists()


def test_unknown_flag_is_named(tmp_path: Path) -> None:
    result = cli("run", "--bogus-flag", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "--bogus-flag" in result.stderr


def test_config_file_and_precedence(tmp_path: Path) -> None:
    from gpu_pipeline.config import load_config

    config_file = tmp_path / "job.toml"
    config_file.write_text('batch_size = 500\nsession_gap = "10min"\nengine = "cpu"\n')
    config = load_config(
        {"engine": "auto"}, config_file=config_file, environ={"GPU_PIPELINE_BATCH_SIZE": "700"}
    )
    assert config.batch_size == 700  # environment beats the file
    assert config.session_gap_ms == 600_000
    assert config.engine == "auto"  # the command line beats both
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 5\n")
    result = cli("run", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "batch_sise" in result.stderr


def test_empty_file_runs_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    sink = f"chdb://{tmp_path / 'ch'}"
    run = run_job(f"file:{empty}", tmp_path)
    assert run.returncode == 0, run.stderr
    assert all(t.num_rows == 0 for t in read_tables(sink).values())


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    run = run_job(f"file:{tmp_path / 'nope.ndjson'}", tmp_path)
    assert run.returncode == 1
    assert "nope.ndjson" in run.stderr


def test_doctor_reports_every_component(tmp_path: Path) -> None:
    result = cli(
        "doctor", "--sink", f"chdb://{tmp_path / 'ch'}", "--kafka", "127.0.0.1:1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("kernels: CPU target", "NVRTC", "CuPy", "GPU", "cuDF", "ClickHouse", "Kafka"):
        assert name in result.stdout
    assert "--engine auto would use" in result.stdout

"""What a job is, through the real command line and the real embedded ClickHouse.

A job is its source, sink, database and semantics (gpu_pipeline/runtime/job.py): runs that
differ in any of these never share checkpoints or insert tokens; a database holds one job's
output; a database emptied by hand is noticed; a rerun is a no-op only when the job's
output is really there.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from gpu_pipeline.config import RunConfig
from gpu_pipeline.runtime.job import consumer_group, job_id, job_identity
from tests.engine_harness import assert_tables_equal
from tests.reference import reference_run
from tests.test_cli import cli, read_tables

EVENTS = "4000"
WIDE = {"COLUMNS": "1000"}
"""Messages unwrapped, so that tests can look for phrases."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "in.ndjson"
    done = cli("generate", "--events", EVENTS, "--seed", "11", "--out", str(path))
    assert done.returncode == 0, done.stderr
    return path


def run(data: Path, folder: Path, sink: str, *extra: str) -> tuple[int, str]:
    """``gpu-pipeline run`` in ``folder`` (the default checkpoint folder lives there)."""
    done = cli(
        "run", "--source", f"file:{data}", "--sink", f"chdb://{sink}", "--engine", "cpu",
        "--progress", "never", "--batch-size", "900", *extra, cwd=folder, env=WIDE,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def query(folder: Path, sink: str, sql: str, *extra: str) -> list[dict[str, object]]:
    done = cli("query", "--sink", f"chdb://{sink}", "--format", "json", *extra, sql, cwd=folder)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def reference(data: Path) -> dict[str, pa.Table]:
    lines = data.read_bytes().splitlines()
    records = [(i, 0, line) for i, line in enumerate(lines) if line.strip()]
    return reference_run({0: records}, source=f"file:{data}").tables


def test_a_second_sink_gets_the_whole_job(data: Path, tmp_path: Path) -> None:
    """The transcript of the bug: one folder, one input, two sinks; the second was empty."""
    code, out = run(data, tmp_path, "s1")
    assert code == 0, out
    code, out = run(data, tmp_path, "s2")
    assert code == 0, out
    assert "already ran to completion" not in out
    expected = reference(data)
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's1'}"), expected)
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's2'}"), expected)
    # each sink has its own job, checkpoint folder and record of the job
    jobs = {p.name for p in (tmp_path / "gpu_pipeline_data" / "checkpoints").iterdir()}
    assert len(jobs) == 2
    for sink in ("s1", "s2"):
        rows = query(tmp_path, sink, "SELECT job_id FROM clickstream.pipeline_jobs")
        assert len(rows) == 1 and rows[0]["job_id"] in jobs


def test_a_finished_job_is_a_no_op_with_any_batch_size(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    code, out = run(data, tmp_path, "s", "--batch-size", "777")
    assert code == 0 and "already ran to completion" in out, out
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's'}"), reference(data))


def test_another_database_is_another_job(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    code, out = run(data, tmp_path, "s", "--database", "other")
    assert code == 0 and "already ran" not in out, out
    rows = query(tmp_path, "s", "SELECT count() AS n FROM other.events", "--database", "other")
    assert rows[0]["n"] == reference(data)["events"].num_rows


def test_other_semantics_into_the_same_database_are_refused(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    code, out = run(data, tmp_path, "s", "--session-gap", "10min")
    assert code == 1, out
    assert "holds the output of another job" in out and "--database" in out
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's'}"), reference(data))
    code, out = run(data, tmp_path, "s", "--session-gap", "10min", "--database", "gap10")
    assert code == 0, out


def test_fresh_with_another_batch_size_would_double_and_is_refused(
    data: Path, tmp_path: Path
) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    code, out = run(data, tmp_path, "s", "--fresh", "--batch-size", "1000")
    assert code == 1 and "batch_size=900" in out and "twice" in out, out
    assert run(data, tmp_path, "s", "--fresh")[0] == 0  # the same cuts: idempotent
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's'}"), reference(data))


def test_a_dropped_database_is_noticed_and_fresh_rewrites_it(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    assert (
        cli("query", "--sink", f"chdb://{tmp_path / 's'}", "DROP DATABASE clickstream").returncode
        == 0
    )
    code, out = run(data, tmp_path, "s")
    assert code == 1 and "dropped or emptied" in out and "--fresh" in out, out
    assert run(data, tmp_path, "s", "--fresh")[0] == 0
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's'}"), reference(data))


def test_an_emptied_table_is_noticed(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s")[0] == 0
    done = cli("query", "--sink", f"chdb://{tmp_path / 's'}", "TRUNCATE TABLE clickstream.events")
    assert done.returncode == 0, done.stderr
    code, out = run(data, tmp_path, "s")
    assert code == 1 and "events: 0 of" in out and "--fresh" in out, out


def test_a_named_job_must_keep_its_source_and_semantics(data: Path, tmp_path: Path) -> None:
    assert run(data, tmp_path, "s", "--job-id", "nightly")[0] == 0
    assert (tmp_path / "gpu_pipeline_data" / "checkpoints" / "nightly" / "JOB.json").is_file()
    code, out = run(data, tmp_path, "s", "--job-id", "nightly", "--session-gap", "10min")
    assert code == 2 and "job_id" in out and "semantics" in out, out
    code, out = run(data, tmp_path, "s", "--job-id", "bad name")
    assert code == 2 and "job_id" in out, out


def test_the_guard_is_counted_in_the_summary(tmp_path: Path) -> None:
    """The issue's scenario: a flipped digit sends one record 40 years ahead."""
    path = tmp_path / "in.ndjson"
    assert cli("generate", "--events", "3000", "--seed", "3", "--out", str(path)).returncode == 0
    lines = path.read_bytes().splitlines()
    victims = [i for i, line in enumerate(lines) if b'"ts":"2026-' in line][100:101]
    assert victims
    lines[victims[0]] = lines[victims[0]].replace(b'"ts":"2026-', b'"ts":"2066-', 1)
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, out = run(path, tmp_path, "s")
    assert code == 0, out
    assert "far-future ts" in out
    expected = reference(path)
    assert_tables_equal(read_tables(f"chdb://{tmp_path / 's'}"), expected)
    dead = [r for r in expected["dead_letters"].to_pylist() if r["offset"] == victims[0]]
    assert len(dead) == 1 and dead[0]["error"].startswith("ts: ")
    assert expected["late_events"].num_rows < 30


# ---------------------------------------------------------------------------- identity


def test_the_identity_covers_sink_database_and_semantics_but_no_secret() -> None:
    base = RunConfig(sink="http://writer:s3cr3t@ch.example:8123")
    assert "s3cr3t" not in json.dumps(job_identity(base))
    variants = [
        replace(base, sink="http://writer:s3cr3t@other.example:8123"),
        replace(base, sink="chdb://somewhere"),
        replace(base, database="other"),
        replace(base, session_gap_ms=600_000),
        replace(base, max_future_skew_ms=0),
        replace(base, seed=7),
    ]
    ids = {job_id(c) for c in [base, *variants]}
    assert len(ids) == len(variants) + 1
    assert job_id(replace(base, sink="http://writer:other@ch.example:8123")) == job_id(base)
    assert job_id(replace(base, batch_size=7)) == job_id(base)


def test_kafka_jobs_get_their_own_group_and_no_secret_from_the_url() -> None:
    url = "kafka://127.0.0.1:9092/clicks?sasl.password=hunter2"
    config = RunConfig(source=url)
    assert "hunter2" not in json.dumps(job_identity(config))
    one = consumer_group(config, job_id(config))
    two_config = replace(config, sink="chdb://elsewhere")
    two = consumer_group(two_config, job_id(two_config))
    assert one != two and one.startswith("gpu-pipeline-")
    assert consumer_group(replace(config, group_id="mine"), "x") == "mine"


def test_job_ids_are_stable() -> None:
    rng = random.Random(5)
    config = RunConfig(events=rng.randrange(10**6), sink="chdb:///data/ch")
    assert job_id(config) == job_id(replace(config))


def test_secrets_in_kafka_properties_are_never_shown() -> None:
    from gpu_pipeline.config import redact

    shown = redact("kafka://h:9092/t?sasl.username=u&sasl.password=hunter2&ssl.key.password=k")
    assert "hunter2" not in shown and "=k" not in shown and "sasl.username=u" in shown

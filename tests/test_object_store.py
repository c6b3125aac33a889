"""Checkpoints in an object store (``--checkpoint-dir s3://…``): whole runs against a real
S3 API (moto's server over HTTP, reached by s3fs in the pipeline's own processes), killed
at the crash points and on a cluster whose worker is SIGKILLed; the tables equal those of
a run with local checkpoints."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from tests.object_store import S3Endpoint, s3_server
from tests.pipeline_runs import Job, Tables, assert_same_tables
from tests.test_cluster import job, partitioned, wait_for_workers  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """The runs (child processes, and their dask workers) reach the S3 server."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    # a killed worker's dask lock is released after 3 s here (30 s by default)
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL", "0.5s")
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT", "3s")
    return s3


def on_s3(run: Job, endpoint: S3Endpoint) -> Job:
    return replace(run, checkpoint_dir=f"s3://{endpoint.new_bucket()}/ckpt")  # type: ignore[arg-type]


@pytest.mark.parametrize("crash_at", ["after_sink_write:4", "during_snapshot:7"])
def test_a_file_job_killed_mid_checkpoint_resumes_from_s3(
    partitioned: tuple[Path, str, Tables],  # noqa: F811
    tmp_path: Path,
    s3_env: S3Endpoint,
    crash_at: str,
) -> None:
    _, source, expected = partitioned
    run = on_s3(job(tmp_path, source, "s3", "--checkpoint-interval", "0"), s3_env)
    run.crash_then_recover(crash_at)
    assert_same_tables(run.tables(), expected)
    fs = s3_env.filesystem()
    bucket = str(run.checkpoint_dir).removeprefix("s3://")
    assert fs.glob(f"{bucket}/*/p0/CURRENT"), "the checkpoints are not in the bucket"
    assert not (tmp_path / "s3" / "ckpt").exists()
    run.run_ok()  # a finished job: nothing more
    assert "already ran to completion" in run.log_tail()


def test_a_cluster_job_with_s3_checkpoints_survives_a_killed_worker(
    partitioned: tuple[Path, str, Tables],  # noqa: F811
    tmp_path: Path,
    s3_env: S3Endpoint,
) -> None:
    """Two workers share nothing but the bucket (and the client's chdb writer): a killed
    worker's partition resumes on a worker that restores it from S3, once dask's lock on it
    is released."""
    _, source, expected = partitioned
    run = on_s3(
        job(tmp_path, source, "s3w", "--workers", "2", "--checkpoint-interval", "0", batch_size=50),
        s3_env,
    )
    child = run.start()
    try:
        workers = wait_for_workers(run, child, timeout_s=90)
        deadline = time.monotonic() + 90
        fs = s3_env.filesystem()
        bucket = str(run.checkpoint_dir).removeprefix("s3://")
        while not fs.glob(f"{bucket}/*/p*/CURRENT"):
            assert child.poll() is None, run.log_tail()
            assert time.monotonic() < deadline, "no checkpoint in the bucket"
            time.sleep(0.2)
        assert child.poll() is None, "the run ended before the kill: make it longer"
        with contextlib.suppress(psutil.NoSuchProcess):
            workers[0].send_signal(signal.SIGKILL)
        assert run.wait(child, timeout_s=240) == 0, run.log_tail()
    finally:
        if child.poll() is None:
            child.kill()
    assert "Restarting worker" in run.log_tail(200_000), "no worker died: the test proves little"
    assert_same_tables(run.tables(), expected)


@pytest.mark.kafka
def test_a_kafka_job_journals_and_checkpoints_in_s3_and_resumes_exactly(
    kafka_bootstrap: str, tmp_path: Path, s3_env: S3Endpoint
) -> None:
    """The batch journal lives in the bucket too: a replay after a crash between the inserts
    and the state snapshot cuts the journaled batches again."""
    from gpu_pipeline.sources.kafka_producer import produce_synthetic
    from tests.engine_harness import assert_tables_equal
    from tests.test_kafka_pipeline import new_job, new_topic, read_topic

    name = new_topic(kafka_bootstrap, 2)
    produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", 2_000, 31, partitions=2)
    topic = read_topic(kafka_bootstrap, name, 2)
    bucket = s3_env.new_bucket()
    run = new_job(
        tmp_path,
        topic,
        batch_size=100,
        checkpoint_dir=f"s3://{bucket}/ckpt",
        options=("--checkpoint-interval", "0"),
    )
    run.crash_then_recover("after_sink_write:5")
    assert_tables_equal(run.tables(), topic.reference.tables)
    assert s3_env.filesystem().glob(f"{bucket}/ckpt/*/journal/p*.journal")

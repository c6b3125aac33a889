"""One Kafka job across a dask cluster: every worker's consumer joins the job's group, the
group assigns the partitions, and the tables equal the reference model's whatever the
worker count, and when a worker is killed mid-run (the real broker, real ``distributed``
worker processes, the real embedded ClickHouse)."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import psutil
import pytest

from gpu_pipeline.sources.kafka_producer import produce_synthetic
from tests.engine_harness import assert_tables_equal
from tests.pipeline_runs import Job, group_caught_up, terminate, wait_until
from tests.test_cluster import wait_for_workers
from tests.test_kafka_pipeline import Topic, new_job, new_topic, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4


@pytest.fixture(scope="module")
def keyed(kafka_bootstrap: str) -> Topic:
    """The synthetic clickstream in a 4-partition topic, keyed by user."""
    name = new_topic(kafka_bootstrap, PARTITIONS)
    produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", 4_000, 21, partitions=PARTITIONS)
    return read_topic(kafka_bootstrap, name, PARTITIONS)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_kafka_job_on_n_workers_writes_the_reference_tables(
    keyed: Topic, tmp_path: Path, workers: int
) -> None:
    job = new_job(tmp_path, keyed, batch_size=200, options=("--workers", str(workers)))
    job.run_ok()
    assert_tables_equal(job.tables(), keyed.reference.tables)
    log = job.log_tail(20_000)
    assert f"{workers} worker processes" in log and "per partition" in log
    # the topic has nothing new: a rerun of the same job writes nothing more
    job.run_ok()
    assert_tables_equal(job.tables(), keyed.reference.tables)


def test_a_streaming_job_stopped_in_one_process_resumes_on_two_workers(
    keyed: Topic, tmp_path: Path
) -> None:
    """A job streamed in one process, stopped with SIGTERM (no flush), then resumed with
    ``--workers 2`` (same group, checkpoints and database) is one job: the cluster's
    consumers take over its partitions and checkpoints."""
    job = new_job(
        tmp_path, keyed, batch_size=100, until_idle=False, options=("--checkpoint-interval", "0")
    )
    child = job.start()
    wait_until(
        group_caught_up(keyed.bootstrap, job.group_id, keyed.name, PARTITIONS),
        "the streaming run to commit every partition to its end",
        alive=[(job, child)],
    )
    terminate(child)
    assert job.wait(child, 60) == 0, job.log_tail()
    resumed = job.with_options("--workers", "2", until_idle=True)
    resumed.run_ok()
    assert_tables_equal(resumed.tables(), keyed.reference.tables)


@pytest.mark.parametrize("repeat", [False, True])
def test_a_worker_killed_mid_run_changes_nothing(
    kafka_bootstrap: str, tmp_path: Path, repeat: bool
) -> None:
    """SIGKILL one worker's process while it consumes (with ``repeat``, the same slot again
    after its restart): its task reruns as the same static member, restores its partitions
    from their checkpoints and replays their journals; nothing is lost or doubled."""
    name = new_topic(kafka_bootstrap, PARTITIONS)
    produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", 8_000, 23, partitions=PARTITIONS)
    topic = read_topic(kafka_bootstrap, name, PARTITIONS)
    # a checkpoint after every 50-record batch: several seconds of work for the kills
    job = new_job(
        tmp_path,
        topic,
        batch_size=50,
        options=("--workers", "2", "--checkpoint-interval", "0", "--max-batch-wait", "0"),
    )
    child = job.start()
    try:
        for _ in range(2 if repeat else 1):
            workers = wait_for_workers(job, child)
            wait_for_progress(job)
            assert child.poll() is None, "the run ended before the kill: make it longer"
            with contextlib.suppress(psutil.NoSuchProcess):
                workers[0].send_signal(signal.SIGKILL)
        assert job.wait(child, timeout_s=240) == 0, job.log_tail()
    finally:
        if child.poll() is None:
            child.kill()
    assert "Restarting worker" in job.log_tail(200_000), "no worker died: the test proves little"
    assert_tables_equal(job.tables(), topic.reference.tables)


def wait_for_progress(job: Job, timeout_s: float = 60) -> None:
    """Until some partition of the job has checkpointed (so the kill lands mid-run)."""
    checkpoints = job.checkpoint_dir
    deadline = time.monotonic() + timeout_s
    while not any(checkpoints.glob("*/p*/CURRENT")):  # not into folders being renamed
        assert time.monotonic() < deadline, "no checkpoint within a minute"
        time.sleep(0.1)
    time.sleep(0.5)

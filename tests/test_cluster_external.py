"""A job on an existing dask cluster (``--scheduler``): a worker that joins mid-run takes
work, and a client or scheduler that dies stops the job cleanly; the same command run
again resumes it, and the tables equal the single-process run's (real ``dask scheduler``
and ``dask worker`` processes, the real embedded ClickHouse)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline_runs import Job, Tables, assert_same_tables
from tests.test_cluster import job, partitioned  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.slow


class ExternalCluster:
    """A ``dask scheduler`` and its ``dask worker`` processes, as an operator starts them."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.env = {**os.environ, **(env or {})}
        self.scheduler_file = folder / "scheduler.json"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return str(json.loads(self.scheduler_file.read_text())["address"])

    def _start(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / log, "ab") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def start_scheduler(self) -> None:
        self.scheduler_file.unlink(missing_ok=True)
        self.scheduler = self._start(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.is_file():
            assert time.monotonic() < deadline, (self.folder / "scheduler.log").read_text()
            time.sleep(0.1)

    def add_worker(self) -> None:
        number = len(self.workers)
        self.workers.append(
            self._start(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--nthreads",
                    "1",
                    "--dashboard-address",
                    ":0",
                    "--death-timeout",
                    "20",
                    "--scheduler-file",
                    str(self.scheduler_file),
                ],
                f"worker-{number}.log",
            )
        )

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers, self.scheduler = [], None


SILENCE_S = 2
"""How long the workers' tasks outlive a silent client here (30 s by default)."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ExternalCluster]:
    running = ExternalCluster(
        tmp_path / "dask", env={"GPU_PIPELINE_CLIENT_SILENCE_S": str(SILENCE_S)}
    )
    running.start_scheduler()
    try:
        yield running
    finally:
        running.stop()


def joined(
    base: Path, source: str, cluster: ExternalCluster, name: str, batch_size: int = 50
) -> Job:
    """A slow job (a checkpoint after every batch) on ``cluster``."""
    return job(
        base,
        source,
        name,
        "--scheduler",
        cluster.address,
        "--checkpoint-interval",
        "0",
        batch_size=batch_size,
    )


def wait_for_checkpoint(run: Job, child: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(run.checkpoint_dir.glob("*/p*/CURRENT")):  # not into folders being renamed
        assert child.poll() is None, run.log_tail()
        assert time.monotonic() < deadline, f"no checkpoint yet:\n{run.log_tail()}"
        time.sleep(0.1)


def worker_rows(log: str) -> int:
    """How many workers the run summary's per-worker table lists."""
    return sum(1 for line in log.splitlines() if line.startswith("│ tcp://"))


def test_a_worker_that_joins_mid_run_takes_partitions(
    partitioned: tuple[Path, str, Tables],  # noqa: F811
    tmp_path: Path,
    cluster: ExternalCluster,
) -> None:
    _, source, expected = partitioned
    cluster.add_worker()
    run = joined(tmp_path, source, cluster, "joining")
    child = run.start()
    try:
        wait_for_checkpoint(run, child)
        cluster.add_worker()  # four partitions queued on one worker: the new one takes some
        assert run.wait(child, timeout_s=240) == 0, run.log_tail()
    finally:
        if child.poll() is None:
            child.kill()
    assert worker_rows(run.log_tail(20_000)) == 2, run.log_tail(20_000)
    assert_same_tables(run.tables(), expected)


def test_a_killed_client_stops_its_tasks_and_a_rerun_resumes(
    partitioned: tuple[Path, str, Tables],  # noqa: F811
    tmp_path: Path,
    cluster: ExternalCluster,
) -> None:
    """SIGKILL the client mid-run: its tasks hear no heartbeat, checkpoint and stop short of
    their partitions' ends; the same command run again finishes the job (the blocks they
    staged included)."""
    _, source, expected = partitioned
    cluster.add_worker()
    cluster.add_worker()
    run = joined(tmp_path, source, cluster, "client", batch_size=20)
    child = run.start()
    try:
        wait_for_checkpoint(run, child)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    wait_for_leases_free(run.checkpoint_dir / job_folder(run))
    folders = sorted((run.checkpoint_dir / job_folder(run)).glob("p[0-9]*"))
    stopped = [f.name for f in folders if (f / "CURRENT").is_file() and not (f / "DONE").is_file()]
    assert stopped, f"no task stopped mid-partition: {[f.name for f in folders]}"
    run.run_ok()
    assert_same_tables(run.tables(), expected)
    assert all(w.poll() is None for w in cluster.workers), "a worker died"


def job_folder(run: Job) -> str:
    """The job's folder under its checkpoint directory (the only one there)."""
    (folder,) = [p.name for p in run.checkpoint_dir.iterdir() if (p / "JOB.json").is_file()]
    return folder


def wait_for_leases_free(folder: Path, timeout_s: float = 60) -> None:
    """Until no process holds a partition's lease (every task of the dead client ended)."""
    deadline = time.monotonic() + timeout_s
    for lease in folder.glob("p*/LEASE"):
        with open(lease, "rb") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"{lease} still held"
                    time.sleep(0.1)


def test_a_dead_scheduler_stops_the_run_and_a_rerun_on_a_new_one_resumes(
    partitioned: tuple[Path, str, Tables],  # noqa: F811
    tmp_path: Path,
    cluster: ExternalCluster,
) -> None:
    _, source, expected = partitioned
    cluster.add_worker()
    cluster.add_worker()
    run = joined(tmp_path, source, cluster, "scheduler")
    child = run.start()
    try:
        wait_for_checkpoint(run, child)
        assert cluster.scheduler is not None
        os.killpg(cluster.scheduler.pid, signal.SIGKILL)
        code = run.wait(child, timeout_s=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert code != 0, run.log_tail()
    log = run.log_tail(20_000)
    assert "lost the connection to the dask scheduler" in log, log
    assert "Traceback" not in log, log
    cluster.stop()  # an operator restarts the cluster
    cluster.start_scheduler()
    cluster.add_worker()
    cluster.add_worker()
    rerun = run.with_options("--scheduler", cluster.address, "--checkpoint-interval", "0")
    rerun.run_ok()
    assert_same_tables(rerun.tables(), expected)

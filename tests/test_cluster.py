"""One job across a dask cluster: the tables do not depend on the worker count or on
workers dying (real ``distributed`` worker processes, the real embedded ClickHouse)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpu_pipeline.config import load_config
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.sources.synthetic import write_ndjson_partitions
from tests.engine_harness import assert_tables_equal
from tests.pipeline_runs import Job, Tables, assert_same_tables
from tests.reference import reference_run

pytestmark = pytest.mark.slow

EVENTS = 6_000
PARTITIONS = 4


def job(base: Path, source: str, name: str, *options: str, batch_size: int = 250) -> Job:
    folder = base / name
    return Job(
        source=source,
        sink_dir=folder / "ch",
        checkpoint_dir=folder / "ckpt",
        logs=folder / "logs",
        batch_size=batch_size,
        options=options,
    )


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Tables]:
    """Four keyed NDJSON files, and the tables of one single-process run, which equal the
    reference model's."""
    base = tmp_path_factory.mktemp("cluster")
    files = write_ndjson_partitions(base / "input", PARTITIONS, EVENTS, seed=11)
    records = {
        p: [(offset, 0, line) for offset, line in enumerate(path.read_bytes().splitlines())]
        for p, path in enumerate(files)
    }
    source = f"file:{base / 'input'}"
    single = job(base, source, "single")
    single.run_ok()
    tables = single.tables()
    assert_tables_equal(tables, reference_run(records).tables)
    return base, source, tables


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_file_job_on_n_workers_writes_the_single_process_tables(
    partitioned: tuple[Path, str, Tables], tmp_path: Path, workers: int
) -> None:
    _, source, expected = partitioned
    run = job(tmp_path, source, f"w{workers}", "--workers", str(workers))
    run.run_ok()
    assert_same_tables(run.tables(), expected)
    log = run.log_tail(20_000)
    assert f"{workers} worker processes" in log and "per partition" in log
    # a rerun of the finished job does nothing
    run.run_ok()
    assert "already ran to completion" in run.log_tail()


@pytest.mark.gpu
def test_a_file_job_on_a_local_cuda_cluster_writes_the_single_process_tables(
    partitioned: tuple[Path, str, Tables], tmp_path: Path
) -> None:
    """One dask-cuda worker per GPU (here: one), the GPU engine, the CPU run's tables."""
    pytest.importorskip("dask_cuda", reason="dask-cuda (the gpu extra) is not installed")
    _, source, expected = partitioned
    run = job(tmp_path, source, "cuda", "--workers", "1", "--engine", "gpu")
    run.run_ok()
    assert "LocalCUDACluster" in run.log_tail(20_000)
    assert_same_tables(run.tables(), expected)


def wait_for_workers(
    run: Job, child: subprocess.Popen[bytes], count: int = 2, timeout_s: float = 60
) -> list[psutil.Process]:
    """The dask worker processes of ``run``, once ``count`` of them are up."""
    deadline = time.monotonic() + timeout_s
    while len(workers := worker_processes(child.pid)) < count:
        assert time.monotonic() < deadline, run.log_tail()
        time.sleep(0.1)
    return workers


def worker_processes(parent: int) -> list[psutil.Process]:
    """The dask worker processes of a ``--workers`` run (children of its nannies, started
    through ``multiprocessing.spawn``; not the resource tracker)."""
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for c in children:
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(c.cmdline()):
                found.append(c)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_workers_killed_at_random_moments_change_nothing(
    partitioned: tuple[Path, str, Tables], tmp_path: Path, seed: int
) -> None:
    """SIGKILL one worker process (and, with seed 3, the same slot again after its
    restart) while partitions are mid-way: the nanny restarts it, dask reruns its task,
    which resumes from the partition's checkpoint; the tables are unchanged."""
    _, source, expected = partitioned
    rng = random.Random(seed)
    # 30 checkpoints per partition: several seconds of work for the kills to land in
    run = job(
        tmp_path, source, "killed", "--workers", "2", "--checkpoint-interval", "0", batch_size=50
    )
    child = run.start()
    kills = 2 if seed == 3 else 1
    try:
        for _ in range(kills):
            workers = wait_for_workers(run, child)
            time.sleep(rng.uniform(1.5, 4.0))
            victim = workers[0] if seed == 3 else rng.choice(workers)
            assert child.poll() is None, "the run ended before the kill: make it longer"
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        assert run.wait(child) == 0, run.log_tail()
    finally:
        if child.poll() is None:
            child.kill()
    assert "Restarting worker" in run.log_tail(200_000), "no worker died: the test proves little"
    assert_same_tables(run.tables(), expected)


def test_a_worker_that_cannot_build_the_kernels_is_named(
    partitioned: tuple[Path, str, Tables], tmp_path: Path
) -> None:
    """Its setup fails before any task: the error names the worker and the cause, and
    nothing is written."""
    from distributed import Client, LocalCluster

    from gpu_pipeline.cluster.connect import ClusterHandle
    from gpu_pipeline.cluster.driver import ClusterRun
    from gpu_pipeline.cluster.plugin import ClusterSetupError

    _, source, _ = partitioned
    env = {"CXX": "/nonexistent/c++", "GPU_PIPELINE_CACHE_DIR": str(tmp_path / "empty-cache")}
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, env=env, dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, "test cluster")
    config = load_config(
        {
            "source": source,
            "sink": f"chdb://{tmp_path / 'ch'}",
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "engine": "cpu",
        }
    )
    run = ClusterRun(config, handle)
    try:
        with pytest.raises(ClusterSetupError, match=r"worker tcp://.*/nonexistent/c\+\+"):
            run.run("never")
        assert not run.pipeline.store.partitions()
    finally:
        run.close()
        handle.close()


def test_a_worker_that_cannot_see_the_checkpoints_is_refused(
    partitioned: tuple[Path, str, Tables], tmp_path: Path
) -> None:
    """A worker elsewhere (here: another working directory, so the relative
    --checkpoint-dir is another folder) fails its task before reading anything."""
    from distributed import Client, LocalCluster

    from gpu_pipeline.cluster.connect import ClusterHandle
    from gpu_pipeline.cluster.driver import ClusterError, ClusterRun

    _, source, _ = partitioned
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")
    client = Client(cluster)
    client.run(os.chdir, str(elsewhere))
    handle = ClusterHandle(client, cluster, "test cluster")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        config = load_config(
            {"source": source, "sink": "chdb://ch", "checkpoint_dir": "ckpt", "engine": "cpu"}
        )
        run = ClusterRun(config, handle)
        try:
            with pytest.raises(ClusterError, match="cannot see the job's checkpoint location"):
                run.run("never")
            assert not run.pipeline.store.partitions()
            assert not (elsewhere / "ckpt").exists() or not any(
                (elsewhere / "ckpt").rglob("CURRENT")
            )
        finally:
            run.close()
    finally:
        os.chdir(here)
        handle.close()


def test_a_wrong_scheduler_address_fails_at_once_naming_it(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_pipeline.cli",
            "run",
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--sink",
            f"chdb://{tmp_path / 'ch'}",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "1000"},
        timeout=120,
    )
    assert result.returncode != 0
    assert "scheduler" in result.stderr and "cannot reach the dask scheduler" in result.stderr
    assert time.monotonic() - started < 60
    with pytest.raises(ConfigError, match="scheduler"):
        load_config({"scheduler": "not an address"})
    with pytest.raises(ConfigError, match="metrics_port"):
        from gpu_pipeline.cluster.report import check_cluster_options

        check_cluster_options(load_config({"workers": 2, "metrics_port": 9400}))

"""``gpu-pipeline run --workers N`` / ``--scheduler ADDR``: run, then the per-worker and
per-partition tables."""

from __future__ import annotations

import signal
from collections import defaultdict
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.table import Table

from gpu_pipeline import logs
from gpu_pipeline.config import RunConfig, redact
from gpu_pipeline.errors import ConfigError


def check_cluster_options(config: RunConfig) -> None:
    """Options that do not go together with a cluster run fail at once, named."""
    if config.metrics_port:
        raise ConfigError(
            "metrics_port",
            "a cluster run does not serve Prometheus metrics yet; watch the dask dashboard "
            "(its address is printed) or run one process with --metrics-port",
        )


def cmd_run_cluster(config: RunConfig, console: Console) -> int:
    """Run the job on a dask cluster and print what every worker and partition did."""
    from gpu_pipeline.cluster.driver import ClusterRun, run_on_cluster
    from gpu_pipeline.runtime.metrics import summary_table

    check_cluster_options(config)
    if logs.is_json():
        config = replace(config, progress="never")

    def started(run: ClusterRun) -> None:
        logs.say(
            f"cluster: {run.handle.kind}, {len(run.handle.workers())} workers"
            + (f"   dashboard: {run.handle.dashboard}" if run.handle.dashboard else ""),
            cluster=run.handle.kind,
            workers=len(run.handle.workers()),
            dashboard=run.handle.dashboard,
        )
        logs.say(
            f"source: {redact(config.source)}   sink: {run.pipeline.describe_sink()}   "
            f"job: {run.job_id}",
            source=redact(config.source),
            sink=run.pipeline.describe_sink(),
            database=config.database,
            job=run.job_id,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, run.request_stop)

    outcome = run_on_cluster(config, on_start=started)
    result = outcome.result
    if result.already_complete:
        logs.say(
            "this job already ran to completion; nothing to do (use --fresh to run it again)",
            outcome="already complete",
        )
    elif result.stopped:
        logs.say(
            "stopped: every partition is checkpointed; run the same command to resume",
            outcome="stopped",
        )
    if logs.is_json():
        from gpu_pipeline.cli import run_summary

        summary = run_summary(result, "", config.database)
        summary.pop("job")
        summary.update(
            cluster=outcome.cluster,
            dashboard=outcome.dashboard,
            tasks=outcome.tasks,
            partitions={str(p): c for p, c in sorted(outcome.partitions.items())},
        )
        logs.emit_json(summary)
        return 0
    title = f"gpu-pipeline run ({result.engine} engine, {outcome.cluster})"
    console.print(summary_table(result.metrics, title))
    if outcome.tasks:
        console.print(worker_table(outcome.tasks))
    if outcome.partitions:
        console.print(partition_table(outcome.partitions))
    if outcome.dashboard:
        console.print(f"dask dashboard: {outcome.dashboard}", style="dim")
    console.print(
        f'explore: gpu-pipeline query "SELECT * FROM {config.database}.traffic_1m_total LIMIT 10"',
        style="dim",
    )
    return 0


def worker_table(reports: list[dict[str, Any]]) -> Table:
    """Per worker: its tasks, partitions, records read by this run, rate and peak RSS."""
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        by_worker[str(report["worker"])].append(report)
    table = Table(title="per worker", header_style="bold")
    for name, justify in (
        ("worker", "left"),
        ("tasks", "right"),
        ("partitions", "left"),
        ("records (this run)", "right"),
        ("records/s", "right"),
        ("peak RSS", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for worker, mine in sorted(by_worker.items()):
        records = sum(int(r["records"]) for r in mine)
        busy = sum(float(r["elapsed_s"]) for r in mine)
        partitions = sorted({p for r in mine for p in r["partitions"]})
        table.add_row(
            worker,
            str(len(mine)),
            ", ".join(map(str, partitions)) or "-",
            f"{records:,}",
            f"{records / busy:,.0f}" if busy > 0 else "-",
            f"{max(int(r['peak_rss_bytes']) for r in mine) / 2**20:,.0f} MiB",
        )
    return table


def partition_table(partitions: dict[int, dict[str, int]]) -> Table:
    """Per partition: the counters of its newest checkpoint."""
    table = Table(title="per partition", header_style="bold")
    columns = ("records", "events", "dead_letters", "duplicates", "late", "sessions")
    table.add_column("partition", justify="right")
    for name in columns:
        table.add_column(name.replace("_", " "), justify="right")
    for partition, counters in sorted(partitions.items()):
        table.add_row(str(partition), *(f"{counters.get(c, 0):,}" for c in columns))
    return table

"""The ``gpu-pipeline`` command: generate, run, query, doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any

from rich.console import Console

from gpu_pipeline import __version__, logs
from gpu_pipeline.config import OPTION_NAMES, RunConfig, load_config, redact
from gpu_pipeline.errors import ConfigError, PipelineError

_RUN_HELP = {
    "source": "synthetic (default), file:PATH (.ndjson[.gz] or .parquet) or kafka://HOST:PORT/TOPIC",
    "sink": "chdb://PATH (embedded ClickHouse, default chdb://gpu_pipeline_data/clickhouse) or http(s)://USER:PASS@HOST:PORT",
    "database": "ClickHouse database (default clickstream)",
    "engine": "auto (GPU when usable), cpu or gpu",
    "decoder": (
        "native (kernels/decode.cu decides the ordinary records, the exact decoder the rest; "
        "default) or arrow (pyarrow's JSON reader and the exact rules for every record)"
    ),
    "batch_size": "records per micro-batch (default 100000)",
    "events": "synthetic source: number of records (default 1000000)",
    "seed": "synthetic source: random seed (default 42)",
    "threads": "CPU engine: OpenMP threads per kernel (default: all cores)",
    "checkpoint_dir": "where job checkpoints live (default gpu_pipeline_data/checkpoints)",
    "checkpoint_interval_ms": (
        "Kafka: time between checkpoints (rows become visible then), e.g. 5s; 0 = after every batch"
    ),
    "fresh": "forget this job's checkpoint and run it again from the start (idempotent inserts)",
    "progress": "progress display: auto (on a terminal), always, never",
    "max_out_of_orderness_ms": "watermark delay D, e.g. 5s",
    "allowed_lateness_ms": "allowed lateness L, e.g. 60s",
    "dedup_ttl_ms": "how long event ids are remembered, e.g. 1h",
    "session_gap_ms": "session inactivity gap G, e.g. 30min",
    "max_future_skew_ms": (
        "event-time guard: an event this far ahead of its partition's event time that the "
        "next event contradicts becomes a dead letter, e.g. 1h (0 = off)"
    ),
    "job_id": (
        "name the job yourself (default: a hash of source, sink, database and semantics); "
        "runs with one name are one job whatever their sinks"
    ),
    "group_id": "Kafka consumer group (default: gpu-pipeline-JOB, one group per job)",
    "until_idle": "Kafka: stop (and flush) once every partition is idle",
    "idle_timeout_ms": "Kafka: how long without messages counts as idle, e.g. 5s",
    "max_batch_bytes": "Kafka: bytes per micro-batch",
    "max_batch_wait_ms": "Kafka: longest wait to fill a micro-batch, e.g. 500ms",
    "dead_letter_topic": "Kafka: also produce dead letters to this topic (headers: origin)",
    "metrics_port": "serve Prometheus metrics on this port while running (0 = off)",
    "workers": (
        "run on a local dask cluster of N workers (one per GPU with dask-cuda, else N worker "
        "processes); 0 = one process. With --scheduler: wait for N of its workers first "
        "(a Kafka job runs one consumer per worker connected at the start)"
    ),
    "scheduler": "run on an existing dask cluster: its scheduler's address, tcp://HOST:PORT",
    "idle_partition_timeout_ms": (
        "Kafka, opt-in: after this long without messages a partition's watermark follows the "
        "wall clock, so its windows and sessions close (not deterministic on replay)"
    ),
}
_BOOLEAN = {"fresh", "until_idle"}
_FLAG_NAMES = {
    "max_out_of_orderness_ms": "--max-out-of-orderness",
    "allowed_lateness_ms": "--allowed-lateness",
    "dedup_ttl_ms": "--dedup-ttl",
    "session_gap_ms": "--session-gap",
    "max_future_skew_ms": "--max-future-skew",
    "checkpoint_interval_ms": "--checkpoint-interval",
    "idle_timeout_ms": "--idle-timeout",
    "max_batch_wait_ms": "--max-batch-wait",
    "idle_partition_timeout_ms": "--idle-partition-timeout",
}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    for name in OPTION_NAMES:
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if name in _BOOLEAN:
            parser.add_argument(
                flag,
                dest=name,
                action="store_const",
                const=True,
                default=None,
                help=_RUN_HELP[name],
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=_RUN_HELP[name])
    parser.add_argument("--config", dest="config_file", default=None, help="TOML config file")


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-format",
        default=None,
        help=(
            "text (default) or json: one JSON object per stderr line, and the run summary as "
            "JSON on stdout (also GPU_PIPELINE_LOG_FORMAT)"
        ),
    )
    return common


def _log_format(args: argparse.Namespace) -> str:
    from gpu_pipeline.logs import FORMATS

    value = getattr(args, "log_format", None) or os.environ.get("GPU_PIPELINE_LOG_FORMAT", "text")
    if value not in FORMATS:
        raise ConfigError("log_format", f"must be one of {', '.join(FORMATS)}, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="gpu-pipeline",
        description=(
            "Clickstream analytics: Kafka/files -> dedup, sessions, windows "
            "on GPU or CPU -> ClickHouse."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gpu-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="write the synthetic clickstream (NDJSON, Parquet or Kafka)",
        parents=[common],
    )
    gen.add_argument("--events", default="1000000", help="number of records")
    gen.add_argument("--seed", default="42", help="random seed")
    gen.add_argument(
        "--out",
        required=True,
        help="FILE (.ndjson, .ndjson.gz, .parquet) or kafka://HOST:PORT/TOPIC",
    )
    gen.add_argument(
        "--rate", default=None, help="Kafka: events per second (default: as fast as possible)"
    )
    gen.add_argument(
        "--partitions",
        default=None,
        help=(
            "Kafka: partitions when creating the topic; files: write this many NDJSON files "
            "into the directory --out (one partition each, records keyed by user)"
        ),
    )

    run = sub.add_parser("run", help="run the pipeline", parents=[common])
    _add_run_options(run)

    query = sub.add_parser(
        "query", help="run SQL on the sink and print the result", parents=[common]
    )
    query.add_argument("sql", help="the SQL statement")
    query.add_argument("--sink", default=None, help=_RUN_HELP["sink"])
    query.add_argument("--database", default=None, help=_RUN_HELP["database"])
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.add_argument("--config", dest="config_file", default=None, help="TOML config file")

    doctor = sub.add_parser("doctor", help="check what is usable here", parents=[common])
    doctor.add_argument("--sink", default=None, help=_RUN_HELP["sink"])
    doctor.add_argument("--database", default=None, help=_RUN_HELP["database"])
    doctor.add_argument(
        "--kafka",
        default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        help="Kafka to probe: bootstrap HOST:PORT, or a source URL kafka://HOST:PORT/TOPIC"
        "[?security.protocol=...] (TLS/SASL as for run; the password from the environment), "
        "which also checks that the topic exists",
    )
    doctor.add_argument("--config", dest="config_file", default=None, help="TOML config file")
    return parser


def _options(args: argparse.Namespace, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    from gpu_pipeline.cli_generate import generate

    return generate(args, console)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from gpu_pipeline.runtime.metrics import summary_table
    from gpu_pipeline.runtime.pipeline import Pipeline

    config = load_config(_options(args, OPTION_NAMES), config_file=args.config_file)
    if config.workers or config.scheduler:
        from gpu_pipeline.cluster.report import cmd_run_cluster

        return cmd_run_cluster(config, console)
    if logs.is_json():
        config = replace(config, progress="never")
    pipeline = Pipeline(config)
    logs.say(pipeline.engine_message, engine=pipeline.backend.name)
    logs.say(
        f"source: {redact(config.source)}   sink: {pipeline.describe_sink()}   "
        f"job: {pipeline.job_id}",
        source=redact(config.source),
        sink=pipeline.describe_sink(),
        database=config.database,
        job=pipeline.job_id,
    )
    if pipeline.metrics_server is not None:
        from gpu_pipeline.runtime.prometheus import describe

        logs.say(describe(pipeline.metrics_server), metrics_port=config.metrics_port)
    pipeline.install_signal_handlers()
    try:
        result = pipeline.run()
    finally:
        pipeline.close()
    if result.already_complete:
        logs.say(
            "this job already ran to completion; nothing to do (use --fresh to run it again)",
            job=pipeline.job_id,
            outcome="already complete",
        )
    elif result.stopped:
        logs.say(
            "stopped: the last batch is checkpointed; run the same command to resume",
            job=pipeline.job_id,
            outcome="stopped",
        )
    if logs.is_json():
        logs.emit_json(run_summary(result, pipeline.job_id, config.database))
        return 0
    console.print(summary_table(result.metrics, f"gpu-pipeline run ({result.engine} engine)"))
    console.print(
        f'explore: gpu-pipeline query "SELECT * FROM {config.database}.traffic_1m_total LIMIT 10"',
        style="dim",
    )
    return 0


def run_summary(result: Any, job: str, database: str) -> dict[str, Any]:
    """The run summary as one JSON object (``--log-format json``)."""
    metrics = result.metrics
    outcome = (
        "already complete"
        if result.already_complete
        else "stopped"
        if result.stopped
        else "completed"
    )
    return {
        "summary": "gpu-pipeline run",
        "job": job,
        "database": database,
        "engine": result.engine,
        "outcome": outcome,
        "counters": dict(metrics.counters),
        "records_this_process": metrics.records_this_process,
        "elapsed_s": round(metrics.elapsed_s, 3),
        "records_per_s": round(metrics.rate, 1),
    }


def _sink_config(args: argparse.Namespace) -> RunConfig:
    return load_config(_options(args, ["sink", "database"]), config_file=args.config_file)


def cmd_query(args: argparse.Namespace, console: Console) -> int:
    from gpu_pipeline.display import render_table, write_csv, write_json
    from gpu_pipeline.sinks.base import open_sink

    config = _sink_config(args)
    # reading needs no DDL (and a read-only user may run none)
    sink = open_sink(config.sink, config.database, create_schema=False)
    try:
        start = time.perf_counter()
        table = sink.query(args.sql)
        elapsed = time.perf_counter() - start
    finally:
        sink.close()
    if args.format == "csv":
        write_csv(table)
    elif args.format == "json":
        write_json(table)
    else:
        render_table(table, console)
        console.print(f"{elapsed * 1000:.1f} ms", style="dim")
    return 0


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    from gpu_pipeline.doctor import run_doctor

    config = _sink_config(args)
    return run_doctor(config.sink, config.database, args.kafka, console)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpu-pipeline`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    commands = {"generate": cmd_generate, "run": cmd_run, "query": cmd_query, "doctor": cmd_doctor}
    try:
        logs.configure(_log_format(args))
        return commands[args.command](args, console)
    except ConfigError as exc:
        logs.say(
            f"error: {exc}",
            level=logging.ERROR,
            markup=f"[red]error:[/red] {exc}",
            option=exc.option,
            error=str(exc),
        )
        return 2
    except PipelineError as exc:
        logs.say(
            f"error: {exc}",
            level=logging.ERROR,
            markup=f"[red]error:[/red] {exc}",
            error=str(exc),
            kind=type(exc).__name__,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

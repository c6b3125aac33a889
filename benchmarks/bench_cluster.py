"""Scale-out: one job in one process, on 1 dask worker and on 2, from files and from Kafka.

Every configuration runs the same job (CPU engine, embedded ClickHouse sink) as a child
process, in a fresh sink and checkpoint folder, in interleaved rounds (the order of the
configurations alternates from round to round, so a slow patch of a shared machine does not
land on one configuration).  Measured per run:

* **wall**: from starting the process to its exit (interpreter, imports, cluster start,
  the run, teardown): the events/s a user sees;
* the phases, from timestamps the child records (wall clock, comparable across processes):
  the cluster's start (``open_cluster``), the first task starting on a worker and the last
  one ending (the scheduler's task stream), the run itself, the teardown;
* the peak RSS of the client process (``ru_maxrss``: with ``--workers`` it holds the dask
  scheduler and the embedded ClickHouse, which inserts what the workers stage) and of each
  worker (the tasks' own reports), and the peak of the whole process tree (sampled);
* the scheduling overhead per micro-batch: single process vs 1 worker at a small
  ``--batch-size`` and at the default, so a per-batch cost of the cluster shows as the
  growth of the difference with the number of batches.

The child is this script with ``--child``: it parses the ``gpu-pipeline run`` arguments with
the CLI's own parser and runs what ``gpu-pipeline run`` runs (``Pipeline.run``, or
``open_cluster`` + ``ClusterRun.run``), so the commands in the report are the real ones.
The tables of every run are read back at the end and compared with the single-process
run's (same source and batch size), row by row.

    python benchmarks/bench_cluster.py                 # 400K events, 3 rounds; CLUSTER.md
    python benchmarks/bench_cluster.py --tiny          # 20K events, 1 round (smoke)
    python benchmarks/bench_cluster.py --no-kafka      # file source only

Kafka: ``--bootstrap HOST:PORT`` or ``$KAFKA_BOOTSTRAP``, else a broker is started on a free
port through deploy/kafka/kafka.sh (tests/kafka_broker.py) and stopped at the end.
"""

from __future__ import annotations

# Top-level imports stay in the standard library: dask's worker processes are spawned, and
# spawning re-imports the parent's main module (this file) in every worker.
import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATABASE = "clickstream"
RUN_TIMEOUT_S = 600.0
SMALL_BATCH = 1_000


# --------------------------------------------------------------------------- the child


def child_main(out: Path, argv: list[str]) -> None:
    """Run ``gpu-pipeline run ARGV`` as the CLI does; write timings and reports to ``out``."""
    marks = {"started": time.time()}
    from gpu_pipeline.cli import _options, build_parser
    from gpu_pipeline.config import OPTION_NAMES, load_config
    from gpu_pipeline.runtime import pipeline  # noqa: F401 - imported before the clock starts

    args = build_parser().parse_args(argv)
    config = load_config(_options(args, OPTION_NAMES), config_file=args.config_file)
    if config.workers:
        from gpu_pipeline.cluster import connect, driver  # noqa: F401
    marks["imported"] = time.time()
    result = _child_cluster(config, marks) if config.workers else _child_single(config, marks)
    result["marks"] = marks
    result["client_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps(result))


def _child_single(config: Any, marks: dict[str, float]) -> dict[str, Any]:
    from gpu_pipeline.runtime.pipeline import Pipeline

    marks["run_start"] = time.time()
    pipeline = Pipeline(config)
    try:
        result = pipeline.run()
    finally:
        pipeline.close()
    marks["run_end"] = marks["closed"] = time.time()
    return {
        "engine": result.engine,
        "completed": result.completed,
        "records": result.metrics.records_this_process,
        "batches": result.metrics.counters.get("batches", 0),
        "tasks": [],
    }


def _child_cluster(config: Any, marks: dict[str, float]) -> dict[str, Any]:
    """``run_on_cluster``, with the scheduler's task stream read before the cluster closes."""
    from gpu_pipeline.cluster.connect import open_cluster
    from gpu_pipeline.cluster.driver import ClusterRun

    handle = open_cluster(config.workers, config.scheduler, config.engine)
    marks["cluster_up"] = time.time()
    try:
        handle.client.get_task_stream()  # registers the scheduler's task-stream plugin
        marks["run_start"] = time.time()
        run = ClusterRun(config, handle)
        try:
            outcome = run.run("never")
        finally:
            run.close()
        marks["run_end"] = time.time()
        stream = handle.client.get_task_stream()
        workers = len(handle.workers())
    finally:
        handle.close()
    marks["closed"] = time.time()
    computes: dict[str, tuple[float, float]] = {}
    for record in stream:
        for span in record.get("startstops", ()):
            if span.get("action") == "compute":
                computes[str(record["key"])] = (float(span["start"]), float(span["stop"]))
    tasks = []
    for report in outcome.tasks:
        task = {k: v for k, v in report.items() if k != "lags"}
        for key, (start, stop) in computes.items():
            if key.endswith(f"-{report['task']}"):
                task["compute_start"], task["compute_stop"] = start, stop
        tasks.append(task)
    return {
        "engine": outcome.result.engine,
        "completed": outcome.result.completed,
        "cluster": outcome.cluster,
        "workers": workers,
        "records": sum(int(t["records"]) for t in tasks),
        "batches": sum(c.get("batches", 0) for c in outcome.partitions.values()),
        "staged_blocks": outcome.staged_blocks,
        "tasks": tasks,
    }


# --------------------------------------------------------------------------- the parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--small-batch",
        type=int,
        default=SMALL_BATCH,
        help="the small --batch-size of the overhead runs (0: skip them)",
    )
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    parser.add_argument("--no-kafka", action="store_true", help="file source only")
    parser.add_argument(
        "--kafka-idle",
        default="5s",
        help="also run Kafka on 1 and 2 workers with this --idle-timeout ('' to skip)",
    )
    parser.add_argument("--tiny", action="store_true", help="20K events, one round (smoke)")
    parser.add_argument("--out", type=Path, default=None, help="the Markdown report")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs' folders here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures")
    args = parser.parse_args()
    if args.tiny:
        args.events, args.rounds = 20_000, 1
    if args.out is None:
        args.out = HERE / "out" / "CLUSTER-tiny.md" if args.tiny else HERE / "CLUSTER.md"
    if min(args.events, args.partitions, args.rounds) <= 0 or args.small_batch < 0:
        parser.error("--events, --partitions and --rounds must be positive")
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations one round runs, each a source, a worker count and a batch size."""
    found = [
        {"source": "file", "workers": w, "batch": 0, "name": f"file {_label(w)}"} for w in (0, 1, 2)
    ]
    if args.small_batch:
        found += [
            {
                "source": "file",
                "workers": w,
                "batch": args.small_batch,
                "name": f"file {_label(w)}, batch {args.small_batch:,}",
            }
            for w in (0, 1)
        ]
    if not args.no_kafka:
        found += [
            {"source": "kafka", "workers": w, "batch": 0, "name": f"kafka {_label(w)}"}
            for w in (0, 1, 2)
        ]
        if args.kafka_idle:  # a longer --idle-timeout lets a late consumer get its partitions
            found += [
                {
                    "source": "kafka",
                    "workers": w,
                    "batch": 0,
                    "idle": args.kafka_idle,
                    "name": f"kafka {_label(w)}, idle {args.kafka_idle}",
                }
                for w in (1, 2)
            ]
    return found


def _label(workers: int) -> str:
    return "single process" if workers == 0 else f"{workers} worker{'s' if workers > 1 else ''}"


def round_order(configs: list[dict[str, Any]], number: int) -> list[dict[str, Any]]:
    """Round ``number``'s order: per source and batch size, forward on even rounds and
    backward on odd ones (1 worker and 2 workers alternate which goes first)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for config in configs:
        key = (config["source"], config["batch"], config.get("idle", ""))
        groups.setdefault(key, []).append(config)
    ordered = []
    for group in groups.values():
        ordered += group if number % 2 == 0 else group[::-1]
    return ordered


def run_argv(config: dict[str, Any], source: str, folder: Path) -> list[str]:
    """The ``gpu-pipeline run`` arguments of one run."""
    argv = [
        "run",
        "--source",
        source,
        "--sink",
        f"chdb://{folder / 'ch'}",
        "--database",
        DATABASE,
        "--checkpoint-dir",
        str(folder / "ckpt"),
        "--engine",
        "cpu",
        "--progress",
        "never",
    ]
    if config["batch"]:
        argv += ["--batch-size", str(config["batch"])]
    if config["source"] == "kafka":
        argv += ["--group-id", f"bench-cluster-{folder.name}", "--until-idle"]
        argv += ["--idle-timeout", config.get("idle") or "1s"]
    if config["workers"]:
        argv += ["--workers", str(config["workers"])]
    return argv


def run_child(argv: list[str], folder: Path) -> dict[str, Any]:
    """One run as a child process: its figures, with the wall time and the tree's peak RSS."""
    import machine  # beside this script
    import psutil

    folder.mkdir(parents=True)
    out = folder / "result.json"
    env = child_env()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--", *argv]
    with open(folder / "log.txt", "wb") as log:
        started = time.time()
        child = psutil.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        tree_peak = 0
        while True:
            try:
                child.wait(0.25)
                break
            except psutil.TimeoutExpired:
                pass
            if time.time() - started > RUN_TIMEOUT_S:
                os.killpg(child.pid, 9)
                child.wait()
                raise SystemExit(f"a run took over {RUN_TIMEOUT_S:.0f} s: {' '.join(argv)}")
            tree_peak = max(tree_peak, machine.tree_rss(child))
        ended = time.time()
    if child.returncode != 0 or not out.is_file():
        log_text = (folder / "log.txt").read_text(errors="replace")
        raise RunFailed(child.returncode, ended - started, log_text, folder / "log.txt")
    result = json.loads(out.read_text())
    result["wall_s"] = ended - started
    result["t0"] = started
    result["tree_peak_rss"] = tree_peak
    return result


class RunFailed(Exception):
    """A run exited with an error: kept in the report, the benchmark goes on."""

    def __init__(self, code: int | None, wall_s: float, log: str, path: Path) -> None:
        errors = [line for line in log.splitlines() if "Error" in line and ":" in line]
        self.code, self.wall_s, self.path = code, wall_s, path
        lines = errors or log.strip().splitlines() or ["?"]
        self.error = lines[-1]
        super().__init__(f"exit {code} after {wall_s:.1f} s: {self.error}")


def child_env() -> dict[str, str]:
    """The children's environment: this checkout's code first (not whatever the virtualenv's
    editable install points at), no crash injection."""
    env = {k: v for k, v in os.environ.items() if k != "GPU_PIPELINE_CRASH_AT"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def code_version() -> str:
    """The commit measured, and whether gpu_pipeline/ differs from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gpu_pipeline"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit}" + (" with uncommitted changes in gpu_pipeline/" if dirty else "")


def phases(result: dict[str, Any]) -> dict[str, float]:
    """Durations from the child's timestamps (seconds; cluster phases absent for a single
    process)."""
    marks, t0 = result["marks"], result["t0"]
    found = {
        "wall_s": result["wall_s"],
        "startup_s": marks["run_start"] - t0,
        "run_s": marks["run_end"] - marks["run_start"],
        "teardown_s": t0 + result["wall_s"] - marks["run_end"],
    }
    if "cluster_up" in marks:
        found["cluster_start_s"] = marks["cluster_up"] - marks["imported"]
    starts = [t["compute_start"] for t in result["tasks"] if "compute_start" in t]
    stops = [t["compute_stop"] for t in result["tasks"] if "compute_stop" in t]
    if starts and stops:
        found["task_sum_s"] = sum(float(t["elapsed_s"]) for t in result["tasks"])
        found["first_task_s"] = min(starts) - t0
        found["tasks_span_s"] = max(stops) - min(starts)
        gaps = dispatch_gaps(result["tasks"])
        if gaps:
            found["dispatch_gap_s"] = statistics.median(gaps)
    return found


def dispatch_gaps(tasks: list[dict[str, Any]]) -> list[float]:
    """Per worker, the idle time between one task's end and its next task's start."""
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for task in tasks:
        if "compute_start" in task:
            by_worker.setdefault(task["worker"], []).append(
                (task["compute_start"], task["compute_stop"])
            )
    gaps = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    return gaps


def worker_records(result: dict[str, Any]) -> list[int]:
    """Records each worker read, in worker order."""
    found: dict[str, int] = {}
    for task in result["tasks"]:
        found[task["worker"]] = found.get(task["worker"], 0) + int(task["records"])
    return [found[w] for w in sorted(found)]


def worker_peaks(result: dict[str, Any]) -> list[int]:
    """Each worker's peak RSS (bytes), from its tasks' reports, in worker order."""
    peaks: dict[str, int] = {}
    for task in result["tasks"]:
        peaks[task["worker"]] = max(peaks.get(task["worker"], 0), int(task["peak_rss_bytes"]))
    return [peaks[w] for w in sorted(peaks)]


# --------------------------------------------------------------------------- inputs


def generate_files(directory: Path, events: int, partitions: int, seed: int) -> list[str]:
    """``gpu-pipeline generate --out DIR/ --partitions N``; the command line."""
    argv = ["generate", "--events", str(events), "--seed", str(seed)]
    argv += ["--out", f"{directory}/", "--partitions", str(partitions)]
    subprocess.run(
        [sys.executable, "-m", "gpu_pipeline.cli", *argv],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env=child_env(),
    )
    return argv


class Kafka:
    """The broker (given, or started through tests/kafka_broker.py) and the bench topic."""

    def __init__(self, bootstrap: str) -> None:
        sys.path.insert(0, str(ROOT))
        from tests import kafka_broker

        self._broker = kafka_broker
        if bootstrap:
            os.environ[kafka_broker.BOOTSTRAP_ENV] = bootstrap
        self.owned = not bootstrap
        started = time.perf_counter()
        self.bootstrap = kafka_broker.broker_bootstrap()
        self.start_s = time.perf_counter() - started
        self.topic = f"bench-cluster-{uuid.uuid4().hex[:8]}"

    def fill(self, events: int, seed: int, partitions: int, topic: str = "") -> float:
        """Produce the synthetic stream into a fresh topic (the bench topic unless
        ``topic``); events/s of the producer."""
        from gpu_pipeline.sources.kafka_producer import produce_synthetic

        topic = topic or self.topic
        self._broker.create_topic(self.bootstrap, topic, partitions)
        started = time.perf_counter()
        sent = produce_synthetic(
            f"kafka://{self.bootstrap}/{topic}", events, seed, partitions=partitions
        )
        took = time.perf_counter() - started
        if sent != events:
            raise SystemExit(f"produced {sent} of {events} events")
        return events / took

    def close(self) -> None:
        if self.owned:
            self._broker.stop_broker()


# --------------------------------------------------------------------------- checks


def compare_tables(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run's tables against its group's single-process run (same source and batch
    size): equal row by row, or the first difference."""
    sys.path.insert(0, str(ROOT))
    from tests.engine_harness import assert_table_equal
    from tests.pipeline_runs import read_tables

    references: dict[tuple[str, int], dict[str, Any]] = {}
    checks = []
    for run in sorted(runs, key=lambda r: (r["config"]["workers"] != 0, r["round"])):
        config = run["config"]
        group = (config["source"], config["batch"])
        if run.get("resumed") and group not in references:
            continue  # a resumed run is never the reference
        tables = read_tables(Path(run["folder"]) / "ch", DATABASE)
        rows = {name: table.num_rows for name, table in tables.items()}
        if group not in references:
            references[group] = {"tables": tables}
            checks.append({"run": run, "rows": rows, "equal": True, "reference": True})
            continue
        reference = references[group]
        problem = ""
        for name, expected in reference["tables"].items():
            if tables[name].equals(expected):
                continue
            try:
                assert_table_equal(name, tables[name], expected)
            except AssertionError as exc:
                problem = str(exc).splitlines()[0]
                break
        checks.append({"run": run, "rows": rows, "equal": not problem, "problem": problem})
    return checks


# --------------------------------------------------------------------------- summary


def summarize(runs: list[dict[str, Any]], configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the median and range of every figure over its rounds."""
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"]["name"] == config["name"]]
        if not mine:
            continue
        rates = [r["events"] / r["phases"]["wall_s"] for r in mine]
        run_rates = [r["events"] / r["phases"]["run_s"] for r in mine]
        figures: dict[str, list[float]] = {}
        for r in mine:
            for key, value in r["phases"].items():
                figures.setdefault(key, []).append(value)
        per_worker = [worker_peaks(r) for r in mine]
        rows.append(
            {
                "config": config,
                "rounds": len(mine),
                "rate": rates,
                "run_rate": run_rates,
                "figures": figures,
                "batches": statistics.median(r["batches"] for r in mine),
                "client_rss": [r["client_peak_rss"] for r in mine],
                "tree_rss": [r["tree_peak_rss"] for r in mine],
                "worker_rss": [
                    statistics.median(p[i] for p in per_worker if len(p) > i)
                    for i in range(max((len(p) for p in per_worker), default=0))
                ],
                "staged_blocks": statistics.median(r.get("staged_blocks", 0) for r in mine),
            }
        )
    return rows


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """``median (min–max)``, or the value alone for one round."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(med(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def overhead(summary: list[dict[str, Any]], small_batch: int) -> dict[str, float] | None:
    """Per-batch cost of a 1-worker cluster over one process, from the file runs at the
    default and at the small batch size: the growth of (run time on 1 worker - run time in
    one process) with the number of batches.  Medians over rounds."""
    by = {(r["config"]["workers"], r["config"]["batch"]): r for r in summary
          if r["config"]["source"] == "file"}  # fmt: skip
    needed = [(0, 0), (1, 0), (0, small_batch), (1, small_batch)]
    if not small_batch or any(key not in by for key in needed):
        return None

    def run_s(key: tuple[int, int]) -> float:
        return med(by[key]["figures"]["run_s"])

    def wall_s(key: tuple[int, int]) -> float:
        return med(by[key]["figures"]["wall_s"])

    big, small = by[(1, 0)]["batches"], by[(1, small_batch)]["batches"]
    diff_big = run_s((1, 0)) - run_s((0, 0))
    diff_small = run_s((1, small_batch)) - run_s((0, small_batch))
    return {
        "batches_default": big,
        "batches_small": small,
        "diff_default_s": diff_big,
        "diff_small_s": diff_small,
        "wall_diff_default_s": wall_s((1, 0)) - wall_s((0, 0)),
        "wall_diff_small_s": wall_s((1, small_batch)) - wall_s((0, small_batch)),
        "naive_per_batch_ms": 1000 * diff_small / small if small else float("nan"),
        "per_batch_ms": 1000 * (diff_small - diff_big) / (small - big)
        if small > big
        else float("nan"),
        "single_per_batch_ms": 1000 * (run_s((0, small_batch)) - run_s((0, 0))) / (small - big)
        if small > big
        else float("nan"),
    }


# --------------------------------------------------------------------------- output


def terminal_table(summary: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="scale-out (median, range over rounds)", header_style="bold")
    for name in (
        "configuration",
        "events/s",
        "wall s",
        "run s",
        "first task s",
        "client MiB",
        "worker MiB",
        "batches",
    ):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for row in summary:
        fig = row["figures"]
        table.add_row(
            row["config"]["name"],
            spread(row["rate"]),
            spread(fig["wall_s"], ".2f"),
            spread(fig["run_s"], ".2f"),
            spread(fig.get("first_task_s", []), ".2f"),
            mib(med(row["client_rss"])),
            " / ".join(mib(v) for v in row["worker_rss"]) or "-",
            f"{row['batches']:,.0f}",
        )
    return table


def plot(summary: list[dict[str, Any]], path: Path, rounds: int) -> bool:
    """Events/s per configuration: the median (bar), every round (dots), the range; wall
    time and the run alone side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    shown = [r for r in summary if not r["config"]["batch"]]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = {"file": "#4c72b0", "kafka": "#dd8452"}
    for i, row in enumerate(shown):
        color = colors[row["config"]["source"]]
        for offset, key, alpha in ((-0.2, "rate", 0.9), (0.2, "run_rate", 0.4)):
            rates = [v / 1000 for v in row[key]]
            middle = med(rates)
            ax.bar(i + offset, middle, width=0.38, color=color, alpha=alpha)
            ax.errorbar(i + offset, middle, yerr=[[middle - min(rates)], [max(rates) - middle]],
                        color="black", capsize=3, lw=1)  # fmt: skip
            ax.scatter([i + offset] * len(rates), rates, color="black", s=8, zorder=3)
    labels = []
    for row in shown:
        label = row["config"]["name"].replace(" ", "\n", 1).replace(", ", "\n")
        if row["rounds"] < rounds:
            label += f"\n({row['rounds']} of {rounds} ran)"
        labels.append(label)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("thousand events/s")
    ax.legend(
        handles=[
            Patch(color="gray", alpha=0.9, label="wall (process start to exit)"),
            Patch(color="gray", alpha=0.4, label="the run alone"),
        ],
        fontsize=7,
        loc="upper right",
    )
    ax.set_title("end to end, 2-core machine: median, range and each round", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def report(
    args: argparse.Namespace,
    context: dict[str, Any],
    summary: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    costs: dict[str, float] | None,
    plotted: bool,
) -> str:
    from machine import markdown

    def find(source: str, workers: int, batch: int = 0, idle: str = "") -> dict[str, Any] | None:
        for row in summary:
            c = row["config"]
            key = (c["source"], c["workers"], c["batch"], c.get("idle", ""))
            if key == (source, workers, batch, idle):
                return row
        return None

    lines = [
        "# Scale-out: one process vs 1 and 2 dask workers",
        "",
        f"Generated by `{context['command']}` on {context['date']} "
        f"({context['total_s']:.0f} s in all), code at commit {context['code']}. "
        f"{args.events:,} events, {args.partitions} "
        f"partitions, {args.rounds} interleaved round(s): every round runs every "
        "configuration, the order reversed on odd rounds; figures are the median over the "
        "rounds, with the range (min–max) in brackets.",
        "",
        "## Machine",
        "",
        markdown(),
        f"- **load average** (1, 5, 15 min) before: {_load(context['load_before'])}; "
        f"after: {_load(context['load_after'])}",
    ]
    if context.get("kafka"):
        kafka = context["kafka"]
        lines.append(
            f"- **Kafka**: {'a broker started for the run' if kafka['owned'] else 'the broker'} "
            f"at {kafka['bootstrap']} on the same cores (deploy/kafka/kafka.sh); the topic "
            f"filled by `produce_synthetic` at {kafka['produce_rate']:,.0f} events/s"
        )
    lines += [
        "",
        "## Commands",
        "",
        "Input, once:",
        "",
        "```sh",
        "gpu-pipeline " + " ".join(context["generate"]).replace(context["work"], "$WORK"),
    ]
    if context.get("kafka"):
        lines.append(
            f"# and the same stream into a {args.partitions}-partition topic, keyed by user:\n"
            f"# produce_synthetic('kafka://$BROKER/$TOPIC', {args.events}, {args.seed}, "
            f"partitions={args.partitions})"
        )
    lines += ["```", "", "Each run, in a fresh folder (`$RUN`):", "", "```sh"]
    for name, argv in context["commands"]:
        shown = " ".join(argv).replace(context["work"], "$WORK")
        shown = shown.replace(context.get("bootstrap", "\0"), "$BROKER")
        shown = shown.replace(context.get("topic", "\0"), "$TOPIC")
        lines.append(f"# {name}\ngpu-pipeline {shown}")
    lines += [
        "```",
        "",
        "(`$RUN` = `$WORK/<round>-<configuration>`; the Kafka group id names the run too.) "
        "Each runs as a child of this script, which parses exactly these arguments with the "
        "CLI's parser and calls what `gpu-pipeline run` calls; no cluster = one process, "
        "`--workers N` = a `distributed.LocalCluster` of N single-threaded worker processes "
        "(the CPU engine gives each worker its share of the cores: 2 OpenMP threads with 1 "
        "worker, 1 each with 2). With a chdb sink the client process owns the embedded "
        "ClickHouse: the workers stage their blocks as Arrow files and the client inserts them.",
        "",
        "## Events/s end to end",
        "",
        "**events/s** = events / wall time (process start to exit); **run s** = the run "
        "alone (from building the pipeline to its end, without interpreter start, imports, "
        "cluster start and teardown); **first task** = from process start until a worker "
        "starts the first task; **tasks span** = first task start to last task end; "
        "**cluster start** = `open_cluster` (LocalCluster with its workers up); **task time** "
        "= the tasks' own `elapsed_s`, summed (the workers' pipeline work, without the "
        "client's inserts).",
        "",
        "| configuration | events/s | wall s | run s | events/s (run) | cluster start s "
        "| first task s | tasks span s | task time s | teardown s | batches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        fig = row["figures"]
        name = row["config"]["name"]
        if row["rounds"] < args.rounds:
            name += f" ({row['rounds']} of {args.rounds} rounds finished)"
        lines.append(
            f"| {name} | {spread(row['rate'])} | {spread(fig['wall_s'], '.2f')} "
            f"| {spread(fig['run_s'], '.2f')} | {spread(row['run_rate'])} "
            f"| {spread(fig.get('cluster_start_s', []), '.2f')} "
            f"| {spread(fig.get('first_task_s', []), '.2f')} "
            f"| {spread(fig.get('tasks_span_s', []), '.2f')} "
            f"| {spread(fig.get('task_sum_s', []), '.2f')} "
            f"| {spread(fig['teardown_s'], '.2f')} | {row['batches']:,.0f} |"
        )
    finished = {row["config"]["name"] for row in summary}
    for config in context["configs"]:
        if config["name"] not in finished:
            lines.append(
                f"| {config['name']} | **no run finished** (all {args.rounds} failed, see "
                "below) |" + " - |" * 9
            )
    if context["failures"]:
        lines += ["", "**Failed runs** (left out of every figure; the tables above count the "
                  "rounds that finished):", ""]  # fmt: skip
        for failed in context["failures"]:
            exc = failed["failure"]
            lines.append(
                f"- round {failed['round'] + 1}, {failed['config']['name']}: exit {exc.code} "
                f"after {exc.wall_s:.1f} s: `{exc.error.strip()[:400]}`. The same command run "
                f"again (resuming the job, not timed): {failed['resumed']}."
            )
    if plotted:
        lines += ["", f"![events/s per configuration]({context['plot']})"]
    else:
        lines += ["", "(matplotlib is not installed in this environment: no plot.)"]
    lines += [
        "",
        "## Memory",
        "",
        "Peak RSS in MiB, median over rounds. **client**: the process that was started "
        "(`ru_maxrss`; with `--workers` it also holds the dask scheduler and the embedded "
        "ClickHouse); **per worker**: each worker process's `ru_maxrss` from its tasks' "
        "reports; **tree**: the largest sampled sum over the whole process tree (client, "
        "nannies, workers; every 0.25 s, shared pages counted in each process).",
        "",
        "| configuration | client | per worker | tree | staged blocks |",
        "|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['config']['name']} | {mib(med(row['client_rss']))} "
            f"| {' / '.join(mib(v) for v in row['worker_rss']) or '-'} "
            f"| {mib(med(row['tree_rss']))} | {row['staged_blocks']:,.0f} |"
        )
    lines += ["", "## Scheduling overhead", ""]
    if costs:
        lines += [
            "A cluster run submits one dask task per file partition; inside a task the "
            "micro-batches run as in one process. So the cost per micro-batch is measured as "
            "the growth of (run time on 1 worker − run time in one process) between the "
            f"default batch size and `--batch-size {args.small_batch:,}` (same input):",
            "",
            "| batch size | batches | 1 worker − one process (run s) | (wall s) |",
            "|---|---|---|---|",
            f"| default | {costs['batches_default']:,.0f} | {costs['diff_default_s']:+.2f} "
            f"| {costs['wall_diff_default_s']:+.2f} |",
            f"| {args.small_batch:,} | {costs['batches_small']:,.0f} "
            f"| {costs['diff_small_s']:+.2f} | {costs['wall_diff_small_s']:+.2f} |",
            "",
            f"- **per micro-batch**: {costs['per_batch_ms']:+.2f} ms "
            f"(({costs['diff_small_s']:+.2f} s − {costs['diff_default_s']:+.2f} s) / "
            f"({costs['batches_small']:,.0f} − {costs['batches_default']:,.0f}) batches); "
            f"the naive (difference at batch size {args.small_batch:,}) / batches is "
            f"{costs['naive_per_batch_ms']:+.2f} ms. For scale: in one process each extra "
            f"micro-batch (batch size {args.small_batch:,} instead of the default) costs "
            f"{costs['single_per_batch_ms']:.2f} ms.",
        ]
    else:
        lines.append("(not measured in this run: `--small-batch 0` or no file runs.)")
    one, single = find("file", 1), find("file", 0)
    if one is not None and single is not None:
        fig = one["figures"]
        lines.append(
            f"- **fixed cost of the cluster** (file, 1 worker): cluster start "
            f"{spread(fig.get('cluster_start_s', []), '.2f')} s; the first task starts "
            f"{spread(fig.get('first_task_s', []), '.2f')} s after the process (one process "
            f"begins its run {spread(single['figures']['startup_s'], '.2f')} s after its "
            f"start); teardown {spread(fig['teardown_s'], '.2f')} s (one process: "
            f"{spread(single['figures']['teardown_s'], '.2f')} s); between two tasks on one "
            f"worker the scheduler leaves it idle "
            f"{1000 * med(fig.get('dispatch_gap_s', [])):.0f} ms (median)."
        )
    lines += ["", "## Do the tables agree?", ""]
    lines += agreement(checks)
    lines += ["", "## Interpretation", ""]
    lines += interpretation(args, summary, costs, find, context["runs"], context["failures"])
    lines += ["", "## Every run", ""]
    lines += [
        "| round | configuration | wall s | events/s | run s | first task s | client MiB "
        "| worker MiB | records per worker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in context["runs"]:
        ph = run["phases"]
        first = f"{ph['first_task_s']:.2f}" if "first_task_s" in ph else "-"
        lines.append(
            f"| {run['round'] + 1} | {run['config']['name']} | {ph['wall_s']:.2f} "
            f"| {run['events'] / ph['wall_s']:,.0f} | {ph['run_s']:.2f} | {first} "
            f"| {mib(run['client_peak_rss'])} "
            f"| {' / '.join(mib(v) for v in worker_peaks(run)) or '-'} "
            f"| {' / '.join(f'{v:,}' for v in worker_records(run)) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _load(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def agreement(checks: list[dict[str, Any]]) -> list[str]:
    """The comparison of every run's tables with its group's single-process run."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for check in checks:
        config = check["run"]["config"]
        groups.setdefault((config["source"], config["batch"]), []).append(check)
    lines = [
        "Every run's tables (read back through chdb, versioned tables `FINAL`, sorted) "
        "compared row by row, every column, with the single-process run of round 1 of the "
        "same source and batch size:",
        "",
    ]
    names = list(checks[0]["rows"]) if checks else []
    header = "| source, batch size | runs | all equal | " + " | ".join(names) + " |"
    lines += [header, "|" + "---|" * (3 + len(names))]
    for (source, batch), mine in groups.items():
        equal = sum(c["equal"] for c in mine)
        verdict = "yes" if equal == len(mine) else f"**no**: {len(mine) - equal} differ"
        rows = mine[0]["rows"]
        lines.append(
            f"| {source}, {batch or 'default'} | {len(mine)} | {verdict} | "
            + " | ".join(f"{rows[n]:,}" for n in names)
            + " |"
        )
    for check in checks:
        run = check["run"]
        what = f"round {run['round'] + 1}, {run['config']['name']}"
        if run.get("resumed"):
            verdict = "equal" if check["equal"] else f"**differ**: {check['problem']}"
            lines.append(f"\n- {what}, resumed after its failure: tables {verdict}")
        elif not check["equal"]:
            lines.append(f"\n- {what}: {check['problem']}")
    lines += [
        "",
        "(Row counts are those of each group's reference run. File and Kafka runs are not "
        "compared with each other: the topic's partitions are by key hash, the files' by "
        "user, so watermarks and lateness differ.)",
    ]
    return lines


def interpretation(
    args: argparse.Namespace,
    summary: list[dict[str, Any]],
    costs: dict[str, float] | None,
    find: Any,
    context_runs: list[dict[str, Any]],
    context_failures: list[dict[str, Any]],
) -> list[str]:
    lines = []
    for source in ("file", "kafka"):
        single, one, two = find(source, 0), find(source, 1), find(source, 2)
        if single and one and not two:
            lines.append(
                f"- **{source}**: 1 worker runs at {med(one['rate']) / med(single['rate']):.2f}× "
                f"the events/s of one process ({med(one['rate']):,.0f} vs "
                f"{med(single['rate']):,.0f}; the run alone {med(one['run_rate']):,.0f} vs "
                f"{med(single['run_rate']):,.0f}); on 2 workers no run finished (see "
                "**Failures**)."
            )
        if not (single and one and two):
            continue
        s, o, t = med(single["rate"]), med(one["rate"]), med(two["rate"])
        if len(one["rate"]) > 1:
            overlap = _overlap(one["rate"], two["rate"])
            ranges = f"; the rounds' ranges {'overlap' if overlap else 'do not overlap'}"
        else:
            ranges = "; one round only"
        lines.append(
            f"- **{source}**: 2 workers run at {t / o:.2f}× the events/s of 1 worker "
            f"({t:,.0f} vs {o:,.0f}{ranges}) and {t / s:.2f}× one process "
            f"({s:,.0f}). Counting the run alone (no interpreter, imports, cluster start or "
            f"teardown): 2 workers {med(two['run_rate']):,.0f}, 1 worker "
            f"{med(one['run_rate']):,.0f}, one process {med(single['run_rate']):,.0f} "
            "events/s."
        )
    if args.kafka_idle:
        one, two = find("kafka", 1, idle=args.kafka_idle), find("kafka", 2, idle=args.kafka_idle)
        if one and two:
            lines.append(
                f"- **kafka with `--idle-timeout {args.kafka_idle}`** (every run waits that "
                f"long at its end): 2 workers {med(two['rate']):,.0f} events/s, 1 worker "
                f"{med(one['rate']):,.0f} ({med(two['rate']) / med(one['rate']):.2f}×; "
                f"{two['rounds']} and {one['rounds']} of {args.rounds} runs finished); the "
                f"run alone {med(two['run_rate']):,.0f} vs {med(one['run_rate']):,.0f}."
            )
    kafka_two = [
        r for r in context_runs if r["config"]["source"] == "kafka" and r["config"]["workers"] == 2
    ]
    if kafka_two:
        shares = [max(worker_records(r)) / max(1, r["events"]) for r in kafka_two]
        idle = sum(1 for r in kafka_two if min(worker_records(r), default=0) == 0)
        text = (
            f"- **Kafka on 2 workers, the split**: in the {len(kafka_two)} finished run(s) "
            "(both idle timeouts) the "
            f"busier consumer read {spread(shares, '.0%')} of the events"
            + (f", and in {idle} the other read none" if idle else "")
            + ". Both consumers join the job's group (dynamic members with --until-idle, "
            "cooperative-sticky); the "
            "first to join gets every partition, and the newcomer gets its share only in the "
            "second round of a cooperative rebalance (the owner first revokes, then everyone "
            "rejoins; a member notices a rebalance at its next heartbeat, every 3 s), so on a "
            "short job the split comes late or not at all."
        )
        lines.append(text)
    failures = context_failures
    if failures:
        names = sorted({f["config"]["name"] for f in failures})
        text = (
            f"- **Failures**: {len(failures)} run(s) failed ({', '.join(names)}; listed under "
            "the first table)."
        )
        generation = [f for f in failures if "ILLEGAL_GENERATION" in f["failure"].error]
        if generation:
            per_name = ", ".join(
                f"{name}: {sum(f['config']['name'] == name for f in generation)} of {args.rounds}"
                for name in sorted({f["config"]["name"] for f in generation})
            )
            text += (
                f" {len(generation)} of them with `ILLEGAL_GENERATION` on a consumer's offset "
                f"commit after its checkpoint ({per_name}). What happens (seen with "
                "`?debug=cgrp` on the source URL, `--idle-timeout 1s`): consumer A joins first "
                "and gets all 4 partitions; B joins, and the first round of the cooperative "
                "rebalance gives B no partition while A revokes 2. `KafkaSource._assigned` "
                "sets `_ever_assigned` even for that empty assignment, so with `--until-idle` "
                "B's `_idle()` ends B's run after `--idle-timeout` holding nothing, before the "
                "second round would have handed it A's 2 partitions. B closes as a static "
                "member, which does not leave the group, so A's rejoin for the second round "
                "waits for B's session timeout (10 s); A's final commit, sent with the old "
                "generation meanwhile, returns `ILLEGAL_GENERATION` once the group moves on, "
                "and `KafkaSource.commit` treats that as fatal (only retriable errors are "
                "skipped), so the task fails and with it the whole cluster run, although the "
                "checkpoint is durable. Any rebalance that overlaps a consumer's commit ends "
                "the same way, e.g. when the member that finished first times out while the "
                "other still commits, which is how a longer `--idle-timeout` can still fail. "
                "Running the command again resumes the job, and its tables come out right "
                "(see the table check)."
            )
        lines.append(text)
    lines += [
        "- **Why little or no speed-up is expected here**: the machine has 2 cores. One "
        "process already uses both (2 OpenMP threads in the kernels, the decoder's threads, "
        "ClickHouse's own threads for the inserts). With 2 workers each gets 1 kernel thread, "
        "and both share the same 2 cores with the client, whose embedded ClickHouse inserts "
        "everything the workers stage (a single writer), with the dask scheduler, and for "
        "Kafka with the broker's JVM. Scale-out buys throughput when workers bring cores (or "
        "GPUs) of their own; on one 2-core box it can only overlap work that was serial.",
        f"- **Contention**: the load average was {_load(args.load_before)} before and "
        f"{_load(args.load_after)} after the run on {os.cpu_count()} cores; a load above the "
        "core count means other work took CPU time during the measurements, which widens the "
        "ranges and lowers every configuration's events/s, not one alone (the rounds "
        "interleave them).",
    ]
    if costs:
        per_batch, own = costs["per_batch_ms"], costs["single_per_batch_ms"]
        small = abs(per_batch) < 0.25 * abs(own)
        lines.append(
            f"- **Per-batch overhead**: {per_batch:+.2f} ms per micro-batch, against "
            f"{own:.2f} ms that each extra micro-batch costs in one process: "
            + (
                "small, as the design predicts: a cluster run has no dask round trip per "
                "micro-batch (a task reads its partition to the end), so its cost is fixed "
                "per run (cluster start, worker imports, kernel load, plugin setup) and per "
                "task."
                if small
                else "not small in this run. A cluster run has no dask round trip per "
                "micro-batch (a task reads its partition to the end), so what a batch pays "
                "more on a worker comes from the worker process itself (its extra threads: "
                "dask's event loop, the task's watcher) or from the client's concurrent "
                "inserts competing for the same 2 cores; being a difference of differences, "
                "the figure is noisy (compare the rounds' ranges above)."
            )
        )
    one = find("file", 1)
    single = find("file", 0)
    if one and single:
        lines.append(
            f"- **Fixed cost**: the first task starts "
            f"{med(one['figures'].get('first_task_s', [])):.1f} s after the process starts "
            f"(one process starts its run after {med(single['figures']['startup_s']):.1f} s), "
            f"and the teardown takes {med(one['figures']['teardown_s']):.1f} s vs "
            f"{med(single['figures']['teardown_s']):.1f} s: at {args.events:,} events this "
            "is a sizeable share of the wall time, and it shrinks in relative terms for "
            "longer jobs."
        )
    two = find("file", 2)
    if one and two and single:
        lines.append(
            f"- **Memory**: one process peaks at {mib(med(single['client_rss']))} MiB; with "
            f"workers the client (scheduler + ClickHouse) peaks at "
            f"{mib(med(one['client_rss']))} MiB (1 worker) / {mib(med(two['client_rss']))} "
            f"MiB (2 workers), each worker at "
            f"{' / '.join(mib(v) for v in one['worker_rss'])} MiB (1 worker) and "
            f"{' / '.join(mib(v) for v in two['worker_rss'])} MiB (2 workers); the tree "
            f"totals {mib(med(one['tree_rss']))} and {mib(med(two['tree_rss']))} MiB vs "
            f"{mib(med(single['tree_rss']))} MiB: each worker process carries its own "
            "Python, pyarrow and kernels."
        )
    return lines


def _overlap(a: list[float], b: list[float]) -> bool:
    return min(a) <= max(b) and min(b) <= max(a)


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout's code, then machine.py
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(stderr=True)
    args.load_before = list(os.getloadavg())
    began = time.perf_counter()
    configs = configurations(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {
        "command": "python benchmarks/bench_cluster.py"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "work": str(work),
    }
    kafka: Kafka | None = None
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    resumed: list[dict[str, Any]] = []
    try:
        console.log(f"generating {args.events:,} events into {args.partitions} files")
        context["generate"] = generate_files(
            work / "input", args.events, args.partitions, args.seed
        )
        warm = work / "warm"
        generate_files(warm / "input", 2_000, args.partitions, args.seed)
        sources = {"file": f"file:{work / 'input'}"}
        if not args.no_kafka:
            console.log("starting / reaching the Kafka broker")
            kafka = Kafka(args.bootstrap)
            console.log(f"broker {kafka.bootstrap}; producing {args.events:,} events")
            rate = kafka.fill(args.events, args.seed, args.partitions)
            sources["kafka"] = f"kafka://{kafka.bootstrap}/{kafka.topic}"
            context["kafka"] = {
                "owned": kafka.owned,
                "bootstrap": kafka.bootstrap,
                "produce_rate": rate,
            }
            context["bootstrap"] = kafka.bootstrap
            context["topic"] = kafka.topic
        context["commands"] = [
            (c["name"], run_argv(c, sources[c["source"]], Path("$RUN"))) for c in configs
        ]
        # warm-up (not measured): kernel build cache, page cache of the imports, chdb, and
        # the broker's group coordinator (the first group join after its start is slow)
        console.log("warm-up: tiny runs in one process and on a worker")
        warmups = [("file", w, f"file:{warm / 'input'}") for w in (0, 1)]
        if kafka is not None:
            kafka.fill(2_000, args.seed, args.partitions, f"{kafka.topic}-warm")
            warmups.append(("kafka", 0, f"kafka://{kafka.bootstrap}/{kafka.topic}-warm"))
        for source, w, url in warmups:
            config = {"source": source, "workers": w, "batch": 0}
            folder = warm / f"{source}-w{w}"
            run_child(run_argv(config, url, folder), folder)
        todo = [(n, c) for n in range(args.rounds) for c in round_order(configs, n)]
        with Progress(
            "[bold]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("runs", total=len(todo))
            for number, config in todo:
                progress.update(task, description=f"round {number + 1}: {config['name']}")
                slug = config["name"].replace(" ", "-").replace(",", "")
                folder = work / f"{number + 1}-{slug}"
                argv = run_argv(config, sources[config["source"]], folder)
                try:
                    result = run_child(argv, folder)
                except RunFailed as exc:
                    progress.console.log(f"round {number + 1} {config['name']}: FAILED, {exc}")
                    failed = {"config": config, "round": number, "failure": exc}
                    try:  # the same command again resumes the job: do its tables come out right?
                        run_child(argv, folder / "resume")
                        failed["resumed"] = "the rerun finished"
                        resumed.append(
                            {"config": config, "round": number, "folder": str(folder),
                             "resumed": True}
                        )  # fmt: skip
                    except RunFailed as again:
                        failed["resumed"] = f"the rerun failed too: {again}"
                    failures.append(failed)
                    progress.advance(task)
                    continue
                result.update(config=config, round=number, folder=str(folder))
                result["events"] = args.events
                result["phases"] = phases(result)
                if result["records"] != args.events:
                    raise SystemExit(
                        f"{config['name']} read {result['records']} of {args.events} events"
                    )
                runs.append(result)
                progress.console.log(
                    f"round {number + 1} {config['name']}: {result['phases']['wall_s']:.2f} s, "
                    f"{args.events / result['phases']['wall_s']:,.0f} events/s"
                )
                progress.advance(task)
        console.log("reading back and comparing the tables of every run")
        checks = compare_tables(runs + resumed)
    finally:
        if kafka is not None:
            kafka.close()
    args.load_after = list(os.getloadavg())
    summary = summarize(runs, configs)
    costs = overhead(summary, args.small_batch)
    context.update(
        runs=runs,
        failures=failures,
        configs=configs,
        load_before=args.load_before,
        load_after=args.load_after,
        total_s=time.perf_counter() - began,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.out.with_name("cluster.png" if not args.tiny else "cluster-tiny.png")
    context["plot"] = plot_path.name
    plotted = plot(summary, plot_path, args.rounds)
    args.out.write_text(report(args, context, summary, checks, costs, plotted))
    if args.json:
        dump = {"runs": runs, "summary": summary, "failures": failures}
        args.json.write_text(json.dumps(dump, default=str))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    out = Console(width=max(120, Console().width))
    out.print(terminal_table(summary))
    if costs:
        out.print(
            f"overhead per micro-batch (1 worker vs one process): {costs['per_batch_ms']:+.2f} ms"
        )
    for failed in failures:
        out.print(f"FAILED: round {failed['round'] + 1}, {failed['config']['name']}: "
                  f"{failed['failure']}")  # fmt: skip
    bad = [c for c in checks if not c["equal"]]
    out.print(
        f"tables: {len(checks) - len(bad)} of {len(checks)} runs equal their single-process run"
    )
    console.log(f"wrote {args.out}" + (f" and {plot_path}" if plotted else ""))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(Path(sys.argv[2]), sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    else:
        main()

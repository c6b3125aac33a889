"""End to end: NDJSON file -> gpu-pipeline (CPU engine) -> embedded ClickHouse.

Runs ``gpu-pipeline run`` as a child process and samples its RSS, so the numbers include
everything a user pays: decode, kernels, sink inserts, checkpoints.  Prints a table and,
with ``--json``, writes the measurements for the report (``run_all.py`` plots RSS over time).

    python benchmarks/bench_e2e.py --events 2000000 --users-note "synthetic default"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "gpu_pipeline.cli"]


def generate(path: Path, events: int, seed: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        CLI + ["generate", "--events", str(events), "--seed", str(seed), "--out", str(path)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def run_pipeline(source: Path, work: Path, batch_size: int, threads: int) -> dict[str, object]:
    cmd = CLI + [
        "run",
        "--source",
        f"file:{source}",
        "--sink",
        f"chdb://{work / 'ch'}",
        "--checkpoint-dir",
        str(work / "ckpt"),
        "--engine",
        "cpu",
        "--batch-size",
        str(batch_size),
        "--progress",
        "never",
        "--checkpoint-interval",
        "10s",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    child = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []
    while child.poll() is None:
        try:
            rss = child.memory_info().rss
            samples.append((time.perf_counter() - start, rss / 2**20))
        except psutil.Error:
            pass
        time.sleep(0.25)
    elapsed = time.perf_counter() - start
    out, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{err.decode()[-3000:]}")
    return {
        "elapsed_s": elapsed,
        "peak_rss_mib": max((s[1] for s in samples), default=0.0),
        "rss_samples": samples,
        "stdout": out.decode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "events.ndjson"
        gen_s = generate(source, args.events, args.seed)
        size_mb = source.stat().st_size / 1e6
        result = run_pipeline(source, work, args.batch_size, args.threads)
    rate = args.events / float(result["elapsed_s"])  # type: ignore[arg-type]
    print("| events | file MB | generate s | pipeline s | events/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.events:,} | {size_mb:,.0f} | {gen_s:.2f} | {result['elapsed_s']:.2f} "
        f"| {rate:,.0f} | {result['peak_rss_mib']:,.0f} |"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "events": args.events,
                    "file_mb": size_mb,
                    "generate_s": gen_s,
                    "elapsed_s": result["elapsed_s"],
                    "events_per_s": rate,
                    "peak_rss_mib": result["peak_rss_mib"],
                    "rss_samples": result["rss_samples"],
                    "batch_size": args.batch_size,
                }
            )
        )


if __name__ == "__main__":
    main()

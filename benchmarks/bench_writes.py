"""Writes sized for ClickHouse: one insert per table per checkpoint vs one per micro-batch.

The same job on the same file, side by side in interleaved rounds: ``--checkpoint-interval 0``
checkpoints (and so inserts every table) after every micro-batch, the write pattern of a
sink that writes batch by batch; the default lets rows wait in the outbox and inserts one
block per table per checkpoint.  Reports wall time, inserts per table
and the ratio, with the machine.

    python benchmarks/bench_writes.py --events 1000000 --batch-size 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import markdown  # noqa: E402

CLI = [sys.executable, "-m", "gpu_pipeline.cli"]


def run(source: Path, work: Path, batch_size: int, per_batch: bool) -> tuple[float, int]:
    """One run into a fresh chdb folder: (seconds, inserts per table)."""
    sink = work / ("per-batch" if per_batch else "per-checkpoint") / str(time.monotonic_ns())
    cmd = [
        *CLI, "run", "--source", f"file:{source}", "--sink", f"chdb://{sink}",
        "--checkpoint-dir", str(sink / "ckpt"), "--engine", "cpu",
        "--batch-size", str(batch_size), "--progress", "never",
        "--checkpoint-interval", "0" if per_batch else "5s",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    # every checkpoint inserts each table once: its number is the number of inserts
    pointers = list((sink / "ckpt").glob("*/p0/CURRENT"))
    count = int(pointers[0].read_text().strip().removeprefix("ckpt-")) if pointers else -1
    return elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "events.ndjson"
        subprocess.run(
            [*CLI, "generate", "--events", str(args.events), "--seed", str(args.seed),
             "--out", str(source)],
            check=True, capture_output=True,
        )  # fmt: skip
        times: dict[bool, list[float]] = {True: [], False: []}
        parts: dict[bool, int] = {}
        for _ in range(args.rounds):
            for per_batch in (True, False):
                elapsed, count = run(source, work, args.batch_size, per_batch)
                times[per_batch].append(elapsed)
                parts[per_batch] = count
    print(markdown())
    print()
    print(f"{args.events:,} events, batch size {args.batch_size:,}, {args.rounds} rounds")
    print("| writes | median s | min-max s | events/s | inserts per table |")
    print("|---|---|---|---|---|")
    for per_batch, label in ((True, "one insert per table per batch"),
                             (False, "one insert per table per checkpoint")):  # fmt: skip
        t = times[per_batch]
        median = statistics.median(t)
        print(
            f"| {label} | {median:.2f} | {min(t):.2f}-{max(t):.2f} "
            f"| {args.events / median:,.0f} | {parts[per_batch]} |"
        )
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"\nper-checkpoint writes are {ratio:.2f}x the speed of per-batch writes")


if __name__ == "__main__":
    main()

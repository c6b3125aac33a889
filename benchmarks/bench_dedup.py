"""Dedup of a clickstream's event ids: our kernels (CPU build) against pandas, Polars, DuckDB.

The computation is the TTL-free one every engine can express: flag each event whose id
occurred earlier in the stream (pandas ``duplicated()``).  Our operator runs it with an
infinite TTL, fed in micro-batches like the pipeline does; the others see the whole
column at once.  Ids look like the producer's (``e-<16 hex>``); about 2% of events are
retries of an earlier id, some shortly after, some after a long delay.  Every engine's
flags are checked against ours.

    python benchmarks/bench_dedup.py --events 10000000 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

I64_MAX = int(np.iinfo(np.int64).max)
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def make_ids(events: int, dup_rate: float, seed: int) -> pa.Array:
    """``e-<16 hex>`` ids; a ``dup_rate`` share repeat an earlier event's id."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, size=events, dtype=np.int64).astype(np.uint64)
    retry = np.flatnonzero(rng.random(events) < dup_rate)
    near = rng.random(retry.size) < 0.7
    back = np.where(
        near, rng.integers(1, 100, retry.size), rng.integers(100, events // 2 + 101, retry.size)
    )
    values[retry] = values[np.maximum(retry - back, 0)]
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    nibbles = ((values[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.intp)
    chars = np.empty((events, 18), dtype=np.uint8)
    chars[:, 0], chars[:, 1] = ord("e"), ord("-")
    chars[:, 2:] = HEX[nibbles]
    offsets = np.arange(0, 18 * events + 1, 18, dtype=np.int32)
    return pa.StringArray.from_buffers(events, pa.py_buffer(offsets), pa.py_buffer(chars))


def ours(ids: pa.Array, threads: int, batch_size: int) -> Callable[[], np.ndarray]:
    from gpu_pipeline.backend.cpu import CpuBackend
    from gpu_pipeline.operators.dedup import Dedup, DedupConfig

    backend = CpuBackend(threads)
    n = len(ids)
    ts = np.arange(n, dtype=np.int64) * 10
    w = ts - 5_000

    def run() -> np.ndarray:
        op = Dedup(DedupConfig(ttl_ms=I64_MAX), backend)
        parts = []
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            parts.append(op.apply(backend.strings(ids.slice(lo, hi - lo)), ts[lo:hi], w[lo:hi]))
            op.expire(int(w[hi - 1]))
        return np.concatenate(parts)

    return run


def pandas_engine(ids: pa.Array) -> Callable[[], np.ndarray]:
    import pandas as pd

    series = pd.Series(ids.to_pandas())
    return lambda: series.duplicated().to_numpy()


def polars_engine(ids: pa.Array) -> Callable[[], np.ndarray]:
    import polars as pl

    series = pl.Series(ids)
    return lambda: (~series.is_first_distinct()).to_numpy()


def duckdb_engine(ids: pa.Array, threads: int) -> Callable[[], np.ndarray]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    table = pa.table({"id": ids, "pos": pa.array(np.arange(len(ids), dtype=np.int64))})
    con.register("events", table)
    query = "SELECT pos FROM events QUALIFY row_number() OVER (PARTITION BY id ORDER BY pos) > 1"

    def run() -> np.ndarray:
        flags = np.zeros(len(ids), dtype=bool)
        flags[con.execute(query).fetchnumpy()["pos"]] = True
        return flags

    return run


def timed(run: Callable[[], np.ndarray], repeat: int) -> tuple[list[float], np.ndarray]:
    times, result = [], np.zeros(0, dtype=bool)
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}; {os.cpu_count()} cores; load average {load}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1_000_000)
    parser.add_argument("--dup-rate", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engines", default="ours,pandas,polars,duckdb")
    args = parser.parse_args()
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)  # read when polars is imported

    ids = make_ids(args.events, args.dup_rate, args.seed)
    engines: dict[str, Callable[[], Callable[[], np.ndarray]]] = {
        "ours": lambda: ours(ids, args.threads, args.batch_size),
        "pandas": lambda: pandas_engine(ids),
        "polars": lambda: polars_engine(ids),
        "duckdb": lambda: duckdb_engine(ids, args.threads),
    }
    print(machine())
    print(f"{args.events:,} events, {args.threads} thread(s), batches of {args.batch_size:,}")
    print(f"{'engine':<10}{'best s':>10}{'median s':>10}{'M events/s':>12}{'duplicates':>12}")
    reference: np.ndarray | None = None
    for name in args.engines.split(","):
        times, flags = timed(engines[name](), args.repeat)
        if reference is None:
            reference = flags
        elif not np.array_equal(flags, reference):
            raise SystemExit(f"{name} disagrees with {args.engines.split(',')[0]}")
        best = min(times)
        print(
            f"{name:<10}{best:>10.3f}{statistics.median(times):>10.3f}"
            f"{args.events / best / 1e6:>12.2f}{int(flags.sum()):>12,}"
        )


if __name__ == "__main__":
    main()

"""Windowed aggregation: the WindowAggregator (CPU kernels) against pandas, Polars and DuckDB.

Two aggregations over one synthetic clickstream, with exact distinct users:

* tumbling 1 minute by event_type (events, users, revenue);
* hopping 5 minutes sliding 1 minute by product_id (views, add_to_carts, purchases,
  revenue, users) over Zipf-popular products.

The operator runs as the pipeline runs it (micro-batches, emission at every batch end,
state dropped behind the watermark) and also as one batch; the other engines compute the
same result over the whole input.  Every engine's result is checked against the operator's.

Usage::

    python benchmarks/bench_windows.py --events 10000000 --threads 2
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
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MINUTE_MS = 60_000
D_MS = 5_000
L_MS = 60_000
TYPE_WEIGHTS = {  # schema.EVENT_TYPES order
    "page_view": 0.40,
    "product_view": 0.30,
    "search": 0.10,
    "add_to_cart": 0.08,
    "remove_from_cart": 0.03,
    "checkout": 0.05,
    "purchase": 0.04,
}
WITH_PRODUCT = ("product_view", "add_to_cart", "remove_from_cart", "purchase")


def make_events(n: int, users: int, products: int, rate_per_s: int, seed: int) -> dict[str, Any]:
    """Columns of a clickstream in arrival order, with per-row watermarks (jitter within D)."""
    from gpu_pipeline import schema

    rng = np.random.default_rng(seed)
    names = list(TYPE_WEIGHTS)
    codes = np.array([schema.EVENT_TYPE_CODE[t] for t in names], dtype=np.int8)
    event_type = codes[rng.choice(len(names), n, p=list(TYPE_WEIGHTS.values()))]
    base = 1_764_000_000_000 + (np.arange(n, dtype=np.int64) * 1000) // rate_per_s
    ts = base + rng.integers(-D_MS // 2, D_MS // 2, n)
    running = np.maximum.accumulate(ts)
    w = np.empty(n, dtype=np.int64)
    w[0] = np.iinfo(np.int64).min
    w[1:] = running[:-1] - D_MS
    product = (rng.zipf(1.2, n) - 1) % products
    has_product = np.isin(event_type, [schema.EVENT_TYPE_CODE[t] for t in WITH_PRODUCT])
    purchase = event_type == schema.EVENT_TYPE_CODE["purchase"]
    revenue = np.where(purchase, rng.integers(1, 500, n) * 10_000 * rng.integers(1, 4, n), 0)
    return {
        "user_id": rng.integers(0, users, n, dtype=np.int64),
        "ts": ts,
        "w": w,
        "event_type": event_type,
        "product_id": np.where(has_product, product, -1).astype(np.int64),
        "has_product": has_product,
        "revenue_micros": revenue.astype(np.int64),
        "watermark_after": running - D_MS,
    }


# --------------------------------------------------------------------------------------
# Engines.  Each returns (tumbling, hopping) as dicts of numpy columns sorted by key.
# --------------------------------------------------------------------------------------

TUMBLE_COLS = ("start", "key", "events", "users", "revenue_micros")
HOP_COLS = ("start", "key", "views", "add_to_carts", "purchases", "revenue_micros", "users")


def ours(ev: dict[str, Any], kind: str, threads: int, batch: int) -> dict[str, Any]:
    from gpu_pipeline.backend.cpu import CpuBackend
    from gpu_pipeline.operators.windows import WindowAggregator
    from gpu_pipeline.semantics import DEFAULT_WINDOWS

    backend = CpuBackend(threads=threads)
    n = ev["ts"].shape[0]
    for spec in DEFAULT_WINDOWS:
        if (spec.key == "event_type") != (kind == "tumble"):
            continue
        op = WindowAggregator(spec, L_MS, backend, 0)
        if spec.key == "event_type":
            key, has_key = ev["event_type"].astype(np.int64), np.ones(n, dtype=bool)
        else:
            key, has_key = ev["product_id"], ev["has_product"]
        outputs = []
        for lo in range(0, n, batch):
            rows = slice(lo, min(n, lo + batch))
            op.apply(
                key[rows], has_key[rows], ev["user_id"][rows], ev["ts"][rows], ev["w"][rows],
                ev["event_type"][rows], ev["revenue_micros"][rows],
            )  # fmt: skip
            outputs.append(op.emit(int(ev["watermark_after"][rows.stop - 1])))
        outputs.append(op.emit(None))
        return _latest(outputs, spec.key)
    raise ValueError(kind)


def _latest(outputs: list[Any], key: str) -> dict[str, Any]:
    import pyarrow as pa

    from gpu_pipeline import schema

    table = pa.concat_tables(outputs)
    start = table["window_start"].cast(pa.int64()).to_numpy()
    if key == "event_type":
        names = table["event_type"].to_pylist()
        keys = np.array([schema.EVENT_TYPE_CODE[x] for x in names], dtype=np.int64)
    else:
        keys = table["product_id"].to_numpy()
    version = table["version"].to_numpy().astype(np.int64)
    order = np.lexsort((-version, keys, start))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = (start[order][1:] != start[order][:-1]) | (keys[order][1:] != keys[order][:-1])
    chosen = order[first]
    columns = {"start": start[chosen], "key": keys[chosen]}
    for name in TUMBLE_COLS[2:] + HOP_COLS[2:]:
        if name == "revenue_micros":
            micros = np.round(table["revenue"].to_numpy() * 1_000_000).astype(np.int64)
            columns[name] = micros[chosen]
        elif name in table.column_names:
            columns[name] = table[name].to_numpy()[chosen]
    return columns


def _hop_starts(ts: np.ndarray) -> list[np.ndarray]:
    last = (ts // MINUTE_MS) * MINUTE_MS
    return [last - j * MINUTE_MS for j in range(5)]


def pandas_engine(ev: dict[str, Any], kind: str) -> dict[str, Any]:
    import pandas as pd

    from gpu_pipeline import schema

    if kind == "tumble":
        df = pd.DataFrame(
            {
                "start": (ev["ts"] // MINUTE_MS) * MINUTE_MS,
                "key": ev["event_type"].astype(np.int64),
                "user_id": ev["user_id"],
                "rev": ev["revenue_micros"],
            }
        )
        tumble = (
            df.groupby(["start", "key"], sort=True)
            .agg(
                events=("user_id", "size"),
                users=("user_id", "nunique"),
                revenue_micros=("rev", "sum"),
            )
            .reset_index()
        )
        return _columns(tumble, TUMBLE_COLS)
    mask = ev["has_product"]
    et = ev["event_type"][mask]
    codes = schema.EVENT_TYPE_CODE
    one = pd.DataFrame(
        {
            "key": ev["product_id"][mask],
            "user_id": ev["user_id"][mask],
            "views": (et == codes["product_view"]).astype(np.int64),
            "carts": (et == codes["add_to_cart"]).astype(np.int64),
            "purchases": (et == codes["purchase"]).astype(np.int64),
            "rev": ev["revenue_micros"][mask],
        }
    )
    frames = [one.assign(start=s) for s in _hop_starts(ev["ts"][mask])]
    hop = (
        pd.concat(frames, ignore_index=True)
        .groupby(["start", "key"], sort=True)
        .agg(
            views=("views", "sum"),
            add_to_carts=("carts", "sum"),
            purchases=("purchases", "sum"),
            revenue_micros=("rev", "sum"),
            users=("user_id", "nunique"),
        )
        .reset_index()
    )
    return _columns(hop, HOP_COLS)


def polars_engine(ev: dict[str, Any], kind: str) -> dict[str, Any]:
    import polars as pl

    from gpu_pipeline import schema

    codes = schema.EVENT_TYPE_CODE
    df = pl.DataFrame(
        {
            "ts": ev["ts"],
            "key": ev["event_type"].astype(np.int64),
            "user_id": ev["user_id"],
            "rev": ev["revenue_micros"],
            "product_id": ev["product_id"],
            "has_product": ev["has_product"],
            "et": ev["event_type"],
        }
    )
    if kind == "tumble":
        tumble = (
            df.group_by([(pl.col("ts") // MINUTE_MS * MINUTE_MS).alias("start"), "key"])
            .agg(
                pl.len().cast(pl.Int64).alias("events"),
                pl.col("user_id").n_unique().cast(pl.Int64).alias("users"),
                pl.col("rev").sum().alias("revenue_micros"),
            )
            .sort(["start", "key"])
        )
        return _columns(tumble.to_pandas(), TUMBLE_COLS)
    products = df.filter(pl.col("has_product")).with_columns(
        (pl.col("ts") // MINUTE_MS * MINUTE_MS).alias("last")
    )
    exploded = pl.concat(
        [products.with_columns((pl.col("last") - j * MINUTE_MS).alias("start")) for j in range(5)]
    )
    hop = (
        exploded.group_by(["start", pl.col("product_id").alias("key")])
        .agg(
            (pl.col("et") == codes["product_view"]).sum().cast(pl.Int64).alias("views"),
            (pl.col("et") == codes["add_to_cart"]).sum().cast(pl.Int64).alias("add_to_carts"),
            (pl.col("et") == codes["purchase"]).sum().cast(pl.Int64).alias("purchases"),
            pl.col("rev").sum().alias("revenue_micros"),
            pl.col("user_id").n_unique().cast(pl.Int64).alias("users"),
        )
        .sort(["start", "key"])
    )
    return _columns(hop.to_pandas(), HOP_COLS)


def duckdb_engine(ev: dict[str, Any], kind: str, threads: int) -> dict[str, Any]:
    import duckdb
    import pyarrow as pa

    from gpu_pipeline import schema

    codes = schema.EVENT_TYPE_CODE
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    events = pa.table(  # noqa: F841 - read by name in the SQL below
        {
            "ts": ev["ts"],
            "et": ev["event_type"].astype(np.int64),
            "user_id": ev["user_id"],
            "rev": ev["revenue_micros"],
            "product_id": ev["product_id"],
            "has_product": ev["has_product"],
        }
    )
    if kind == "tumble":
        tumble = con.execute(
            f"""SELECT ts // {MINUTE_MS} * {MINUTE_MS} AS start, et AS key, count(*) AS events,
                   count(DISTINCT user_id) AS users, sum(rev)::BIGINT AS revenue_micros
            FROM events GROUP BY ALL ORDER BY start, key"""
        ).df()
        return _columns(tumble, TUMBLE_COLS)
    hop = con.execute(
        f"""SELECT ts // {MINUTE_MS} * {MINUTE_MS} - j * {MINUTE_MS} AS start, product_id AS key,
                   count(*) FILTER (et = {codes["product_view"]}) AS views,
                   count(*) FILTER (et = {codes["add_to_cart"]}) AS add_to_carts,
                   count(*) FILTER (et = {codes["purchase"]}) AS purchases,
                   sum(rev)::BIGINT AS revenue_micros, count(DISTINCT user_id) AS users
            FROM events, range(5) AS r(j) WHERE has_product
            GROUP BY ALL ORDER BY start, key"""
    ).df()
    con.close()
    return _columns(hop, HOP_COLS)


def _columns(frame: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: frame[name].to_numpy().astype(np.int64) for name in names}


def _check(name: str, got: dict[str, Any], want: dict[str, Any], names: tuple[str, ...]) -> None:
    for column in names:
        if not np.array_equal(got[column], want[column].astype(np.int64)):
            raise SystemExit(f"{name}: column {column} differs from the operator's result")


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median wall seconds and CPU seconds (all threads of this process) of ``repeat`` runs.

    CPU time is reported too because wall time on a shared machine includes waiting.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=1_000, help="events per second of event time")
    parser.add_argument("--batch-size", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="ours,ours-1batch,pandas,polars,duckdb")
    args = parser.parse_args()
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)

    ev = make_events(args.events, args.users, args.products, args.rate, seed=42)
    engines: dict[str, Callable[[str], Any]] = {
        f"ours (batch {args.batch_size:,})": lambda k: ours(ev, k, args.threads, args.batch_size),
        "ours (1 batch)": lambda k: ours(ev, k, args.threads, args.events),
        "pandas": lambda k: pandas_engine(ev, k),
        "polars": lambda k: polars_engine(ev, k),
        "duckdb": lambda k: duckdb_engine(ev, k, args.threads),
    }
    chosen = [e for e in engines if e.split(" ")[0] + ("-1batch" if "1 batch" in e else "")
              in args.engines.split(",")]  # fmt: skip
    print(
        f"{args.events:,} events, {args.users:,} users, {args.products:,} products, "
        f"{args.threads} threads, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"median of {args.repeat} runs, seconds"
    )
    print(f"{'engine':<26}{'tumble 1m':>11}{'hop 5m/1m':>11}{'total':>9}   CPU s (tumble, hop)")
    truth: dict[str, Any] = {}
    for name in chosen:
        seconds, cpu = {}, {}
        run = engines[name]
        for kind, cols in (("tumble", TUMBLE_COLS), ("hop", HOP_COLS)):
            seconds[kind], cpu[kind], result = _time(lambda k=kind, f=run: f(k), args.repeat)
            if kind in truth:
                _check(f"{name} {kind}", result, truth[kind], cols)
            else:
                truth[kind] = result
        total = seconds["tumble"] + seconds["hop"]
        print(
            f"{name:<26}{seconds['tumble']:>11.2f}{seconds['hop']:>11.2f}{total:>9.2f}"
            f"   {cpu['tumble']:.2f}, {cpu['hop']:.2f}",
            flush=True,
        )
    if truth:
        print(
            f"results identical across engines: {len(truth['tumble']['start']):,} tumbling rows, "
            f"{len(truth['hop']['start']):,} hopping rows"
        )


if __name__ == "__main__":
    main()

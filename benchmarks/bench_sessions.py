"""Sessionization: gpu-pipeline's CPU kernels against pandas, Polars and DuckDB.

The computation (SPEC §2.5 over one partition's on-time events, in arrival order): per user,
an event starts a new session when its ts is more than the gap after the max ts of the
user's earlier events; then per session: start/end (min/max ts), event count, counts per
event type, revenue (summed in integer micro-units), landing page (page at the min ts, ties
to the earlier arrival) and exit page (page at the max ts, ties to the later arrival).

gpu-pipeline runs it through ``Sessionizer`` (``apply`` then ``close(None)``), once as one
batch and once as a stream of micro-batches with a watermark close after each.  The
dataframe engines compute the same table in one batch query; their session "id" is the
per-user session number, which is cheaper than gpu-pipeline's 64-bit hash of (user, first
ts, first event id).  Every engine's sessions are checked equal to gpu-pipeline's before a
number is printed.

Usage::

    python benchmarks/bench_sessions.py --events 10000000 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

GAP_MS = 30 * 60_000
LATENESS_MS = 60_000
DELAY_MS = 5_000
PAGES = ["/", "/search", "/product", "/cart", "/checkout", None]
COLUMNS = [
    "user_id", "session_start", "session_end", "events", "page_views", "product_views",
    "add_to_carts", "purchases", "revenue", "landing_page", "exit_page",
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=0, help="default: events / 10")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median shown)")
    parser.add_argument("--batch-size", type=int, default=1_000_000, help="streaming run")
    parser.add_argument(
        "--engines", default="ours,ours-stream,pandas,polars,duckdb", help="comma-separated"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.events <= 0 or args.threads <= 0 or args.repeat <= 0 or args.batch_size <= 0:
        parser.error("--events, --threads, --repeat and --batch-size must be positive")
    args.users = args.users or max(1, args.events // 10)
    return args


def make_events(n: int, users: int, seed: int) -> Any:
    """Arrival-ordered events over six hours, ts jittered by up to 5 s (on time under D)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, users)
    event_type = rng.integers(0, 7, n).astype(np.int8)
    base = 1_764_000_000_000 + np.sort(rng.integers(0, 6 * 3_600_000, n))
    page_codes = rng.integers(0, len(PAGES), n)
    return pa.table(
        {
            "user_id": ids[rng.integers(0, users, n)],
            "ts": (base + rng.integers(0, DELAY_MS, n)).astype(np.int64),
            "event_id": pc.cast(pa.array(np.arange(n)), pa.string()),
            "event_type": event_type,
            "revenue_micros": np.where(event_type == 6, rng.integers(1, 10**9, n), 0),
            "page": pa.array(np.array(PAGES, dtype=object)[page_codes], type=pa.string()),
        }
    )


# ---------------------------------------------------------------------- engines


def run_ours(events: Any, threads: int, batch_size: int | None) -> Any:
    """Sessionizer on the CPU build: one batch (batch_size None) or micro-batches."""
    import numpy as np

    from gpu_pipeline.backend.cpu import CpuBackend
    from gpu_pipeline.operators.sessionize import SessionConfig, Sessionizer

    backend = CpuBackend(threads=threads)
    op = Sessionizer(SessionConfig(GAP_MS, LATENESS_MS), backend, 0)
    n = events.num_rows
    step = batch_size or n
    closed = []
    max_ts = None
    for lo in range(0, n, step):
        batch = events.slice(lo, step)
        ts = batch["ts"].to_numpy()
        op.apply(
            batch["user_id"].to_numpy(),
            ts,
            backend.strings(batch["event_id"]),
            batch["event_type"].to_numpy(),
            batch["revenue_micros"].to_numpy(),
            batch["page"],
        )
        batch_max = int(np.max(ts))
        max_ts = batch_max if max_ts is None else max(max_ts, batch_max)
        if batch_size:
            closed.append(op.close(max_ts - DELAY_MS))
    closed.append(op.close(None))
    import pyarrow as pa

    return pa.concat_tables(closed)


def run_pandas(events: Any) -> Any:
    import pandas as pd

    df = events.select(["user_id", "ts", "event_type", "revenue_micros", "page"]).to_pandas()
    df = df.sort_values("user_id", kind="stable", ignore_index=True)
    same = df["user_id"].eq(df["user_id"].shift())
    previous = df.groupby("user_id", sort=False)["ts"].cummax().shift().where(same)
    df["session"] = (~same | (df["ts"] > previous + GAP_MS)).cumsum()
    types = df["event_type"]
    df["pv"], df["prv"] = types.eq(0), types.eq(1)
    df["atc"], df["pur"] = types.eq(3), types.eq(6)
    grouped = df.groupby("session", sort=False)
    out = grouped.agg(
        user_id=("user_id", "first"),
        session_start=("ts", "min"),
        session_end=("ts", "max"),
        events=("ts", "size"),
        page_views=("pv", "sum"),
        product_views=("prv", "sum"),
        add_to_carts=("atc", "sum"),
        purchases=("pur", "sum"),
        revenue=("revenue_micros", "sum"),
    )
    first = df[df["ts"].eq(grouped["ts"].transform("min"))].drop_duplicates("session")
    last = df[df["ts"].eq(grouped["ts"].transform("max"))].drop_duplicates("session", keep="last")
    out["landing_page"] = first.set_index("session")["page"]
    out["exit_page"] = last.set_index("session")["page"]
    out["revenue"] = out["revenue"] / 1e6
    return pd.DataFrame(out.reset_index(drop=True))


def run_polars(events: Any) -> Any:
    import polars as pl

    df = pl.from_arrow(events.select(["user_id", "ts", "event_type", "revenue_micros", "page"]))
    assert isinstance(df, pl.DataFrame)
    ts, kind = pl.col("ts"), pl.col("event_type")
    user_starts = pl.col("user_id") != pl.col("user_id").shift(1)
    # Rows are sorted by user, so a running max over (user rank, ts) never crosses users: one
    # global cum_max replaces a per-user window (much faster than .over on 10^6 users).
    rank_ts = pl.col("rank") * 2**42 + (ts - ts.min())
    return (
        df.lazy()
        .sort("user_id", maintain_order=True)
        .with_columns(first=user_starts.fill_null(True))
        .with_columns(rank=pl.col("first").cast(pl.Int64).cum_sum())
        .with_columns(previous=rank_ts.cum_max().shift(1) - pl.col("rank") * 2**42)
        .with_columns(new=pl.col("first") | (ts - ts.min() > pl.col("previous") + GAP_MS))
        .with_columns(session=pl.col("new").cum_sum())
        .group_by("session")
        .agg(
            pl.col("user_id").first(),
            session_start=ts.min(),
            session_end=ts.max(),
            events=pl.len(),
            page_views=(kind == 0).sum(),
            product_views=(kind == 1).sum(),
            add_to_carts=(kind == 3).sum(),
            purchases=(kind == 6).sum(),
            revenue=pl.col("revenue_micros").sum() / 1e6,
            landing_page=pl.col("page").get(ts.arg_min()),
            exit_page=pl.col("page").reverse().get(ts.reverse().arg_max()),
        )
        .collect()
    )


def run_duckdb(events: Any, threads: int) -> Any:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    t = events.select(["user_id", "ts", "event_type", "revenue_micros", "page"])
    t = t.append_column("arrival", pa.array(range(t.num_rows), type=pa.int64()))
    con.register("t", t)
    return con.sql(
        f"""
        WITH a AS (
            SELECT *, max(ts) OVER (PARTITION BY user_id ORDER BY arrival
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
            FROM t),
        b AS (
            SELECT *, sum(CASE WHEN prev IS NULL OR ts > prev + {GAP_MS} THEN 1 ELSE 0 END)
                      OVER (PARTITION BY user_id ORDER BY arrival ROWS UNBOUNDED PRECEDING) AS sn
            FROM a)
        SELECT user_id, min(ts) AS session_start, max(ts) AS session_end, count(*) AS events,
               count(*) FILTER (event_type = 0) AS page_views,
               count(*) FILTER (event_type = 1) AS product_views,
               count(*) FILTER (event_type = 3) AS add_to_carts,
               count(*) FILTER (event_type = 6) AS purchases,
               sum(revenue_micros) / 1e6 AS revenue,
               arg_min_null(page, (ts, arrival)) AS landing_page,
               arg_max_null(page, (ts, arrival)) AS exit_page
        FROM b GROUP BY user_id, sn
        """
    ).to_arrow_table()


# ---------------------------------------------------------------------- harness


def canonical(result: Any) -> Any:
    """The sessions as a pandas frame with COLUMNS, sorted, for comparison across engines."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(result, pa.RecordBatchReader):
        result = result.read_all()
    if isinstance(result, pa.Table):
        if pa.types.is_timestamp(result.schema.field("session_start").type):
            for name in ("session_start", "session_end"):
                index = result.schema.get_field_index(name)
                result = result.set_column(index, name, result[name].cast(pa.int64()))
        frame = result.to_pandas()
    elif isinstance(result, pd.DataFrame):
        frame = result
    else:
        frame = result.to_pandas()
    frame = frame[COLUMNS].astype({c: "int64" for c in COLUMNS[:8]})
    frame["revenue"] = frame["revenue"].astype("float64").round(6)
    frame = frame.astype({"landing_page": object, "exit_page": object})
    frame = frame.where(frame.notna(), None)
    return frame.sort_values(["user_id", "session_start"], ignore_index=True)


def timed_round_robin(
    engines: dict[str, Callable[[], Any]], repeat: int
) -> dict[str, tuple[float, Any]]:
    """Median seconds and last result per engine, running the engines in turn each round.

    Interleaving spreads any change in machine load over every engine alike.
    """
    times: dict[str, list[float]] = {name: [] for name in engines}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for name, run in engines.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in engines}


def main() -> None:
    args = parse_args()
    # Thread pools read their size at import: set it before any engine is imported.
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    events = make_events(args.events, args.users, args.seed)
    engines: dict[str, Callable[[], Any]] = {
        "gpu-pipeline cpu, 1 batch": lambda: run_ours(events, args.threads, None),
        f"gpu-pipeline cpu, {args.batch_size:,}-event batches": lambda: run_ours(
            events, args.threads, args.batch_size
        ),
        "pandas": lambda: run_pandas(events),
        "polars": lambda: run_polars(events),
        "duckdb": lambda: run_duckdb(events, args.threads),
    }
    wanted = {
        "ours": "gpu-pipeline cpu, 1 batch",
        "ours-stream": next(k for k in engines if "-event batches" in k),
        "pandas": "pandas",
        "polars": "polars",
        "duckdb": "duckdb",
    }
    selected = [wanted[name.strip()] for name in args.engines.split(",") if name.strip()]
    run_ours(events.slice(0, 1000), args.threads, None)  # build/load the kernels untimed
    print(
        f"sessionization: {args.events:,} events, {args.users:,} users, gap {GAP_MS // 60_000} "
        f"min, {args.threads} thread(s), median of {args.repeat}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f}, python {platform.python_version()}"
    )
    print(f"{'engine':<44} {'seconds':>9} {'Mevents/s':>10} {'sessions':>10}  same result")
    measured = timed_round_robin({name: engines[name] for name in selected}, args.repeat)
    reference = None
    for name, (seconds, result) in measured.items():
        frame = canonical(result)
        if reference is None:
            reference = frame
        same = frame.equals(reference)
        rate = args.events / seconds / 1e6
        print(f"{name:<44} {seconds:>9.3f} {rate:>10.2f} {len(frame):>10,}  {same}")


if __name__ == "__main__":
    main()

"""The clickstream job as one Polars script: the second peer of benchmarks/bench_peers.py.

    python benchmarks/peers/polars_job.py FILE FOLDER

Lines are screened (JSON objects only) and decoded with ``str.json_decode`` into the typed
fields; the same outputs as benchmarks/peers/chdb_job.sql are computed (first-arrival dedup
by event_id, 30-minute sessions, 1-minute traffic per event_type, 5/1-minute product
windows, exact distinct users) and persisted as Parquet files in FOLDER.  Prints the same
one-line JSON summary as chdb_job.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

EVENT_TYPES = [
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "checkout",
    "purchase",
]
NAMES = ("event_id", "user_id", "ts", "event_type", "page", "product_id", "price", "quantity")
FIELDS = pl.Struct(dict.fromkeys(NAMES, pl.String))
"""Decoded as text (a field of the wrong JSON type would fail the whole decode), then cast."""
MINUTE_MS = 60_000
GAP_MS = 30 * MINUTE_MS


def events(path: Path) -> pl.DataFrame:
    """Decoded, screened and deduplicated events (first arrival of each event_id)."""
    lines = pl.scan_csv(
        path,
        has_header=False,
        separator="\x01",
        quote_char=None,
        schema={"line": pl.String},
        encoding="utf8-lossy",
    ).with_row_index("pos")
    decoded = (
        lines.filter(pl.col("line").str.starts_with("{") & pl.col("line").str.ends_with("}"))
        .filter(pl.col("line").str.json_path_match("$.event_id").is_not_null())
        .with_columns(pl.col("line").str.json_decode(FIELDS).alias("e"))
        .unnest("e")
        .drop("line")
    )
    ts_text = pl.col("ts")
    as_ms = (
        pl.when(ts_text.str.contains(r"^-?[0-9]+$"))
        .then(ts_text.cast(pl.Int64, strict=False))
        .otherwise(
            ts_text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="ms", strict=False).dt.epoch(
                "ms"
            )
        )
    )
    return (
        decoded.with_columns(
            ts=as_ms,
            user_id=pl.col("user_id").cast(pl.Int64, strict=False),
            product_id=pl.col("product_id").cast(pl.Int64, strict=False),
            price=pl.col("price").cast(pl.Float64, strict=False),
            quantity=pl.col("quantity").cast(pl.Int64, strict=False).fill_null(1),
        )
        .filter(
            (pl.col("event_id").str.len_chars().is_between(1, 64))
            & pl.col("user_id").is_not_null()
            & pl.col("ts").is_not_null()
            & pl.col("event_type").is_in(EVENT_TYPES)
        )
        .unique("event_id", keep="first", maintain_order=True)
        .drop("pos")
        .collect(engine="streaming")
    )


def main() -> None:
    source, folder = Path(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    ev = events(source)
    purchase = pl.col("event_type") == "purchase"
    line_revenue = pl.when(purchase).then(pl.col("price") * pl.col("quantity")).otherwise(0.0)
    sessions = (
        ev.lazy()
        .sort("user_id", "ts")
        .with_columns(
            session=(pl.col("ts").diff().over("user_id").fill_null(0) > GAP_MS)
            .cum_sum()
            .over("user_id")
        )
        .group_by("user_id", "session")
        .agg(
            session_start=pl.col("ts").min(),
            session_end=pl.col("ts").max(),
            events=pl.len(),
            purchases=purchase.sum(),
            revenue=line_revenue.sum(),
        )
        .collect()
    )
    minute = (pl.col("ts") // MINUTE_MS) * MINUTE_MS
    traffic = (
        ev.lazy()
        .group_by(minute.alias("window_start"), "event_type")
        .agg(
            events=pl.len(),
            users=pl.col("user_id").n_unique(),
            revenue=line_revenue.sum(),
        )
        .collect()
    )
    product = (
        ev.lazy()
        .filter(pl.col("product_id").is_not_null())
        .with_columns(k=pl.lit(list(range(5))))
        .explode("k")
        .group_by((minute - pl.col("k") * MINUTE_MS).alias("window_start"), "product_id")
        .agg(
            views=(pl.col("event_type") == "product_view").sum(),
            add_to_carts=(pl.col("event_type") == "add_to_cart").sum(),
            purchases=purchase.sum(),
            revenue=line_revenue.sum(),
            users=pl.col("user_id").n_unique(),
        )
        .collect()
    )
    for name, frame in (
        ("events", ev),
        ("sessions", sessions),
        ("traffic_1m", traffic),
        ("product_5m", product),
    ):
        frame.write_parquet(folder / f"{name}.parquet")
    print(
        json.dumps(
            {
                "events": float(ev.height),
                "sessions": float(sessions.height),
                "traffic_events": float(traffic["events"].sum()),
                "traffic_users": float(traffic["users"].sum()),
                "product_rows": float(product.height),
                "product_views": float(product["views"].sum()),
                "revenue": round(float(traffic["revenue"].sum()), 2),
            }
        )
    )


if __name__ == "__main__":
    main()

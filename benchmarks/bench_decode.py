"""Decoding against the bare decode ceiling: NDJSON -> typed Arrow columns.

    python benchmarks/bench_decode.py --events 1000000 --rounds 3

The ceiling is the fastest NDJSON -> Arrow parser installable here that reads this data:
Polars' ``read_ndjson`` with the SPEC §1 schema (pyarrow's JSON reader refuses a column
whose values are strings in some records and numbers in others, as ``ts`` is).  It parses
without the contract's rules, and it cannot read a file with corrupt records at all, so
every contender reads a *screened* copy of the generated file: only the records the
validator accepts.  Contenders: the native decoder (``kernels/decode.cu``) and the Arrow
decoder, both as the pipeline runs them (the file source's batches, all validation
included), and Polars.  Same file, same machine, every core; interleaved rounds; median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402

from gpu_pipeline.decode.json import ArrowJsonDecoder  # noqa: E402
from gpu_pipeline.decode.native import NativeJsonDecoder  # noqa: E402
from gpu_pipeline.sources.files import FileSource  # noqa: E402
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks  # noqa: E402


def screened_copy(folder: Path, events: int, seed: int) -> tuple[Path, int]:
    """The generated stream without the records the validator rejects."""
    lines = b"".join(generate_ndjson_chunks(events, seed)).split(b"\n")[:-1]
    path = folder / "all.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    dead: set[int] = set()
    decoder = NativeJsonDecoder()
    for batch in FileSource(str(path)).batches(100_000, {}):
        dead.update(decoder.decode(batch).dead["offset"].to_pylist())
    keep = [line for i, line in enumerate(lines) if i not in dead]
    out = folder / "screened.ndjson"
    out.write_bytes(b"\n".join(keep) + b"\n")
    return out, len(keep)


def pipeline_decoder(decoder: Any, path: Path) -> int:
    rows = 0
    for batch in FileSource(str(path)).batches(100_000, {}):
        rows += decoder.decode(batch).events.num_rows
    return rows


def polars_ceiling(path: Path) -> int:
    import polars as pl

    schema = {
        "event_id": pl.String,
        "user_id": pl.Int64,
        "ts": pl.String,
        "event_type": pl.String,
        "page": pl.String,
        "product_id": pl.Int64,
        "category": pl.String,
        "price": pl.Float64,
        "quantity": pl.Int64,
        "country": pl.String,
        "device": pl.String,
        "referrer": pl.String,
    }
    return pl.read_ndjson(path, schema=schema).height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        path, records = screened_copy(Path(tmp), args.events, args.seed)
        size = path.stat().st_size
        native, arrow = NativeJsonDecoder(), ArrowJsonDecoder()
        contenders = {
            "native decoder (kernels/decode.cu)": lambda: pipeline_decoder(native, path),
            "Arrow decoder (pyarrow + rules)": lambda: pipeline_decoder(arrow, path),
            "Polars read_ndjson (ceiling, no rules)": lambda: polars_ceiling(path),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for number in range(args.rounds):
            order = list(contenders)[number % 3 :] + list(contenders)[: number % 3]
            for name in order:
                start = time.perf_counter()
                rows = contenders[name]()
                times[name].append(time.perf_counter() - start)
                if rows != records:
                    raise SystemExit(f"{name} decoded {rows:,} rows of {records:,}")
    ceiling = statistics.median(times["Polars read_ndjson (ceiling, no rules)"])
    print(f"{records:,} valid records, {size / 1e6:,.0f} MB, median of {args.rounds}")
    print(f"{'contender':42} {'s':>7} {'MB/s':>8} {'of ceiling':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:42} {median:7.3f} {size / 1e6 / median:8.0f} {ceiling / median:10.0%}")
    print()
    print(machine.markdown())


if __name__ == "__main__":
    main()

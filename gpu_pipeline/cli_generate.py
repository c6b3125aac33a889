"""``gpu-pipeline generate``: the synthetic clickstream to a file or a Kafka topic."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gpu_pipeline.config import non_negative_int, positive_int, redact


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def generate(args: argparse.Namespace, console: Console) -> int:
    """Write ``--events`` records of seed ``--seed`` to ``--out``."""
    events = non_negative_int("events", args.events)
    seed = non_negative_int("seed", args.seed)
    out: str = args.out
    err = Console(stderr=True)
    start = time.perf_counter()
    if out.startswith("kafka://"):
        from gpu_pipeline.sources.kafka_producer import produce_synthetic

        rate = positive_int("rate", args.rate) if args.rate is not None else None
        partitions = positive_int("partitions", args.partitions) if args.partitions else None
        with _progress(err) as bar:
            task = bar.add_task("generate", total=events)
            produce_synthetic(
                out,
                events,
                seed,
                rate=rate,
                partitions=partitions,
                progress=lambda n: bar.update(task, completed=n),
            )
    elif args.partitions or out.endswith("/"):
        from gpu_pipeline.sources.synthetic import write_ndjson_partitions

        partitions = positive_int("partitions", args.partitions or 1)
        with _progress(err) as bar:
            task = bar.add_task("generate", total=events)
            write_ndjson_partitions(
                out, partitions, events, seed, progress=lambda n: bar.update(task, completed=n)
            )
    elif out.endswith(".parquet"):
        import pyarrow.parquet as pq

        from gpu_pipeline.sources.synthetic import generate_arrow

        writer = None
        written = 0
        with _progress(err) as bar:
            task = bar.add_task("generate", total=events)
            for batch in generate_arrow(events, seed):
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema)
                writer.write_batch(batch)
                written += batch.num_rows
                bar.update(task, completed=written)
        if writer is not None:
            writer.close()
    else:
        from gpu_pipeline.sources.synthetic import write_ndjson

        with _progress(err) as bar:
            task = bar.add_task("generate", total=events)
            write_ndjson(out, events, seed, progress=lambda n: bar.update(task, completed=n))
    elapsed = time.perf_counter() - start
    rate_text = f"{events / elapsed:,.0f} records/s" if elapsed > 0 else ""
    err.print(
        f"wrote {events:,} records (seed {seed}) to {redact(out)} in {elapsed:.2f} s ({rate_text})"
    )
    return 0

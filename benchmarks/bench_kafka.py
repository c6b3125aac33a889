"""Kafka throughput: producing the synthetic stream, and consuming it into RawBatches.

Runs against the real broker (deploy/kafka): ``--bootstrap HOST:PORT`` or
``$KAFKA_BOOTSTRAP``, else a broker is started on a free port for the run and stopped
after.  The broker shares the machine's cores with the benchmark, as in production on
one box.

Measured, each on a fresh topic:

* **generate**: the synthetic NDJSON alone (no Kafka), the producer's upper bound;
* **produce**: ``produce_synthetic`` (generation, ``user_id`` keys, one event per message);
* **consume**: ``KafkaSource`` in a fresh consumer group until idle, timed from the first
  batch to the last (the group join and the final idle wait are reported apart);
* **consume+decode** (``--decode``): the same, each batch also decoded by the CPU decoder;
* with ``--ndjson-per-message K``, the consume runs also on a topic holding K events per
  message, which shows the per-message cost of the client.

Usage::

    python benchmarks/bench_kafka.py --events 1000000 --partitions 4 --decode
    python benchmarks/bench_kafka.py --tiny          # a smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from gpu_pipeline.sources.kafka import KafkaSource  # noqa: E402
from gpu_pipeline.sources.kafka_producer import ensure_topic, produce_synthetic  # noqa: E402
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks  # noqa: E402
from gpu_pipeline.state.journal import BatchJournal  # noqa: E402

KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=100_000, help="max records per batch")
    parser.add_argument("--repeat", type=int, default=3, help="consume runs (median shown)")
    parser.add_argument("--decode", action="store_true", help="also time consume + CPU decode")
    parser.add_argument("--ndjson-per-message", type=int, default=0, metavar="K")
    parser.add_argument("--tiny", action="store_true", help="20k events, one run (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.events, args.repeat = 20_000, 1
    if min(args.events, args.partitions, args.batch_size, args.repeat) <= 0:
        parser.error("--events, --partitions, --batch-size and --repeat must be positive")
    return args


class Broker:
    """The broker to use: the one given, or one started here and stopped on exit."""

    def __init__(self, bootstrap: str) -> None:
        self.port: int | None = None
        if bootstrap:
            self.bootstrap = bootstrap
            return
        for _ in range(100):
            port = random.randrange(20000, 30000)
            if _free(port) and _free(port + 1):
                break
        else:
            raise SystemExit("no free port pair for a broker")
        started = time.perf_counter()
        out = subprocess.run(
            ["bash", str(KAFKA_SH), "start", str(port)], capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"could not start a broker:\n{out.stderr[-3000:]}")
        self.port = port
        self.bootstrap = out.stdout.strip().splitlines()[-1]
        print(f"started a broker on {self.bootstrap} in {time.perf_counter() - started:.1f} s")

    def close(self) -> None:
        if self.port is not None:
            subprocess.run(["bash", str(KAFKA_SH), "stop", str(self.port)], capture_output=True)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def time_generate(events: int, seed: int) -> float:
    started = time.perf_counter()
    for _ in generate_ndjson_chunks(events, seed):
        pass
    return time.perf_counter() - started


def produce_ndjson_messages(bootstrap: str, topic: str, args: argparse.Namespace) -> float:
    """The same stream with K events per message (no keys: a batch spans users)."""
    from confluent_kafka import Producer

    ensure_topic(bootstrap, topic, args.partitions)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
         "message.max.bytes": 10 << 20}
    )  # fmt: skip
    k = args.ndjson_per_message
    started = time.perf_counter()
    sent = 0
    for chunk in generate_ndjson_chunks(args.events, args.seed, k * 64):
        lines = chunk.split(b"\n")[:-1]
        for at in range(0, len(lines), k):
            producer.produce(
                topic, b"\n".join(lines[at : at + k]) + b"\n", partition=sent % args.partitions
            )
            sent += 1
            producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - started


def consume(bootstrap: str, topic: str, args: argparse.Namespace, decode: bool) -> dict[str, float]:
    """One fresh consumer group reading the topic to its end."""
    decoder: Any = None
    if decode:
        from gpu_pipeline.decode.json import ArrowJsonDecoder

        decoder = ArrowJsonDecoder()
    with tempfile.TemporaryDirectory() as journal_dir:
        source = KafkaSource(
            bootstrap, topic, f"bench-{uuid.uuid4().hex[:8]}",
            journal=BatchJournal(journal_dir), resume=lambda p: None, on_revoke=None,
            max_bytes=64 << 20, max_wait_ms=500, until_idle=True, idle_timeout_ms=500,
        )  # fmt: skip
        records = batches = size = 0
        started = time.perf_counter()
        first = last = started
        for batch in source.batches(args.batch_size, {}):
            if not batches:
                first = time.perf_counter()
            if decoder is not None:
                decoder.decode(batch)
            records += len(batch)
            size += len(batch.buffer)
            batches += 1
            last = time.perf_counter()
        ended = time.perf_counter()
        source.close()
    busy = max(last - first, 1e-9)
    return {
        "records": records,
        "batches": batches,
        "first_batch_s": first - started,
        "steady_s": busy,
        "idle_wait_s": ended - last,
        "records_per_s": records / busy,
        "mb_per_s": size / busy / 1e6,
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda r: r["records_per_s"])[len(runs) // 2]


def main() -> None:
    args = parse_args()
    broker = Broker(args.bootstrap)
    results: dict[str, Any] = {
        "machine": describe(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        results["generate_s"] = time_generate(args.events, args.seed)
        started = time.perf_counter()
        produced = produce_synthetic(
            f"kafka://{broker.bootstrap}/{topic}",
            args.events,
            args.seed,
            partitions=args.partitions,
        )
        results["produce_s"] = time.perf_counter() - started
        runs = {
            "consume": [consume(broker.bootstrap, topic, args, False) for _ in range(args.repeat)]
        }
        if args.decode:
            runs["consume+decode"] = [
                consume(broker.bootstrap, topic, args, True) for _ in range(args.repeat)
            ]
        if args.ndjson_per_message:
            ndjson_topic = f"bench-ndjson-{uuid.uuid4().hex[:8]}"
            results["produce_ndjson_s"] = produce_ndjson_messages(
                broker.bootstrap, ndjson_topic, args
            )
            runs[f"consume ({args.ndjson_per_message} events/message)"] = [
                consume(broker.bootstrap, ndjson_topic, args, False) for _ in range(args.repeat)
            ]
        results["runs"] = runs
    finally:
        broker.close()

    print("\n".join(f"- {k}: {v}" for k, v in results["machine"].items()))
    print(f"\nevents {args.events:,}, partitions {args.partitions}, batch size {args.batch_size:,}")
    print(f"generate only             {args.events / results['generate_s']:>12,.0f} events/s")
    print(f"produce (one per message) {produced / results['produce_s']:>12,.0f} events/s")
    if "produce_ndjson_s" in results:
        print(f"produce ({args.ndjson_per_message}/message)       "
              f"{args.events / results['produce_ndjson_s']:>12,.0f} events/s")  # fmt: skip
    for name, group in runs.items():
        best = median_run(group)
        print(
            f"{name:<26}{best['records_per_s']:>12,.0f} events/s  {best['mb_per_s']:6.1f} MB/s  "
            f"{best['batches']:.0f} batches; join {best['first_batch_s']:.2f} s, "
            f"idle wait {best['idle_wait_s']:.2f} s (median of {len(group)})"
        )
        assert best["records"] == args.events, f"{name} read {best['records']} of {args.events}"
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

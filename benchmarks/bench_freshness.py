"""Freshness: how long from a produce to the event being visible in ClickHouse's ``events``.

A producer thread sends events at a steady rate whose ``ts`` is the wall clock at produce
time; the pipeline consumes the topic in this process and, when each micro-batch's rows are
written to the sink, records ``now - ts`` for every event row written.  Prints p50/p90/p99
and the sustained throughput.  Needs a broker (``make kafka-start`` or ``--bootstrap``).

    python benchmarks/bench_freshness.py --bootstrap 127.0.0.1:9092 --rate 50000 --seconds 30
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
from confluent_kafka import Producer

from gpu_pipeline.config import RunConfig
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.sources.kafka_producer import ensure_topic

TYPES = ("page_view", "product_view", "search", "add_to_cart")


def produce_steadily(
    bootstrap: str, topic: str, rate: int, seconds: float, done: threading.Event
) -> int:
    """Send ``rate`` events/s for ``seconds``, ts = send time; return how many were sent."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 1_000_000}
    )
    sent = 0
    start = time.time()
    tick = 0.01
    while (now := time.time()) - start < seconds:
        due = int((now - start) * rate)
        for _ in range(due - sent):
            user = sent % 50_000
            event = {
                "event_id": f"f-{sent}",
                "user_id": user,
                "ts": int(time.time() * 1000),
                "event_type": TYPES[sent % 4],
                "product_id": sent % 1000,
                "price": 9.5,
                "page": "/p",
            }
            producer.produce(topic, orjson.dumps(event), key=str(user).encode())
            sent += 1
        producer.poll(0)
        time.sleep(tick)
    producer.flush()
    done.set()
    return sent


class MeasuredPipeline(Pipeline):
    """A pipeline that records, per written event row, the delay since it was produced."""

    lags_ms: list[np.ndarray]

    def _write(self, partition, output, token_base):  # type: ignore[no-untyped-def]
        counts = super()._write(partition, output, token_base)
        events: pa.Table | None = output.tables.get("events")
        if events is not None and events.num_rows:
            now = int(time.time() * 1000)
            ts = events["ts"].combine_chunks().view(pa.int64()).to_numpy()
            self.lags_ms.append(now - ts)
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--max-batch-wait", default="200ms")
    args = parser.parse_args()
    topic = f"fresh-{uuid.uuid4().hex[:8]}"
    ensure_topic(args.bootstrap, topic, args.partitions)
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(
            RunConfig(),
            source=f"kafka://{args.bootstrap}/{topic}",
            sink=f"chdb://{Path(tmp) / 'ch'}",
            checkpoint_dir=str(Path(tmp) / "ckpt"),
            engine="cpu",
            batch_size=args.batch_size,
            until_idle=True,
            idle_timeout_ms=3000,
            progress="never",
            max_batch_wait_ms=int(args.max_batch_wait.rstrip("ms")),
            group_id=topic,
        )
        pipeline = MeasuredPipeline(config)
        pipeline.lags_ms = []
        done = threading.Event()
        result: dict[str, int] = {}
        producer = threading.Thread(
            target=lambda: result.update(
                sent=produce_steadily(args.bootstrap, topic, args.rate, args.seconds, done)
            )
        )
        start = time.time()
        producer.start()
        pipeline.run()
        producer.join()
        pipeline.close()
        elapsed = time.time() - start - 3.0  # minus the idle timeout at the end
    lags = np.concatenate(pipeline.lags_ms) if pipeline.lags_ms else np.zeros(0)
    p50, p90, p99 = (
        (np.percentile(lags, q) / 1000 for q in (50, 90, 99)) if lags.size else (0, 0, 0)
    )
    print("| offered rate | sent | events written | sustained events/s | p50 s | p90 s | p99 s |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.rate:,}/s | {result.get('sent', 0):,} | {lags.size:,} "
        f"| {lags.size / elapsed:,.0f} | {p50:.2f} | {p90:.2f} | {p99:.2f} |"
    )


if __name__ == "__main__":
    main()

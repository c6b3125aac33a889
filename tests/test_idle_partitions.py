"""The opt-in idle-partition policy: a quiet partition's windows still close.

Events sit in the first seconds of one minute window, ten minutes in the past, so their own
watermark never reaches the window's end.  With the policy off, a streaming run writes the
events but no window row; with it on, the idle partition's watermark follows the wall clock
and the window rows are written while the run is still streaming.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from gpu_pipeline.config import RunConfig
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.sinks.base import open_sink
from tests.kafka_broker import create_topic

pytestmark = pytest.mark.kafka
MINUTE_MS = 60_000


def _produce(bootstrap: str, topic: str, partitions: int) -> int:
    base = (int(time.time() * 1000) - 10 * MINUTE_MS) // MINUTE_MS * MINUTE_MS + 1000
    producer = Producer({"bootstrap.servers": bootstrap})
    count = 0
    for partition in range(partitions):
        for i in range(5):
            event = {
                "event_id": f"{partition}-{i}",
                "user_id": 10 + partition,
                "ts": base + i * 100,
                "event_type": "page_view",
                "page": "/",
            }
            producer.produce(topic, orjson.dumps(event), partition=partition)
            count += 1
    producer.flush()
    return count


def _stream_for(config: RunConfig, seconds: float) -> dict[str, int]:
    """Run a streaming pipeline for ``seconds`` (or until it wrote window rows), then stop it."""
    pipeline = Pipeline(config)
    thread = threading.Thread(target=pipeline.run)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not pipeline.metrics.counters.get("window_rows"):
        time.sleep(0.2)
    pipeline.request_stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
    counters = dict(pipeline.metrics.counters)
    pipeline.close()
    return counters


@pytest.mark.parametrize("policy_ms", [0, 1000])
def test_idle_partition_policy(kafka_bootstrap: str, tmp_path: Path, policy_ms: int) -> None:
    topic = f"idle-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, 2)
    produced = _produce(kafka_bootstrap, topic, 2)
    config = replace(
        RunConfig(),
        source=f"kafka://{kafka_bootstrap}/{topic}",
        sink=f"chdb://{tmp_path / 'ch'}",
        checkpoint_dir=str(tmp_path / "ckpt"),
        engine="cpu",
        group_id=topic,
        progress="always",  # also exercises the per-partition progress line (lag, watermark)
        max_batch_wait_ms=100,
        idle_partition_timeout_ms=policy_ms,
    )
    counters = _stream_for(config, seconds=20 if policy_ms else 8)
    sink = open_sink(config.sink, config.database)
    try:
        events = sink.query("SELECT count() AS n FROM clickstream.events")["n"][0].as_py()
        windows = sink.query(
            "SELECT partition, sum(events) AS n "
            "FROM clickstream.traffic_1m FINAL GROUP BY partition"
        ).to_pylist()
    finally:
        sink.close()
    assert events == produced
    if policy_ms:
        assert counters["window_rows"] > 0
        assert sorted((w["partition"], w["n"]) for w in windows) == [(0, 5), (1, 5)]
    else:
        assert windows == []

"""``--metrics-port``: the run's figures as Prometheus metrics, served while ``run`` works.

The run loop owns every figure; this module only reads them when Prometheus scrapes (a
custom collector, so nothing is counted twice) and keeps the two histograms the loop
observes.  Names follow the Prometheus conventions: ``gpu_pipeline_`` prefix, ``_total`` on
counters, base units (seconds, rows) in the name.  Counters are the job's totals, restored
from its checkpoints, so they equal the run summary; they start from the checkpointed
values when a process restarts, never from zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpu_pipeline.errors import ConfigError

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class RunFigures:
    """What the run loop exposes (updated on its thread, read on the scrape thread)."""

    counters: Callable[[], dict[str, int]]
    dead_letter_fields: dict[str, int] = field(default_factory=dict)
    rows_written: dict[str, int] = field(default_factory=dict)
    insert_retries: Callable[[], int] = lambda: 0
    lags: dict[int, int] = field(default_factory=dict)
    watermarks_ms: dict[int, int] = field(default_factory=dict)


class _Collector(Collector):
    def __init__(self, figures: RunFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        c = dict(f.counters())
        simple = [
            ("records", "records read from the source", "records"),
            ("events", "valid events the event-time guard let through", "events"),
            ("duplicates", "events dropped as duplicates", "duplicates"),
            ("late_events", "events too late to count (late_events table)", "late"),
            ("on_time_events", "on-time events (events table)", "on_time"),
            ("future_ts", "valid records the event-time guard set apart", "future_ts"),
            ("batches", "micro-batches processed", "batches"),
        ]
        for name, text, key in simple:
            yield CounterMetricFamily(f"gpu_pipeline_{name}", text, value=c.get(key, 0))
        dead = CounterMetricFamily(
            "gpu_pipeline_dead_letters",
            "dead letters by the field their error names",
            labels=["field"],
        )
        for name, value in sorted(dict(f.dead_letter_fields).items()):
            dead.add_metric([name], value)
        yield dead
        rows = CounterMetricFamily(
            "gpu_pipeline_rows_written", "rows inserted into ClickHouse by table", labels=["table"]
        )
        for name, value in sorted(dict(f.rows_written).items()):
            rows.add_metric([name], value)
        yield rows
        yield CounterMetricFamily(
            "gpu_pipeline_insert_retries",
            "ClickHouse calls retried after a transient error in this process's run",
            value=f.insert_retries(),
        )
        lag = GaugeMetricFamily(
            "gpu_pipeline_consumer_lag_records",
            "Kafka: messages behind the partition's end",
            labels=["partition"],
        )
        for partition, value in sorted(dict(f.lags).items()):
            lag.add_metric([str(partition)], value)
        yield lag
        delay = GaugeMetricFamily(
            "gpu_pipeline_watermark_delay_seconds",
            "wall clock minus the partition's watermark",
            labels=["partition"],
        )
        now_ms = time.time() * 1000
        for partition, mark in sorted(dict(f.watermarks_ms).items()):
            delay.add_metric([str(partition)], (now_ms - mark) / 1000)
        yield delay


class MetricsServer:
    """The HTTP endpoint and the histograms of one run."""

    def __init__(self, figures: RunFigures, port: int, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(figures))
        self.batch_latency = Histogram(
            "gpu_pipeline_batch_latency_seconds",
            "time to process one micro-batch (operators, decoding excluded when prefetched)",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.checkpoint_duration = Histogram(
            "gpu_pipeline_checkpoint_duration_seconds",
            "time a checkpoint takes: cutting it (rows, state), then writing it (inserts, state)",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        try:
            self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError("metrics_port", f"cannot listen on port {port}: {exc}") from None
        self.port = int(self._server.server_port)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def describe(server: Any) -> str:
    """Where to scrape, for the console."""
    return f"metrics: http://127.0.0.1:{server.port}/metrics"

"""``--metrics-port``: Prometheus metrics of a real run (file source, real embedded ClickHouse).

The endpoint is scraped over HTTP and parsed with prometheus-client's own parser: names,
types and values must match the run's summary counters and the rows in ClickHouse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.config import RunConfig, load_config
from gpu_pipeline.errors import ConfigError
from gpu_pipeline.runtime.pipeline import Pipeline
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks
from tests.pipeline_runs import REPO_ROOT, read_tables


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> dict[str, tuple[str, Samples]]:
    """family name -> (type, [(sample name, labels, value)])."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        family.name: (family.type, [(s.name, dict(s.labels), s.value) for s in family.samples])
        for family in text_string_to_metric_families(text)
    }


def value(families: dict[str, tuple[str, Samples]], name: str, **labels: str) -> float:
    """A counter's ``_total``, a histogram's ``_count`` or a gauge's value."""
    kind, samples = families[name]
    wanted = {"counter": f"{name}_total", "histogram": f"{name}_count"}.get(kind, name)
    for sample_name, sample_labels, sample_value in samples:
        if sample_name == wanted and all(sample_labels.get(k) == v for k, v in labels.items()):
            return sample_value
    raise KeyError((name, labels))


def test_the_endpoint_matches_the_run(
    tmp_path: Path, cpu_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_pipeline.sinks import clickhouse

    monkeypatch.setattr(clickhouse, "RETRIES", 7)  # retries of earlier runs in this process
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(generate_ndjson_chunks(6000, 4)))
    port = free_port()
    config = dataclasses.replace(
        RunConfig(),
        source=f"file:{data}",
        sink=f"chdb://{tmp_path / 'ch'}",
        checkpoint_dir=str(tmp_path / "ckpt"),
        batch_size=1000,
        checkpoint_interval_ms=0,
        progress="never",
        metrics_port=port,
    )
    pipeline = Pipeline(config, backend=cpu_backend)
    try:
        result = pipeline.run()
        families = scrape(port)
    finally:
        pipeline.close()
    c = result.metrics.counters
    assert families["gpu_pipeline_records"][0] == "counter"
    assert value(families, "gpu_pipeline_records") == c["records"] == 6000
    assert value(families, "gpu_pipeline_duplicates") == c["duplicates"] > 0
    assert value(families, "gpu_pipeline_late_events") == c["late"] > 0
    assert value(families, "gpu_pipeline_on_time_events") == c["on_time"]
    assert value(families, "gpu_pipeline_batches") == 6
    dead = sum(v for n, _, v in families["gpu_pipeline_dead_letters"][1] if n.endswith("_total"))
    assert dead == c["dead_letters"] > 0
    fields = {labels["field"] for _, labels, _ in families["gpu_pipeline_dead_letters"][1]}
    assert len(fields) >= 2, fields
    tables = read_tables(tmp_path / "ch", "clickstream")
    for table in ("events", "late_events", "dead_letters", "sessions"):
        assert value(families, "gpu_pipeline_rows_written", table=table) == tables[table].num_rows
    assert families["gpu_pipeline_batch_latency_seconds"][0] == "histogram"
    assert value(families, "gpu_pipeline_batch_latency_seconds") == 6  # _count
    assert value(families, "gpu_pipeline_checkpoint_duration_seconds") >= 6
    assert families["gpu_pipeline_watermark_delay_seconds"][0] == "gauge"
    assert value(families, "gpu_pipeline_insert_retries") == 0


def test_a_cli_run_serves_metrics_while_it_works(tmp_path: Path) -> None:
    data = tmp_path / "in.ndjson"
    data.write_bytes(b"".join(generate_ndjson_chunks(60_000, 5)))
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "gpu_pipeline.cli", "run", "--source", f"file:{data}",
         "--sink", f"chdb://{tmp_path / 'ch'}", "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--engine", "cpu", "--progress", "never", "--batch-size", "500",
         "--metrics-port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen = []
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                seen.append(value(scrape(port), "gpu_pipeline_records"))
            time.sleep(0.2)
    finally:
        _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    assert f"metrics: http://127.0.0.1:{port}/metrics" in err.decode()
    assert any(0 < v < 60_000 for v in seen), f"no scrape during the run: {seen[-5:]}"
    assert seen == sorted(seen), "a counter went down"


def test_a_bad_port_names_the_option() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"metrics_port": "70000"})
    assert caught.value.option == "metrics_port"

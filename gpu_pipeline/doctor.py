"""``gpu-pipeline doctor``: what is usable here, each with a hint to fix what is not."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    optional: bool = False


def _timed(fn: Callable[[], str]) -> tuple[bool, str]:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return True, f"{detail} ({time.perf_counter() - start:.2f} s)"


def check_gpu() -> Check:
    from gpu_pipeline.backend.gpu import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        return Check(
            "GPU + CUDA driver",
            False,
            reason,
            "run on a machine with an NVIDIA GPU and driver (docker: --gpus all); "
            "the CPU engine works meanwhile",
            optional=True,
        )
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    driver = cupy.cuda.runtime.driverGetVersion()
    return Check("GPU + CUDA driver", True, f"{props['name']!s}, driver {driver}")


def check_cudf() -> Check:
    from gpu_pipeline.backend.gpu import cudf_unavailable_reason

    reason = cudf_unavailable_reason()
    return Check(
        "cuDF",
        reason is None,
        reason or "importable",
        "pip install gpu-pipeline[gpu] (cudf-cu12) on a GPU machine; without it the GPU "
        "engine decodes with pyarrow and moves columns to the device",
        optional=True,
    )


def check_cupy() -> Check:
    def probe() -> str:
        import cupy

        return f"cupy {cupy.__version__}"

    ok, detail = _timed(probe)
    return Check("CuPy", ok, detail, "pip install cupy-cuda12x", optional=True)


def check_cpu_kernels() -> Check:
    def probe() -> str:
        from gpu_pipeline.backend.kernels import load_cpu

        lib = load_cpu("release")
        return f"{len(lib.names)} kernels built with C++/OpenMP"

    ok, detail = _timed(probe)
    return Check(
        "kernels: CPU target", ok, detail, "install a C++ compiler with OpenMP: apt-get install g++"
    )


def check_nvrtc() -> Check:
    def probe() -> str:
        from gpu_pipeline.backend.kernels import compile_with_nvrtc

        ptx = compile_with_nvrtc("sm_90")
        return f"NVRTC compiled every kernel for sm_90 ({len(ptx):,} bytes of PTX)"

    ok, detail = _timed(probe)
    return Check(
        "kernels: GPU target (NVRTC)",
        ok,
        detail,
        "pip install cuda-bindings nvidia-cuda-nvrtc-cu12",
        optional=True,
    )


def check_kafka(target: str) -> Check:
    """``target`` is a bootstrap ``HOST:PORT`` (plaintext) or a ``kafka://`` source URL, whose
    security properties and environment secrets are used exactly as ``run`` uses them."""
    bootstrap, topic, properties = target, "", {}
    if target.startswith("kafka://"):
        from gpu_pipeline.sources.kafka import client_properties, parse_kafka_url

        bootstrap, topic, url_properties = parse_kafka_url(target, "kafka")
        properties = client_properties(url_properties, "kafka")

    def probe() -> str:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {**properties, "bootstrap.servers": bootstrap, "socket.timeout.ms": 3000}
        )
        metadata = admin.list_topics(timeout=3)
        found = f"{bootstrap}: {len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s)"
        if topic and topic not in metadata.topics:
            raise RuntimeError(f"{found}, but no topic {topic!r}")
        return found + (f", topic {topic!r} present" if topic else "")

    ok, detail = _timed(probe)
    return Check(
        "Kafka",
        ok,
        detail,
        f"start a broker (make kafka-start) or pass --kafka HOST:PORT; tried {bootstrap}",
        optional=True,
    )


def check_clickhouse(sink_url: str, database: str) -> Check:
    def probe() -> str:
        from gpu_pipeline.sinks.base import open_sink

        sink = open_sink(sink_url, database, create_schema=False)
        try:
            version = sink.query("SELECT version() AS v")["v"][0].as_py()
            return f"{sink.describe()}: ClickHouse {version}"
        finally:
            sink.close()

    ok, detail = _timed(probe)
    return Check(
        "ClickHouse sink",
        ok,
        detail,
        "pip install chdb (embedded) or pass --sink http://USER:PASS@HOST:8123",
    )


def run_doctor(sink_url: str, database: str, kafka: str, console: Console | None = None) -> int:
    """Print the report; exit status 1 when a required check fails."""
    console = console or Console()
    checks = [
        check_cpu_kernels(),
        check_nvrtc(),
        check_cupy(),
        check_gpu(),
        check_cudf(),
        check_clickhouse(sink_url, database),
        check_kafka(kafka),
    ]
    table = Table(title="gpu-pipeline doctor", show_header=True, header_style="bold")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        status = (
            "[green]ok"
            if check.ok
            else ("[yellow]unavailable" if check.optional else "[red]FAILED")
        )
        table.add_row(check.name, status, check.detail, "" if check.ok else check.fix)
    console.print(table)
    engine = "gpu" if checks[3].ok else "cpu"
    console.print(f"--engine auto would use: [bold]{engine}[/bold]")
    return 0 if all(c.ok or c.optional for c in checks) else 1

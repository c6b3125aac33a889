"""A description of the machine for every benchmark report (CPU, GPU, driver, versions)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_description() -> str:
    """The GPU and driver, or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none (no nvidia-smi / no GPU)"


def tree_rss(process: Any) -> int:
    """Resident bytes of a ``psutil.Process`` and all its descendants (0 once it is gone)."""
    import psutil

    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def describe() -> dict[str, str]:
    """Machine facts recorded with every number."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores available)",
        "memory": f"{memory_gib:.1f} GiB",
        "gpu": gpu_description(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(
            f"{p} {_version(p)}"
            for p in (
                "numpy",
                "pyarrow",
                "chdb",
                "clickhouse-connect",
                "pandas",
                "polars",
                "duckdb",
                "cupy-cuda12x",
            )
        ),
    }


def markdown() -> str:
    """The machine as a Markdown bullet list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in describe().items())

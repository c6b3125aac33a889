"""The GPU check: CPU/GPU parity and device timings, for a machine with CuPy and a GPU but
no cuDF, no ClickHouse and no network (see benchmarks/gpu_check.sh, which runs the GPU
tests first).

    python benchmarks/gpu_check.py --events 2000000 --out gpu_check.json

1. Decode kernel on the device: the batch's bytes copied once, ``decode_records`` run there,
   every output compared with the CPU target's; bytes/s against the measured host->device
   and device->device copy bandwidth.
2. The whole operator pipeline (decode -> guard -> watermark -> dedup -> lateness ->
   sessions -> windows -> quality) on the GPU engine and on the CPU engine, batch by batch:
   every output table compared row for row; seconds per operator on each engine.

Exits 1 when anything differs.  Without a usable GPU it says why and exits 2;
``--self-test`` runs every step with the CPU engine on both sides (no timings), so the
script itself is checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_pipeline import schema  # noqa: E402
from gpu_pipeline.backend.cpu import CpuBackend  # noqa: E402
from gpu_pipeline.backend.gpu import GpuBackend, gpu_unavailable_reason  # noqa: E402
from gpu_pipeline.decode.native import NativeJsonDecoder, kernel_outputs  # noqa: E402
from gpu_pipeline.runtime.partition import PartitionProcessor  # noqa: E402
from gpu_pipeline.semantics import Semantics  # noqa: E402
from gpu_pipeline.sources.base import RawBatch  # noqa: E402
from gpu_pipeline.sources.synthetic import generate_ndjson_chunks  # noqa: E402

OUTPUTS = ("ok", "nums", "price", "spans", "codes", "has")


def batches(events: int, batch_size: int, seed: int) -> list[RawBatch]:
    data = b"".join(generate_ndjson_chunks(events, seed))
    lines = data.split(b"\n")[:-1]
    return [
        RawBatch.from_lines(0, lines[start : start + batch_size], first_offset=start)
        for start in range(0, len(lines), batch_size)
    ]


def decode_outputs(backend: Any, raw: RawBatch, buf: Any) -> dict[str, Any]:
    out = kernel_outputs(backend.xp, len(raw))
    starts, ends = backend.asarray(raw.starts), backend.asarray(raw.ends)
    backend.kernels.decode_records(len(raw), buf, starts, ends, *out.values())
    return out


def differing_outputs(expected: dict[str, Any], got: dict[str, np.ndarray], n: int) -> list[str]:
    """The outputs that differ, compared where they are defined (the accepted records)."""
    ok = expected["ok"].astype(bool)
    names = []
    for name in OUTPUTS:
        want, have = expected[name], got[name]
        if name != "ok":
            rows = np.repeat(ok, want.shape[0] // n)
            want, have = want[rows], have[rows]
        if not np.array_equal(want, have):
            names.append(name)
    return names


def check_decode(cpu: CpuBackend, gpu: Any, raws: list[RawBatch]) -> dict[str, Any]:
    total_bytes = sum(len(r.buffer) for r in raws)
    if isinstance(gpu, CpuBackend):  # --self-test
        mismatches = 0
        for raw in raws:
            host = np.frombuffer(raw.buffer, dtype=np.uint8)
            a, b = decode_outputs(cpu, raw, host), decode_outputs(gpu, raw, host)
            mismatches += len(differing_outputs(a, b, len(raw)))
        return {"bytes": total_bytes, "mismatches": mismatches}
    import cupy as cp

    mismatches = 0
    h2d = d2d = kernel = 0.0
    for raw in raws:
        host = np.frombuffer(raw.buffer, dtype=np.uint8)
        expected = decode_outputs(cpu, raw, host)
        start = time.perf_counter()
        device = cp.asarray(host)
        cp.cuda.runtime.deviceSynchronize()
        h2d += time.perf_counter() - start
        start = time.perf_counter()
        copy = device.copy()
        cp.cuda.runtime.deviceSynchronize()
        d2d += time.perf_counter() - start
        del copy
        decode_outputs(gpu, raw, device)  # warm: compile and caches
        cp.cuda.runtime.deviceSynchronize()
        start = time.perf_counter()
        got = decode_outputs(gpu, raw, device)
        cp.cuda.runtime.deviceSynchronize()
        kernel += time.perf_counter() - start
        host_got = {name: cp.asnumpy(array) for name, array in got.items()}
        for name in differing_outputs(expected, host_got, len(raw)):
            mismatches += 1
            print(f"decode_records: output {name} differs between CPU and GPU")
    gb = total_bytes / 1e9
    return {
        "bytes": total_bytes,
        "decode_kernel_gb_per_s": gb / kernel,
        "host_to_device_gb_per_s": gb / h2d,
        "device_to_device_gb_per_s": 2 * gb / d2d,
        "decode_vs_device_copy": (gb / kernel) / (2 * gb / d2d),
        "mismatches": mismatches,
    }


class Timed:
    """Wraps an operator method to add its seconds (device synchronised) to ``totals``."""

    def __init__(self, totals: dict[str, float], name: str, method: Any, sync: Any) -> None:
        self.totals, self.name, self.method, self.sync = totals, name, method, sync

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.sync()
        start = time.perf_counter()
        result = self.method(*args, **kwargs)
        self.sync()
        self.totals[self.name] += time.perf_counter() - start
        return result


def run_operators(
    backend: Any, decoded: list[Any], raws: list[RawBatch], sync: Any
) -> tuple[dict[str, Any], dict[str, float]]:
    totals: dict[str, float] = defaultdict(float)
    processor = PartitionProcessor(0, Semantics(), backend)
    processor.dedup.apply = Timed(totals, "dedup", processor.dedup.apply, sync)
    processor.sessions.apply = Timed(totals, "sessions", processor.sessions.apply, sync)
    processor.sessions.close = Timed(totals, "sessions close", processor.sessions.close, sync)
    for aggregator in processor.windows:
        name = aggregator.spec.table
        aggregator.apply = Timed(totals, f"{name} apply", aggregator.apply, sync)
        aggregator.emit = Timed(totals, f"{name} emit", aggregator.emit, sync)
    collected: dict[str, list[Any]] = defaultdict(list)
    start = time.perf_counter()
    for raw, result in zip(raws, decoded, strict=True):
        for name, table in processor.process(raw, result).tables.items():
            collected[name].append(table)
    for name, table in processor.flush().tables.items():
        collected[name].append(table)
    sync()
    totals["whole batch loop"] = time.perf_counter() - start
    return collected, dict(totals)


def compare_tables(cpu: dict[str, Any], gpu: dict[str, Any]) -> list[str]:
    import pyarrow as pa

    from tests.engine_harness import assert_table_equal
    from tests.reference import keep_final_versions

    problems = []
    for name, table_schema in schema.OUTPUT_TABLES.items():
        tables = []
        for side in (cpu, gpu):
            parts = [t.select(table_schema.names).cast(table_schema) for t in side.get(name, [])]
            table = pa.concat_tables(parts) if parts else table_schema.empty_table()
            if name in schema.VERSIONED_TABLES:
                table = keep_final_versions(name, table)
            tables.append(table)
        try:
            assert_table_equal(name, tables[1], tables[0])
        except AssertionError as exc:
            problems.append(f"{name}: {str(exc)[:500]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--self-test", action="store_true", help="CPU engine on both sides")
    args = parser.parse_args()
    cpu = CpuBackend()
    gpu: Any
    if args.self_test:
        gpu, sync, device = CpuBackend(), (lambda: None), "none (--self-test)"
    else:
        reason = gpu_unavailable_reason()
        if reason:
            print(f"no usable GPU: {reason}")
            return 2
        import cupy as cp

        gpu, sync = GpuBackend(), cp.cuda.runtime.deviceSynchronize
        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"GPU: {device}")
    raws = batches(args.events, args.batch_size, args.seed)
    report: dict[str, Any] = {"events": args.events, "batch_size": args.batch_size}
    report["device"] = device
    report["decode"] = check_decode(cpu, gpu, raws)
    decoder = NativeJsonDecoder(cpu.kernels)
    decoded = [decoder.decode(raw) for raw in raws]
    cpu_tables, cpu_times = run_operators(cpu, decoded, raws, lambda: None)
    gpu_tables, gpu_times = run_operators(gpu, decoded, raws, sync)
    report["operators_s"] = {"cpu": cpu_times, "gpu": gpu_times}
    problems = compare_tables(cpu_tables, gpu_tables)
    report["table_differences"] = problems
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    failed = bool(problems) or report["decode"]["mismatches"] > 0
    print("GPU check:", "FAILED" if failed else "every output equal on both engines")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one kernel loader: ``kernels/*.cu`` built once per process for either target.

* CPU target: the sources are compiled as C++ with OpenMP (``g++ -O3 -fopenmp -shared``)
  into a shared library cached on disk by the hash of the source text and flags, then
  called through :mod:`ctypes` (which releases the GIL during the call).
* GPU target: the same source text (header inlined, because CuPy's cache keys on the
  source only) is compiled by NVRTC through ``cupy.RawModule`` once per device.

Both targets expose the same typed launchers, generated from the ``KERNEL`` signatures in
the sources: ``lib.hash_strings(n, offsets, chars, mask, out)``.  Launchers check argument
count, dtypes, contiguity and the array module before calling, so a wrong call is a clear
:class:`KernelError` instead of memory corruption.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpu_pipeline.errors import KernelError

_SCALAR_TYPES: dict[str, tuple[np.dtype[Any], Any]] = {
    "i8": (np.dtype(np.int8), ctypes.c_int8),
    "u8": (np.dtype(np.uint8), ctypes.c_uint8),
    "i32": (np.dtype(np.int32), ctypes.c_int32),
    "u32": (np.dtype(np.uint32), ctypes.c_uint32),
    "i64": (np.dtype(np.int64), ctypes.c_int64),
    "u64": (np.dtype(np.uint64), ctypes.c_uint64),
    "f64": (np.dtype(np.float64), ctypes.c_double),
}
_KERNEL_RE = re.compile(r"KERNEL\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"portable\.cuh"\s*$', re.M)
HEADER = "portable.cuh"
BLOCK_SIZE = 256


@dataclass(frozen=True)
class Param:
    """One kernel parameter as declared in the source."""

    name: str
    ctype: str
    pointer: bool
    const: bool


@dataclass(frozen=True)
class KernelSignature:
    """A kernel's name and parameters, parsed from its ``KERNEL void name(...)`` line."""

    name: str
    params: tuple[Param, ...]


def kernels_dir() -> Path:
    """Where the kernel sources live: ``$GPU_PIPELINE_KERNELS_DIR`` or the repo's ``kernels/``."""
    override = os.environ.get("GPU_PIPELINE_KERNELS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "kernels"


def kernel_source() -> str:
    """The whole kernel source as one translation unit: the header once, then every ``.cu``."""
    folder = kernels_dir()
    header = folder / HEADER
    if not header.is_file():
        raise KernelError(
            f"kernel sources not found in {folder}: set GPU_PIPELINE_KERNELS_DIR to the "
            "project's kernels/ folder"
        )
    parts = [header.read_text()]
    for path in sorted(folder.glob("*.cu")):
        parts.append(f"// ---- {path.name} ----\n" + _INCLUDE_RE.sub("", path.read_text()))
    return "\n".join(parts)


def parse_signatures(source: str) -> dict[str, KernelSignature]:
    """Every ``KERNEL`` in ``source`` with its typed parameters."""
    signatures: dict[str, KernelSignature] = {}
    for match in _KERNEL_RE.finditer(source):
        name, raw_params = match.group(1), match.group(2)
        if name in ("name",):  # the example in the header comment
            continue
        params = []
        for raw in raw_params.split(","):
            words = raw.replace("*", " * ").split()
            if not words:
                continue
            ctype = next((w for w in words if w in _SCALAR_TYPES), None)
            if ctype is None:
                raise KernelError(f"kernel {name}: unsupported parameter type in {raw.strip()!r}")
            params.append(Param(words[-1], ctype, "*" in words, "const" in words))
        if not params or params[0].pointer or params[0].ctype != "i64":
            raise KernelError(f"kernel {name}: the first parameter must be `i64 n`")
        signatures[name] = KernelSignature(name, tuple(params))
    return signatures


# ---------------------------------------------------------------------------
# CPU target
# ---------------------------------------------------------------------------

_CPU_EXTRA = """
#include <omp.h>
extern "C" void gp_set_num_threads(int n) { omp_set_num_threads(n); }
extern "C" int gp_get_max_threads(void) { return omp_get_max_threads(); }
"""

BUILD_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "release": ("g++", ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-x", "c++"]),
    # ThreadSanitizer + LLVM OpenMP (Archer makes OpenMP synchronisation visible to TSan).
    "tsan": (
        "clang++-14",
        [
            "-O1",
            "-g",
            "-fsanitize=thread",
            "-fopenmp=libomp",
            "-shared",
            "-fPIC",
            "-std=c++17",
            "-x",
            "c++",
        ],
    ),
}


def cache_dir() -> Path:
    """Where built kernel libraries are cached (``$GPU_PIPELINE_CACHE_DIR`` or the XDG cache)."""
    override = os.environ.get("GPU_PIPELINE_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-pipeline"


def build_cpu_library(variant: str = "release") -> Path:
    """Compile the kernels for the CPU (cached by source hash); return the library path."""
    if variant not in BUILD_VARIANTS:
        raise KernelError(
            f"unknown kernel build {variant!r}; choose one of {sorted(BUILD_VARIANTS)}"
        )
    default_compiler, flags = BUILD_VARIANTS[variant]
    compiler = os.environ.get("CXX", default_compiler) if variant == "release" else default_compiler
    source = kernel_source() + _CPU_EXTRA
    digest = hashlib.sha256((source + compiler + " ".join(flags)).encode()).hexdigest()[:20]
    target = cache_dir() / f"kernels-{variant}-{digest}.so"
    if target.is_file():
        return target
    if shutil.which(compiler) is None:
        hint = (
            "apt-get install g++"
            if variant == "release"
            else "apt-get install clang-14 libomp-14-dev"
        )
        raise KernelError(
            f"no C++ compiler {compiler!r} found to build the CPU kernels: {hint} (or set CXX)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.cpp"
        src.write_text(source)
        out = Path(tmp) / "kernels.so"
        result = subprocess.run(
            [compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise KernelError(f"building the CPU kernels with {compiler} failed:\n{result.stderr}")
        os.replace(out, target)  # atomic: concurrent builders race harmlessly
    return target


class _CpuLauncher:
    def __init__(self, function: Any, signature: KernelSignature) -> None:
        self.signature = signature
        self.function = function
        function.restype = None
        function.argtypes = [
            ctypes.c_void_p if p.pointer else _SCALAR_TYPES[p.ctype][1] for p in signature.params
        ]

    def __call__(self, *args: Any) -> None:
        converted = _check_args(self.signature, args, np)
        self.function(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in converted))


# ---------------------------------------------------------------------------
# GPU target
# ---------------------------------------------------------------------------


class _GpuLauncher:
    def __init__(self, function: Any, signature: KernelSignature, max_blocks: int) -> None:
        self.signature = signature
        self.function = function
        self.max_blocks = max_blocks

    def __call__(self, *args: Any) -> None:
        import cupy

        converted = _check_args(self.signature, args, cupy)
        n = int(converted[0])
        if n <= 0:
            return
        blocks = max(1, min((n + BLOCK_SIZE - 1) // BLOCK_SIZE, self.max_blocks))
        self.function((blocks,), (BLOCK_SIZE,), tuple(converted))


def _check_args(signature: KernelSignature, args: tuple[Any, ...], xp: Any) -> list[Any]:
    """Check and convert launcher arguments against the declared parameters."""
    if len(args) != len(signature.params):
        raise KernelError(
            f"{signature.name} takes {len(signature.params)} arguments "
            f"({', '.join(p.name for p in signature.params)}), got {len(args)}"
        )
    converted: list[Any] = []
    for param, arg in zip(signature.params, args, strict=True):
        dtype = _SCALAR_TYPES[param.ctype][0]
        if param.pointer:
            if not isinstance(arg, xp.ndarray):
                raise KernelError(
                    f"{signature.name}: {param.name} must be a {xp.__name__} array, "
                    f"got {type(arg).__name__}"
                )
            if arg.dtype != dtype:
                raise KernelError(
                    f"{signature.name}: {param.name} must be {dtype}, got {arg.dtype}"
                )
            if not arg.flags.c_contiguous:
                raise KernelError(f"{signature.name}: {param.name} must be C-contiguous")
            converted.append(arg)
        else:
            converted.append(dtype.type(arg) if xp is not np else arg)
    return converted


# ---------------------------------------------------------------------------
# The library object (one per target per process)
# ---------------------------------------------------------------------------


class KernelLibrary:
    """Typed launchers for every kernel, on one target (``"cpu"`` or ``"gpu"``)."""

    def __init__(self, target: str, launchers: dict[str, Callable[..., None]], handle: Any) -> None:
        self.target = target
        self._launchers = launchers
        self._handle = handle

    def __getattr__(self, name: str) -> Callable[..., None]:
        try:
            return self._launchers[name]
        except KeyError:
            raise AttributeError(f"no kernel named {name!r}") from None

    @property
    def names(self) -> list[str]:
        """The kernels this library exposes."""
        return sorted(self._launchers)

    def set_threads(self, threads: int) -> None:
        """CPU target: the number of OpenMP threads each kernel launch uses."""
        if self.target == "cpu" and threads > 0:
            self._handle.gp_set_num_threads(ctypes.c_int(threads))


_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str, int], KernelLibrary] = {}


def load_cpu(variant: str | None = None) -> KernelLibrary:
    """The CPU build (``$GPU_PIPELINE_KERNEL_BUILD`` picks ``release`` or ``tsan``)."""
    variant = variant or os.environ.get("GPU_PIPELINE_KERNEL_BUILD", "release")
    key = ("cpu", variant, 0)
    with _LOCK:
        if key not in _CACHE:
            path = build_cpu_library(variant)
            handle = ctypes.CDLL(str(path))
            signatures = parse_signatures(kernel_source())
            launchers: dict[str, Callable[..., None]] = {
                name: _CpuLauncher(getattr(handle, name), sig) for name, sig in signatures.items()
            }
            _CACHE[key] = KernelLibrary("cpu", launchers, handle)
        return _CACHE[key]


def load_gpu(device: int | None = None) -> KernelLibrary:
    """The GPU build for the current (or given) CUDA device, compiled by NVRTC once."""
    import cupy

    device_id = cupy.cuda.Device(device).id if device is not None else cupy.cuda.Device().id
    key = ("gpu", "nvrtc", device_id)
    with _LOCK:
        if key not in _CACHE:
            source = kernel_source()
            with cupy.cuda.Device(device_id):
                module = cupy.RawModule(code=source, options=("-std=c++17",))
                sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
                signatures = parse_signatures(source)
                launchers: dict[str, Callable[..., None]] = {
                    name: _GpuLauncher(module.get_function(name), sig, max_blocks=sms * 32)
                    for name, sig in signatures.items()
                }
            _CACHE[key] = KernelLibrary("gpu", launchers, module)
        return _CACHE[key]


def compile_with_nvrtc(arch: str = "sm_90") -> str:
    """Compile every kernel with NVRTC for ``arch`` without needing a GPU; return the PTX.

    Raises :class:`KernelError` with NVRTC's log on failure.  Needs the ``nvidia-cuda-nvrtc``
    and ``cuda-bindings`` packages.
    """
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise KernelError(
            "NVRTC is not installed: pip install cuda-bindings nvidia-cuda-nvrtc-cu12"
        ) from exc

    source = kernel_source().encode()
    err, program = nvrtc.nvrtcCreateProgram(source, b"gpu_pipeline_kernels.cu", 0, [], [])
    _nvrtc_ok(nvrtc, err, "nvrtcCreateProgram")
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    (compile_err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    err, log_size = nvrtc.nvrtcGetProgramLogSize(program)
    log = b" " * log_size
    nvrtc.nvrtcGetProgramLog(program, log)
    if compile_err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelError(
            f"NVRTC failed to compile the kernels for {arch}:\n{log.decode(errors='replace')}"
        )
    err, ptx_size = nvrtc.nvrtcGetPTXSize(program)
    ptx = b" " * ptx_size
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(program)
    return ptx.decode(errors="replace")


def _nvrtc_ok(nvrtc: Any, err: Any, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelError(f"{what} failed: {err}")

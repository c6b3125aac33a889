"""The race-detector harness: a ThreadSanitizer-instrumented Python that runs kernel tests.

Loading a TSan-built kernel library into an ordinary Python does not work (the TSan runtime
must start with the process), so we build a tiny Python launcher with ``clang -fsanitize=thread``
that embeds libpython, and run pytest under it with the ``tsan`` kernel build
(``GPU_PIPELINE_KERNEL_BUILD=tsan``: clang-14, ``-fsanitize=thread``, LLVM OpenMP) and Archer
(``OMP_TOOL_LIBRARIES``), which tells TSan about OpenMP's synchronisation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ARCHER = Path("/usr/lib/llvm-14/lib/libarcher.so")
CLANG = "clang-14"
LAUNCHER_SOURCE = (
    "#include <Python.h>\nint main(int argc, char** argv) { return Py_BytesMain(argc, argv); }\n"
)


def unavailable_reason() -> str | None:
    """Why the race detector cannot run here, or None."""
    if shutil.which(CLANG) is None or shutil.which("clang++-14") is None:
        return "clang-14 is not installed (deploy/install-system-deps.sh installs it)"
    if not ARCHER.is_file():
        return "LLVM OpenMP with Archer is not installed (apt-get install libomp-14-dev)"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "this Python has no shared libpython to embed"
    return None


def build_launcher(folder: Path) -> Path:
    """Compile the TSan-instrumented Python launcher into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "tsan_python.c"
    source.write_text(LAUNCHER_SOURCE)
    binary = folder / "tsan-python"
    include = sysconfig.get_paths()["include"]
    libdir = sysconfig.get_config_var("LIBDIR")
    version = sysconfig.get_config_var("LDVERSION")
    subprocess.run(
        [
            CLANG,
            "-fsanitize=thread",
            "-fopenmp=libomp",
            f"-I{include}",
            str(source),
            f"-L{libdir}",
            f"-lpython{version}",
            f"-Wl,-rpath,{libdir}",
            "-lm",
            "-ldl",
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return binary


def run_under_tsan(
    launcher: Path, args: list[str], env_extra: dict[str, str], threads: int = 4, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``python args`` under the instrumented launcher with the TSan kernel build."""
    env = dict(os.environ)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env.update(
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), *site]),
        GPU_PIPELINE_KERNEL_BUILD="tsan",
        OMP_TOOL_LIBRARIES=str(ARCHER),
        OMP_NUM_THREADS=str(threads),
        TSAN_OPTIONS="ignore_noninstrumented_modules=1 exitcode=66 report_signal_unsafe=0",
        **env_extra,
    )
    return subprocess.run(
        [str(launcher), *args], env=env, capture_output=True, text=True, timeout=timeout
    )

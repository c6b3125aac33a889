"""The notebooks run top to bottom on real tables and reports, and are kept without outputs.

``explore.ipynb`` reads the tables of a small pipeline job run here as a child process, into
a chdb folder of its own; the notebook's kernel is another process, started after the run
has exited (chdb serves a folder to one process at a time).  ``benchmark_report.ipynb``
reads the committed reports, and folders where reports are missing or a benchmark failed.
The kernels run this interpreter (checked in the kernel itself) with matplotlib's inline
backend, which renders every figure headlessly, as Jupyter does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import nbformat
import pyarrow as pa
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from gpu_pipeline.errors import ConfigError
from gpu_pipeline.notebook import (
    DATABASE_ENV,
    SINK_ENV,
    _text_columns,
    default_sink_url,
    resolve,
)
from gpu_pipeline.sinks.clickhouse import ClickHouseSink, parse_sink_url

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
BENCHMARKS = REPO_ROOT / "benchmarks"
BENCHMARKS_ENV = "GPU_PIPELINE_BENCHMARKS"
DATABASE = "shop"
"""The job's database: not the default, so that the notebook must take it from the environment."""
CELL_TIMEOUT_S = 120
RUN_TIMEOUT_S = 120
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
PREFIX_MARK = "kernel prefix: "


# ---------------------------------------------------------------------------- helpers


def child_env(**extra: str) -> dict[str, str]:
    """This environment without GPU_PIPELINE_* settings (the kernel cache aside), plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GPU_PIPELINE_") or key == "GPU_PIPELINE_CACHE_DIR"
    }
    env["MPLBACKEND"] = INLINE_BACKEND
    env.update(extra)
    return env


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run notebook ``name`` in a fresh kernel (working directory: notebooks/, as in Jupyter).

    A failing cell raises nbclient's CellExecutionError with its traceback.  A last cell,
    added to this in-memory copy only, reports which interpreter the kernel ran.
    """
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(new_code_cell(f"import sys; print({PREFIX_MARK!r} + sys.prefix)"))
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=env)
    errors = [
        f"{cell.get('id')}: {output.get('ename')}: {output.get('evalue')}"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors, errors
    assert f"{PREFIX_MARK}{sys.prefix}\n" in stdout(notebook), (
        f"the kernel did not run this interpreter ({sys.prefix}): {stdout(notebook)[-500:]}"
    )
    return notebook


def stdout(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.get("name") == "stdout"
    )


def figures(notebook: nbformat.NotebookNode) -> int:
    """Number of rendered figures (PNG outputs)."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


# ---------------------------------------------------------------------------- the job


def run_job(sink_url: str, database: str, work: Path) -> None:
    """A 5,000-event synthetic job into ``database`` at ``sink_url``, run to its end."""
    argv = [sys.executable, "-m", "gpu_pipeline.cli", "run", "--events", "5000"]
    argv += ["--sink", sink_url, "--database", database]
    argv += [
        "--checkpoint-dir",
        str(work / "checkpoints"),
        "--engine",
        "cpu",
        "--progress",
        "never",
    ]
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"the job failed:\n{(result.stdout + result.stderr)[-3000:]}"


@pytest.fixture(scope="module")
def job_sink(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chdb folder of a finished job into database ``shop``."""
    work = tmp_path_factory.mktemp("notebook-job")
    run_job(f"chdb://{work / 'clickhouse'}", DATABASE, work)
    return work / "clickhouse"


# ---------------------------------------------------------------------------- notebooks


def test_explore_runs_on_a_job(job_sink: Path) -> None:
    notebook = execute(
        "explore.ipynb",
        child_env(**{SINK_ENV: f"chdb://{job_sink}", DATABASE_ENV: DATABASE}),
    )
    assert f"chdb://{job_sink} (embedded ClickHouse" in stdout(notebook)
    assert f"database {DATABASE}" in stdout(notebook)
    # traffic, funnel, sessions, late events, dead letters: the job has some of each
    assert figures(notebook) >= 5, stdout(notebook)
    # the last cell released the folder: another process can open it at once
    query = [
        sys.executable,
        "-m",
        "gpu_pipeline.cli",
        "query",
        f"SELECT count() FROM {DATABASE}.events",
    ]
    query += ["--sink", f"chdb://{job_sink}", "--database", DATABASE, "--format", "csv"]
    result = subprocess.run(
        query,
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.clickhouse_server
def test_explore_runs_on_a_server(tmp_path: Path) -> None:
    url = os.environ["CLICKHOUSE_URL"]
    database = f"gpu_pipeline_notebook_{uuid.uuid4().hex[:12]}"
    try:
        run_job(url, database, tmp_path)
        notebook = execute("explore.ipynb", child_env(**{SINK_ENV: url, DATABASE_ENV: database}))
        config = parse_sink_url(url, database)
        assert f"{config.safe_url} (ClickHouse server" in stdout(notebook)
        assert not config.password or config.password not in stdout(notebook)
        assert figures(notebook) >= 5, stdout(notebook)
    finally:
        with ClickHouseSink(parse_sink_url(url, database)) as sink:
            sink.query(f"DROP DATABASE IF EXISTS {database}")


def test_benchmark_report_plots_the_committed_reports() -> None:
    if not (BENCHMARKS / "REPORT.md").is_file():
        pytest.skip("benchmarks/REPORT.md is not in this checkout")
    notebook = execute("benchmark_report.ipynb", child_env())  # the default: ../benchmarks
    assert f"read from {BENCHMARKS}: REPORT" in stdout(notebook)
    # operators, ratios, end to end, plus one per further report present
    extra = sum((BENCHMARKS / f"{name}.md").is_file() for name in ("KAFKA", "WRITES", "CLUSTER"))
    assert figures(notebook) >= 3 + extra, stdout(notebook)


def _no_reports(folder: Path) -> int:
    return 0


def _failed_benchmark(folder: Path) -> int:
    """REPORT.md whose first benchmark failed (as run_all.py writes it), nothing else."""
    report = (BENCHMARKS / "REPORT.md").read_text(encoding="utf-8")
    sections = report.split("\n## ")
    failed = (
        "Dedup: 10,000,000 events, 1 thread(s)\n\n**failed** (exit 1):\n```\n"
        "Traceback (most recent call last):\n  File  x  line  1\nRuntimeError: out of memory\n"
        "```\n"
    )
    kept = [s for s in sections[1:] if not s.startswith("Dedup")]
    (folder / "REPORT.md").write_text("\n## ".join([sections[0], failed, *kept]))
    return 3  # the other operators, their ratios, end to end


@pytest.mark.parametrize("make_reports", [_no_reports, _failed_benchmark])
def test_benchmark_report_skips_what_is_missing(
    tmp_path: Path, make_reports: Callable[[Path], int]
) -> None:
    if make_reports is _failed_benchmark and not (BENCHMARKS / "REPORT.md").is_file():
        pytest.skip("benchmarks/REPORT.md is not in this checkout")
    expected_figures = make_reports(tmp_path)
    notebook = execute("benchmark_report.ipynb", child_env(**{BENCHMARKS_ENV: str(tmp_path)}))
    assert f"skipped: {tmp_path / 'KAFKA.md'} is missing" in stdout(notebook)
    assert figures(notebook) == expected_figures, stdout(notebook)


EXECUTED = {"explore.ipynb", "benchmark_report.ipynb"}


def test_every_notebook_is_executed_here() -> None:
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == EXECUTED


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_notebook_is_saved_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [
        cell.get("id")
        for cell in notebook.cells
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{name}: clear the outputs of cells {dirty} before committing"


# ---------------------------------------------------------------------------- the helper


def test_default_sink_is_the_nearest_quick_start_folder(tmp_path: Path) -> None:
    (tmp_path / "gpu_pipeline_data" / "clickhouse").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    expected = f"chdb://{tmp_path.resolve() / 'gpu_pipeline_data' / 'clickhouse'}"
    assert default_sink_url(tmp_path / "notebooks") == expected
    assert default_sink_url(tmp_path) == expected


def test_without_a_sink_the_error_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"make run.*{SINK_ENV}"):
        resolve(environ={}, start=tmp_path)


def test_the_environment_chooses_sink_and_database(tmp_path: Path) -> None:
    environ = {SINK_ENV: "http://reader:secret@clickhouse:8123", DATABASE_ENV: "shop"}
    config = resolve(environ=environ, start=tmp_path)
    assert (config.kind, config.host, config.port) == ("http", "clickhouse", 8123)
    assert (config.username, config.password, config.database) == ("reader", "secret", "shop")
    assert "secret" not in repr(config)
    explicit = resolve(f"chdb://{tmp_path}", "other", environ=environ)
    assert (explicit.kind, explicit.path, explicit.database) == ("chdb", str(tmp_path), "other")
    with pytest.raises(ConfigError, match="database"):
        resolve(environ={**environ, DATABASE_ENV: "shop; DROP"})


def test_text_is_string_where_valid_and_binary_elsewhere() -> None:
    table = pa.table(
        {
            "as_binary": pa.array([b"page_view", b"purchase"], pa.binary()),
            "raw": pa.array([b"ok", b"\xc3("], pa.binary()),
            "as_string": pa.array(["a", "b"]),
            "n": pa.array([1, 2]),
        }
    )
    result = _text_columns(table)
    assert result.schema.field("as_binary").type == pa.string()
    assert result.column("as_binary").to_pylist() == ["page_view", "purchase"]
    assert result.schema.field("raw").type == pa.binary()
    assert result.schema.field("as_string").type == pa.string()
    assert result.schema.field("n").type == pa.int64()


def test_a_database_without_the_job_is_refused(job_sink: Path) -> None:
    """In a child process: this one must not tie its embedded engine to the job's folder."""
    code = (
        "from gpu_pipeline.notebook import connect\n"
        "from gpu_pipeline.errors import SinkError\n"
        "try:\n"
        f"    connect('chdb://{job_sink}', 'elsewhere')\n"
        "except SinkError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "database elsewhere lacks the tables events, sessions" in result.stdout, result.stdout

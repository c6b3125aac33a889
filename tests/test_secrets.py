"""Secrets: where passwords come from, and that no command ever shows one.

The unit tests pin :func:`gpu_pipeline.secrets.read_secret` and how the Kafka client
properties and the ClickHouse sink URL take their passwords from it.  The sweep runs every
command of the CLI (``--help`` of each, ``generate``, ``run``, ``query``, ``doctor``) with
secrets set in every place a user may put them: a Kafka SASL password in
``GPU_PIPELINE_KAFKA_PASSWORD``, in a ``_FILE`` and in the URL, a ClickHouse password in
``GPU_PIPELINE_CLICKHOUSE_PASSWORD`` (irrelevant for chdb, used for a server URL without
one) and in an unreachable server's URL.  It searches stdout and stderr, the files a run
leaves (checkpoints, journal, the chdb folder), the ``pipeline_jobs`` table and a
Prometheus scrape taken while ``run`` works, and insists that no secret appears.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from gpu_pipeline.errors import ConfigError
from gpu_pipeline.secrets import CLICKHOUSE_PASSWORD, KAFKA_PASSWORD, read_secret
from gpu_pipeline.sinks.clickhouse import parse_sink_url
from gpu_pipeline.sources.kafka import client_properties, connection_properties
from tests.kafka_broker import SecureBroker, secure_broker, secure_unavailable_reason
from tests.pipeline_runs import REPO_ROOT

# ---------------------------------------------------------------------------- read_secret

NAME = "GPU_PIPELINE_TEST_SECRET"


def test_unset_is_none() -> None:
    assert read_secret(NAME, {}) is None
    assert read_secret(NAME, {NAME: "  ", f"{NAME}_FILE": ""}) is None


def test_from_the_variable_stripped() -> None:
    assert read_secret(NAME, {NAME: " s3cret\n"}) == "s3cret"


def test_from_the_file_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  p@ss word \n\n")
    assert read_secret(NAME, {f"{NAME}_FILE": str(path)}) == "p@ss word"


def test_an_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):  # no such file; a directory
        with pytest.raises(ConfigError) as info:
            read_secret(NAME, {f"{NAME}_FILE": str(path)})
        assert info.value.option == f"{NAME}_FILE"
        assert str(path) in str(info.value)


def test_an_empty_or_binary_file_is_refused(tmp_path: Path) -> None:
    empty, binary = tmp_path / "empty", tmp_path / "binary"
    empty.write_text(" \n")
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(NAME, {f"{NAME}_FILE": str(empty)})
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_secret(NAME, {f"{NAME}_FILE": str(binary)})


def test_both_set_is_refused_without_showing_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file")
    with pytest.raises(ConfigError) as info:
        read_secret(NAME, {NAME: "from-env", f"{NAME}_FILE": str(path)})
    assert info.value.option == NAME
    assert "from-env" not in str(info.value) and "from-file" not in str(info.value)


# ---------------------------------------------------------------------------- Kafka properties

SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u"}


def test_the_sasl_password_comes_from_the_environment(tmp_path: Path) -> None:
    assert client_properties(SASL, environ={KAFKA_PASSWORD: "env-pw"})["sasl.password"] == "env-pw"
    path = tmp_path / "pw"
    path.write_text("file-pw\n")
    from_file = client_properties(SASL, environ={f"{KAFKA_PASSWORD}_FILE": str(path)})
    assert from_file["sasl.password"] == "file-pw"
    in_url = client_properties({**SASL, "sasl.password": "url-pw"}, environ={KAFKA_PASSWORD: "x"})
    assert in_url["sasl.password"] == "url-pw"  # the URL wins
    assert SASL.get("sasl.password") is None  # the caller's dict is left alone


def test_no_password_is_needed_without_a_password_mechanism() -> None:
    for properties in (
        {},
        {"security.protocol": "SSL", "ssl.ca.location": "/ca.pem"},
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"},
    ):
        assert "sasl.password" not in client_properties(properties, environ={})


def test_a_missing_sasl_password_names_both_variables() -> None:
    with pytest.raises(ConfigError) as info:
        client_properties({**SASL, "sasl.mechanisms": "PLAIN"}, "out", environ={})
    assert info.value.option == "out"
    assert f"{KAFKA_PASSWORD}," in str(info.value) and f"{KAFKA_PASSWORD}_FILE" in str(info.value)


def test_the_client_key_password_comes_from_the_environment() -> None:
    properties = {"security.protocol": "SSL", "ssl.key.location": "/k.pem"}
    env = {"GPU_PIPELINE_KAFKA_SSL_KEY_PASSWORD": "key-pw"}
    assert client_properties(properties, environ=env)["ssl.key.password"] == "key-pw"


def test_other_clients_get_only_the_connection_properties() -> None:
    properties = {
        **SASL,
        "ssl.ca.location": "/ca.pem",
        "client.id": "me",
        "group.protocol": "consumer",
        "session.timeout.ms": "6000",
        "linger.ms": "5",
    }
    assert connection_properties(properties) == {
        **SASL,
        "ssl.ca.location": "/ca.pem",
        "client.id": "me",
    }


# ---------------------------------------------------------------------------- ClickHouse URL


def test_the_clickhouse_password_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CLICKHOUSE_PASSWORD, "ch-env")
    assert parse_sink_url("https://alice@ch:8443").password == "ch-env"
    assert parse_sink_url("https://alice:in%40url@ch:8443").password == "in@url"  # URL wins
    assert parse_sink_url("https://alice:@ch:8443").password == ""  # explicitly empty
    monkeypatch.delenv(CLICKHOUSE_PASSWORD)
    path = tmp_path / "ch"
    path.write_text("ch-file\n")
    monkeypatch.setenv(f"{CLICKHOUSE_PASSWORD}_FILE", str(path))
    config = parse_sink_url("http://ch")
    assert config.password == "ch-file"
    assert "ch-file" not in repr(config) and "ch-file" not in config.safe_url
    monkeypatch.setenv(f"{CLICKHOUSE_PASSWORD}_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        parse_sink_url("http://ch")
    assert info.value.option == f"{CLICKHOUSE_PASSWORD}_FILE"
    assert parse_sink_url("chdb://x").password == ""  # the embedded engine needs none


# ---------------------------------------------------------------------------- the CLI sweep


@dataclass(frozen=True)
class Secrets:
    """Every secret of the sweep, and the environment that carries them."""

    kafka: str
    """alice's real SASL password (the runs must authenticate with it)."""
    wrong_kafka: str
    ch_env: str
    ch_url: str
    kafka_file: Path

    def all(self) -> dict[str, str]:
        return {
            "Kafka SASL password": self.kafka,
            "wrong Kafka password": self.wrong_kafka,
            "ClickHouse password (environment)": self.ch_env,
            "ClickHouse password (URL)": self.ch_url,
        }


@dataclass
class Outcome:
    code: int
    output: str


@pytest.fixture(scope="module")
def broker() -> SecureBroker:
    reason = secure_unavailable_reason()
    if reason and not (os.environ.get("CI") and "openssl" not in reason):
        pytest.skip(f"no secured Kafka broker: {reason}")
    return secure_broker()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secrets")


def make_secrets(kafka_password: str, folder: Path) -> Secrets:
    token = uuid.uuid4().hex[:12]
    kafka_file = folder / "kafka_password"
    folder.mkdir(parents=True, exist_ok=True)
    kafka_file.write_text(kafka_password + "\n")
    return Secrets(
        kafka=kafka_password,
        wrong_kafka=f"wrongpw-{token}",
        ch_env=f"chenv-{token}",
        ch_url=f"churl-{token}",
        kafka_file=kafka_file,
    )


@pytest.fixture(scope="module")
def secrets(broker: SecureBroker, sweep_dir: Path) -> Secrets:
    """The sweep's secrets, with alice's real password (runs on the secured broker)."""
    return make_secrets(broker.users["alice"][1], sweep_dir / "run-secrets")


@pytest.fixture
def offline_secrets(tmp_path: Path) -> Secrets:
    """Secrets for commands that reach no broker (any Kafka password will do)."""
    return make_secrets(f"kafkapw-{uuid.uuid4().hex[:12]}", tmp_path / "run-secrets")


def log_formats() -> list[str]:
    """``text``, and ``json`` where the CLI has ``--log-format``."""
    from gpu_pipeline.cli import build_parser

    try:
        build_parser().parse_args(["run", "--log-format", "json"])
    except SystemExit:
        return ["text"]
    return ["text", "json"]


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kafka_url(broker: SecureBroker, topic: str, password: str | None = None) -> str:
    properties = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "ssl.ca.location": str(broker.tls.ca),
    }
    if password is not None:
        properties["sasl.password"] = password
    return f"kafka://{broker.sasl_ssl}/{topic}?{urlencode(properties, safe='/')}"


def environment(s: Secrets, kafka: str = "env") -> dict[str, str]:
    """The children's environment: the ClickHouse password always set (chdb ignores it),
    the Kafka password in the variable (``env``), its file (``file``), or neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_")}
    if "GPU_PIPELINE_CACHE_DIR" in os.environ:
        env["GPU_PIPELINE_CACHE_DIR"] = os.environ["GPU_PIPELINE_CACHE_DIR"]
    env["COLUMNS"] = "400"
    env[CLICKHOUSE_PASSWORD] = s.ch_env
    if kafka == "env":
        env[KAFKA_PASSWORD] = s.kafka
    elif kafka == "file":
        env[f"{KAFKA_PASSWORD}_FILE"] = str(s.kafka_file)
    elif kafka == "wrong":
        env[KAFKA_PASSWORD] = s.wrong_kafka
    return env


def gpu_pipeline(argv: list[str], env: dict[str, str], timeout_s: float = 180) -> Outcome:
    done = subprocess.run(
        [sys.executable, "-m", "gpu_pipeline.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    return Outcome(done.returncode, done.stdout + done.stderr)


def assert_no_secret(s: Secrets, text: str, where: str) -> None:
    for what, secret in s.all().items():
        assert secret not in text, f"the {what} appears in {where}:\n{text[-3000:]}"
        assert quote(secret, safe="") not in text, f"the {what} (URL-quoted) appears in {where}"


def assert_clean_error(outcome: Outcome, code: int = 1) -> None:
    assert outcome.code == code, outcome.output
    assert "Traceback" not in outcome.output, outcome.output
    assert "error:" in outcome.output, outcome.output


def files_under(folder: Path, skip: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        if path.is_file() and skip not in path.parents:
            yield path


def run_argv(
    broker: SecureBroker, topic: str, folder: Path, source: str | None = None
) -> list[str]:
    return [
        "run",
        "--source",
        source or kafka_url(broker, topic),
        "--sink",
        f"chdb://{folder / 'ch'}",
        "--database",
        "sweep",
        "--checkpoint-dir",
        str(folder / "ckpt"),
        "--engine",
        "cpu",
        "--progress",
        "never",
        "--until-idle",
        "--idle-timeout",
        "2s",
    ]


@pytest.fixture(scope="module")
def topic(broker: SecureBroker, secrets: Secrets) -> str:
    """``generate`` into a new topic over SASL_SSL, password from the file."""
    name = f"sweep_{uuid.uuid4().hex[:8]}"
    outcome = gpu_pipeline(
        ["generate", "--events", "400", "--out", kafka_url(broker, name), "--partitions", "2"],
        environment(secrets, "file"),
    )
    assert outcome.code == 0, outcome.output
    assert_no_secret(secrets, outcome.output, "generate's output")
    return name


def test_help_of_every_command(offline_secrets: Secrets) -> None:
    s = offline_secrets
    for argv in (["--help"], *([c, "--help"] for c in ("run", "generate", "query", "doctor"))):
        outcome = gpu_pipeline(argv, environment(s))
        assert outcome.code == 0, outcome.output
        assert_no_secret(s, outcome.output, f"gpu-pipeline {' '.join(argv)}")


@pytest.mark.kafka
def test_generate_with_the_password_in_the_environment(
    broker: SecureBroker, secrets: Secrets, topic: str
) -> None:
    outcome = gpu_pipeline(
        ["generate", "--events", "50", "--seed", "2", "--out", kafka_url(broker, topic)],
        environment(secrets, "env"),
    )
    assert outcome.code == 0, outcome.output
    assert_no_secret(secrets, outcome.output, "generate's output")


@pytest.mark.kafka
def test_run_with_metrics_leaves_no_secret_anywhere(
    broker: SecureBroker, secrets: Secrets, topic: str, sweep_dir: Path
) -> None:
    """A real run over SASL_SSL (password from the file): its output, a metrics scrape taken
    while it runs, every file it leaves, and the job it records in ClickHouse."""
    folder = sweep_dir / "run"
    port = closed_port()
    argv = [*run_argv(broker, topic, folder), "--metrics-port", str(port)]
    child = subprocess.Popen(
        [sys.executable, "-m", "gpu_pipeline.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env=environment(secrets, "file"),
    )
    scrapes: list[str] = []
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                scrapes.append(reply.read().decode())
        except OSError:
            pass
        time.sleep(0.2)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    assert scrapes, f"the metrics endpoint never answered while the run worked:\n{output}"
    assert "gpu_pipeline_records_total" in scrapes[-1]
    assert_no_secret(secrets, output, "run's output")
    for number, scrape in enumerate(scrapes):
        assert_no_secret(secrets, scrape, f"metrics scrape {number}")
    for path in files_under(folder, skip=secrets.kafka_file.parent):
        assert_no_secret(secrets, path.read_bytes().decode("latin-1"), str(path))

    jobs = gpu_pipeline(
        [
            "query",
            "--sink",
            f"chdb://{folder / 'ch'}",
            "--format",
            "json",
            "SELECT job_id, identity, cuts FROM sweep.pipeline_jobs",
        ],
        environment(secrets),
    )
    assert jobs.code == 0, jobs.output
    assert topic in jobs.output  # the recorded identity names the source...
    assert_no_secret(secrets, jobs.output, "the pipeline_jobs table")  # ...without secrets


@pytest.mark.kafka
@pytest.mark.parametrize("log_format", log_formats())
def test_run_with_the_password_in_the_source_url(
    broker: SecureBroker, secrets: Secrets, topic: str, sweep_dir: Path, log_format: str
) -> None:
    """Not recommended, but it works, and the URL is shown with ``***``."""
    folder = sweep_dir / f"url-password-{log_format}"
    source = kafka_url(broker, topic, password=secrets.kafka)
    argv = run_argv(broker, topic, folder, source)
    if log_format != "text":
        argv += ["--log-format", log_format]
    outcome = gpu_pipeline(argv, environment(secrets, "none"))
    assert outcome.code == 0, outcome.output
    assert "sasl.password=***" in outcome.output
    assert_no_secret(secrets, outcome.output, "run's output")
    for path in files_under(folder, skip=secrets.kafka_file.parent):
        assert_no_secret(secrets, path.read_bytes().decode("latin-1"), str(path))


@pytest.mark.kafka
@pytest.mark.parametrize("log_format", log_formats())
def test_a_failed_authentication_shows_no_password(
    broker: SecureBroker, secrets: Secrets, topic: str, sweep_dir: Path, log_format: str
) -> None:
    formats = [] if log_format == "text" else ["--log-format", log_format]
    for argv in (
        [*run_argv(broker, topic, sweep_dir / f"wrong-{log_format}"), *formats],
        ["generate", "--events", "5", "--out", kafka_url(broker, topic), *formats],
    ):
        outcome = gpu_pipeline(argv, environment(secrets, "wrong"))
        assert_clean_error(outcome)
        assert "authentication failed" in outcome.output.lower()
        assert_no_secret(secrets, outcome.output, f"gpu-pipeline {argv[0]}")


@pytest.mark.parametrize("where", ["url", "environment", "query string", "https url"])
def test_an_unreachable_clickhouse_server_fails_cleanly_without_its_password(
    offline_secrets: Secrets, tmp_path: Path, where: str
) -> None:
    s, port = offline_secrets, closed_port()
    sink = {
        "url": f"http://default:{s.ch_url}@127.0.0.1:{port}",
        "environment": f"http://default@127.0.0.1:{port}",  # the password from the variable
        "query string": f"http://default@127.0.0.1:{port}/?password={s.ch_url}",  # refused
        "https url": f"https://default:{s.ch_url}@127.0.0.1:{port}/?verify=false",
    }[where]
    code = 2 if where == "query string" else 1
    run = gpu_pipeline(
        ["run", "--events", "20", "--progress", "never", "--sink", sink, "--checkpoint-dir",
         str(tmp_path / "ckpt")],
        environment(s),
    )  # fmt: skip
    assert_clean_error(run, code)
    assert_no_secret(s, run.output, f"run with the password in the {where}")
    query = gpu_pipeline(["query", "--sink", sink, "SELECT 1"], environment(s))
    assert_clean_error(query, code)
    assert_no_secret(s, query.output, f"query with the password in the {where}")


@pytest.mark.kafka
def test_doctor_shows_no_password(broker: SecureBroker, secrets: Secrets) -> None:
    sink = f"http://default:{secrets.ch_url}@127.0.0.1:{closed_port()}"
    outcome = gpu_pipeline(
        ["doctor", "--sink", sink, "--kafka", broker.sasl_ssl], environment(secrets), timeout_s=240
    )
    assert "Traceback" not in outcome.output, outcome.output
    assert "ClickHouse" in outcome.output and "Kafka" in outcome.output
    assert_no_secret(secrets, outcome.output, "doctor's output")


@pytest.mark.kafka
def test_generate_with_the_password_in_the_url_does_not_print_it(
    broker: SecureBroker, secrets: Secrets, topic: str
) -> None:
    outcome = gpu_pipeline(
        ["generate", "--events", "5", "--out", kafka_url(broker, topic, password=secrets.kafka)],
        environment(secrets, "none"),
    )
    assert outcome.code == 0, outcome.output
    assert_no_secret(secrets, outcome.output, "generate's output")


def test_a_malformed_source_url_does_not_show_its_password(offline_secrets: Secrets) -> None:
    s = offline_secrets
    outcome = gpu_pipeline(
        ["run", "--source", f"kafka://127.0.0.1/t?sasl.password={s.kafka}"],
        environment(s, "none"),
    )
    assert_clean_error(outcome, 2)
    assert_no_secret(s, outcome.output, "the error")

"""Kafka over TLS and SASL/SCRAM, against a real broker with secured listeners.

:func:`tests.kafka_broker.secure_broker` starts a broker of its own with a CA made here
(openssl, keytool): ``SASL_SSL`` with SCRAM users (alice: SCRAM-SHA-512, bob:
SCRAM-SHA-256) and ``SSL`` requiring a client certificate, plus a ``PLAINTEXT`` listener
that the tests use to read back what went through the secured ones.  Every client path of
the pipeline is driven over them: ``generate`` (admin client and producer), ``run``
(consumer, offset commits, committed-offset and watermark lookups), the dead-letter
producer; and the failures a user meets first (wrong password, missing CA, no password)
end fast with a message naming the cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from gpu_pipeline import schema
from gpu_pipeline.errors import ConfigError, SinkError, SourceError
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sources.kafka import KafkaSource
from gpu_pipeline.sources.kafka_producer import DeadLetterProducer, produce_synthetic
from gpu_pipeline.state.journal import BatchJournal
from tests.engine_harness import assert_tables_equal
from tests.kafka_broker import (
    SecureBroker,
    create_topic,
    secure_broker,
    secure_unavailable_reason,
    tls_tools_missing,
)
from tests.pipeline_runs import (
    REPO_ROOT,
    Job,
    committed_offsets,
    end_offsets,
    read_partitions,
    read_tables,
)
from tests.reference import reference_run

pytestmark = pytest.mark.kafka

PASSWORD_ENV = "GPU_PIPELINE_KAFKA_PASSWORD"
FAST_S = 20.0
"""A misconfigured client must fail well before the 30 s timeouts it would otherwise hit
(the admin client's metadata wait, a consumer's wait for its first assignment)."""


@pytest.fixture(scope="module")
def broker() -> SecureBroker:
    missing = tls_tools_missing()
    if missing:
        pytest.skip(missing)
    reason = secure_unavailable_reason()
    if reason and not os.environ.get("CI"):
        pytest.skip(f"no Kafka broker: {reason}")
    return secure_broker()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def sasl_url(broker: SecureBroker, topic: str, user: str = "alice", **overrides: str) -> str:
    """A ``kafka://`` URL for the SASL_SSL listener; a property set to ``""`` is left out."""
    properties = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": broker.users[user][0],
        "sasl.username": user,
        "ssl.ca.location": str(broker.tls.ca),
        **overrides,
    }
    query = urlencode({k: v for k, v in properties.items() if v}, safe="/")
    return f"kafka://{broker.sasl_ssl}/{topic}?{query}"


def mtls_properties(broker: SecureBroker) -> dict[str, str]:
    return {
        "security.protocol": "SSL",
        "ssl.ca.location": str(broker.tls.ca),
        "ssl.certificate.location": str(broker.tls.client_cert),
        "ssl.key.location": str(broker.tls.client_key),
    }


def alice(broker: SecureBroker) -> str:
    """alice's password (SCRAM-SHA-512)."""
    return broker.users["alice"][1]


def password_file(folder: Path, password: str) -> Path:
    """A secret file as Docker mounts one: the password and a trailing newline."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kafka_password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any GPU_PIPELINE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PIPELINE_")}
    if "GPU_PIPELINE_CACHE_DIR" in os.environ:
        env["GPU_PIPELINE_CACHE_DIR"] = os.environ["GPU_PIPELINE_CACHE_DIR"]
    env["COLUMNS"] = "400"  # rich wraps at the terminal width: keep messages on one line
    env.update(extra)
    return env


def cli(argv: list[str], env: dict[str, str], timeout_s: float = 180) -> tuple[int, str, float]:
    """Run ``gpu-pipeline ARGV``: exit status, stdout + stderr, seconds taken."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gpu_pipeline.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def new_job(folder: Path, source: str) -> Job:
    return Job(
        source=source,
        sink_dir=folder / "ch",
        checkpoint_dir=folder / "ckpt",
        logs=folder / "logs",
        database=unique("db"),
        group_id=unique("group"),
        batch_size=200,
    )


def run_job(job: Job, env: dict[str, str]) -> tuple[int, str, float]:
    return cli(job.argv()[3:], env)


# ---------------------------------------------------------------------------- round trips


def test_generate_and_run_over_sasl_ssl_equal_the_reference(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """``generate`` creates the topic and produces through SASL_SSL (password from a file);
    ``run --until-idle`` consumes and commits through it; the tables equal the reference
    model of what the topic holds (read back over PLAINTEXT)."""
    topic = unique("secure")
    url = sasl_url(broker, topic)
    env = clean_env(GPU_PIPELINE_KAFKA_PASSWORD_FILE=str(password_file(tmp_path, alice(broker))))

    code, output, _ = cli(
        ["generate", "--events", "1500", "--seed", "11", "--out", url, "--partitions", "3"], env
    )
    assert code == 0, output
    job = new_job(tmp_path, url)
    code, output, _ = run_job(job, env)
    assert code == 0, output

    records = read_partitions(broker.plaintext, topic, 3)
    assert sum(len(r) for r in records.values()) == 1500
    reference = reference_run(records, Semantics(), source=f"kafka:{topic}")
    tables = read_tables(job.sink_dir, job.database)
    assert_tables_equal(tables, reference.tables)
    assert tables["events"].num_rows > 1000 and tables["sessions"].num_rows > 0
    # The offsets were committed through the secured connection too.
    assert committed_offsets(broker.plaintext, job.group_id, topic, 3) == end_offsets(
        broker.plaintext, topic, 3
    )


def test_scram_sha_256_producer_and_a_mutual_tls_consumer(
    broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library paths: ``produce_synthetic`` as bob (SCRAM-SHA-256, password from the
    environment), then a :class:`KafkaSource` on the SSL listener with a client
    certificate reads every record, commits, and reports its lag from the watermarks."""
    topic = unique("mtls")
    monkeypatch.setenv(PASSWORD_ENV, broker.users["bob"][1])
    produced = produce_synthetic(sasl_url(broker, topic, "bob"), 600, 4, partitions=2)
    assert produced == 600
    monkeypatch.delenv(PASSWORD_ENV)

    source = KafkaSource(
        broker.ssl,
        topic,
        unique("group"),
        journal=BatchJournal(tmp_path / "journal"),
        resume=lambda partition: None,
        on_revoke=None,
        max_bytes=64 << 20,
        max_wait_ms=100,
        until_idle=True,
        idle_timeout_ms=1000,
        consumer_config=mtls_properties(broker),
    )
    try:
        batches = list(source.batches(250, {}))
        assert sum(len(b) for b in batches) == 600
        ends = {b.partition: b.next_offset for b in batches}
        source.commit(ends)
        assert source.lag() == dict.fromkeys(ends, 0)
    finally:
        source.close()
    assert ends == end_offsets(broker.plaintext, topic, 2)
    assert committed_offsets(broker.plaintext, source.group_id, topic, 2) == ends


def dead_letters() -> pa.Table:
    return pa.table(
        {
            "raw": pa.array([b"{not json", b""], pa.binary()),
            "error": ["record: invalid JSON", "record: empty record"],
            "source": ["kafka:clicks"] * 2,
            "partition": pa.array([1, 0], pa.int32()),
            "offset": pa.array([7, 3], pa.int64()),
            "seq": pa.array([0, 0], pa.int32()),
        },
        schema=schema.DEAD_LETTERS,
    )


def read_back(bootstrap: str, topic: str) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("reader"), "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    found: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                break
            assert error is None, error
            found.append((message.value() or b"", dict(message.headers() or [])))
    finally:
        consumer.close()
    return found


def test_the_dead_letter_producer_shares_the_source_urls_security(
    broker: SecureBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the source URL's properties, the dead-letter producer connects as the consumer
    does (its consumer-only properties are left out)."""
    dlq = unique("dlq")
    create_topic(broker.plaintext, dlq, 1)
    monkeypatch.setenv(PASSWORD_ENV, alice(broker))
    properties = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "ssl.ca.location": str(broker.tls.ca),
        "group.protocol": "consumer",  # a consumer property: must not reach the producer
    }
    producer = DeadLetterProducer(broker.sasl_ssl, dlq, properties)
    producer.send(dead_letters(), "clicks")
    producer.close()
    back = read_back(broker.plaintext, dlq)
    assert [value for value, _ in back] == [b"{not json", b""]
    assert back[0][1]["original_partition"] == b"1"
    assert back[0][1]["error"] == b"record: invalid JSON"


def test_run_with_a_dead_letter_topic_over_sasl_ssl(broker: SecureBroker, tmp_path: Path) -> None:
    topic, dlq = unique("secure"), unique("dlq")
    create_topic(broker.plaintext, dlq, 1)
    url = sasl_url(broker, topic)
    env = clean_env(GPU_PIPELINE_KAFKA_PASSWORD=alice(broker))
    code, output, _ = cli(["generate", "--events", "500", "--out", url, "--partitions", "1"], env)
    assert code == 0, output
    job = new_job(tmp_path, url)
    code, output, _ = cli([*job.argv()[3:], "--dead-letter-topic", dlq], env)
    assert code == 0, output
    dead = read_tables(job.sink_dir, job.database)["dead_letters"].num_rows
    assert dead > 0 and len(read_back(broker.plaintext, dlq)) == dead


# ---------------------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def filled_topic(broker: SecureBroker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A topic with a few records, produced over PLAINTEXT (the failing runs read it)."""
    topic = unique("filled")
    create_topic(broker.plaintext, topic, 1)
    produce_synthetic(f"kafka://{broker.plaintext}/{topic}", 50, 1)
    return topic


@pytest.mark.parametrize("command", ["generate", "run"])
def test_a_wrong_password_fails_fast_naming_authentication(
    broker: SecureBroker, filled_topic: str, tmp_path: Path, command: str
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    env = clean_env(GPU_PIPELINE_KAFKA_PASSWORD=wrong)
    code, output, took = failing(command, sasl_url(broker, filled_topic), env, tmp_path)
    assert code == 1, output
    assert "authentication failed" in output.lower(), output
    assert PASSWORD_ENV in output  # says where the password came from
    assert wrong not in output
    assert "Traceback" not in output
    assert took < FAST_S, f"took {took:.1f} s:\n{output}"


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize("trust", ["system store", "another CA"])
def test_a_client_without_the_ca_fails_fast_naming_tls_and_the_certificate(
    broker: SecureBroker, filled_topic: str, tmp_path: Path, command: str, trust: str
) -> None:
    ca = "" if trust == "system store" else str(broker.tls.other_ca)
    url = sasl_url(broker, filled_topic, **{"ssl.ca.location": ca})
    env = clean_env(GPU_PIPELINE_KAFKA_PASSWORD=alice(broker))
    code, output, took = failing(command, url, env, tmp_path)
    assert code == 1, output
    assert "TLS" in output and "certificate" in output, output
    assert "ssl.ca.location" in output  # the fix
    assert alice(broker) not in output
    assert took < FAST_S, f"took {took:.1f} s:\n{output}"


@pytest.mark.parametrize("command", ["generate", "run"])
def test_no_password_anywhere_is_a_config_error_naming_the_variables(
    broker: SecureBroker, filled_topic: str, tmp_path: Path, command: str
) -> None:
    code, output, _ = failing(command, sasl_url(broker, filled_topic), clean_env(), tmp_path)
    assert code == 2, output
    assert f"set {PASSWORD_ENV}," in output and f"{PASSWORD_ENV}_FILE" in output, output


def test_an_unreadable_password_file_names_the_variable(
    broker: SecureBroker, filled_topic: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-secret"
    env = clean_env(GPU_PIPELINE_KAFKA_PASSWORD_FILE=str(missing))
    code, output, _ = failing("run", sasl_url(broker, filled_topic), env, tmp_path)
    assert code == 2, output
    assert f"option '{PASSWORD_ENV}_FILE': cannot read the secret file '{missing}'" in output


def failing(command: str, url: str, env: dict[str, str], folder: Path) -> tuple[int, str, float]:
    if command == "generate":
        return cli(["generate", "--events", "10", "--out", url], env)
    return run_job(new_job(folder / "job", url), env)


def test_sources_and_sinks_raise_their_own_errors_in_process(
    broker: SecureBroker, filled_topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library raises what the CLI reports: SinkError (producer side), SourceError
    (consumer side) and ConfigError (no password)."""
    monkeypatch.setenv(PASSWORD_ENV, "not-it")
    url = sasl_url(broker, filled_topic)
    with pytest.raises(SinkError, match="authentication failed"):
        produce_synthetic(url, 5, 1)
    source = KafkaSource(
        broker.sasl_ssl,
        filled_topic,
        unique("group"),
        journal=BatchJournal(tmp_path / "journal"),
        resume=lambda partition: None,
        on_revoke=None,
        max_bytes=1 << 20,
        max_wait_ms=100,
        until_idle=True,
        idle_timeout_ms=500,
        consumer_config={
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "alice",
            "ssl.ca.location": str(broker.tls.ca),
        },
    )
    try:
        with pytest.raises(SourceError, match="authentication failed"):
            list(source.batches(10, {}))
    finally:
        source.close()
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ConfigError) as info:
        produce_synthetic(url, 5, 1)
    assert info.value.option == "out"


# ---------------------------------------------------------------------------- doctor


def test_doctor_probes_a_secured_broker_through_a_source_url(
    broker: SecureBroker, filled_topic: str, tmp_path: Path
) -> None:
    """``doctor --kafka kafka://…?security.protocol=SASL_SSL…`` connects as ``run`` would
    (password from the environment) and checks the topic; a wrong password shows as a
    failed Kafka check, without the password."""
    sink = f"chdb://{tmp_path / 'ch'}"
    url = sasl_url(broker, filled_topic)
    _, output, _ = cli(
        ["doctor", "--sink", sink, "--kafka", url],
        clean_env(GPU_PIPELINE_KAFKA_PASSWORD=alice(broker)),
    )
    assert f"topic {filled_topic!r} present" in output, output
    missing = sasl_url(broker, unique("absent"))
    _, output, _ = cli(
        ["doctor", "--sink", sink, "--kafka", missing],
        clean_env(GPU_PIPELINE_KAFKA_PASSWORD=alice(broker)),
    )
    assert "but no topic" in output, output
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    _, output, _ = cli(
        ["doctor", "--sink", sink, "--kafka", url], clean_env(GPU_PIPELINE_KAFKA_PASSWORD=wrong)
    )
    assert "present" not in output and wrong not in output, output
    assert "Traceback" not in output, output

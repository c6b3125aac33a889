"""The real Kafka broker behind the ``kafka``-marked tests.

Tests reach a broker in one of two ways: one that already runs, named by
``KAFKA_BOOTSTRAP`` (a developer's own broker, or one a CI script started), or
one this module starts on a free port through ``deploy/kafka/kafka.sh`` and
stops when the test process exits.  Either way the tests talk to genuine
Apache Kafka, so group rebalances, offset commits and broker restarts behave
as they will in production.

Topics are created explicitly with their partition count (the broker runs with
``auto.create.topics.enable=false``), so every test states the partitioning it
depends on.

:func:`secure_broker` starts a second broker (always this process's own) that also
listens with TLS: ``SASL_SSL`` with SCRAM users and ``SSL`` requiring a client
certificate, from a CA made here with openssl and keytool.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP"

# The first start also downloads the jars (tens of MB from Maven Central) before
# kafka.sh's own 90 s readiness wait, so the outer limit is generous.
_START_TIMEOUT_S = 600.0
_STOP_TIMEOUT_S = 60.0
# Below Linux's ephemeral range (32768+), so no outgoing client socket can take
# the chosen port between the check and the broker's bind.
_PORT_RANGE = (20000, 30000)

_started_port: int | None = None


class KafkaBrokerError(RuntimeError):
    """The broker could not be installed, started, restarted or stopped."""


def broker_bootstrap() -> str:
    """Return the bootstrap address of a running broker, starting one if needed.

    ``KAFKA_BOOTSTRAP`` wins when set, so a developer's broker or CI's is used
    as is.  Otherwise one broker per test process is started and stopped at
    interpreter exit; later calls return the same address.
    """
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        return external
    global _started_port
    if _started_port is None:
        port = free_port_pair()
        try:
            _kafka_sh("start", str(port), timeout_s=_START_TIMEOUT_S)
        except KafkaBrokerError:
            _kafka_sh_quietly("stop", str(port))
            raise
        _started_port = port
        atexit.register(stop_broker)
    return f"127.0.0.1:{_started_port}"


def owns_broker() -> bool:
    """Whether this process started the broker it uses (and so may restart it)."""
    return _started_port is not None


def restart_broker() -> None:
    """Stop the broker this process started and start it again on the same data.

    Raises
    ------
    KafkaBrokerError
        When this process started no broker: an external one (``KAFKA_BOOTSTRAP``)
        belongs to someone else and is never restarted from here.
    """
    if _started_port is None:
        raise KafkaBrokerError(
            "this process started no broker to restart; unset KAFKA_BOOTSTRAP to let "
            "tests start their own"
        )
    _kafka_sh("restart", str(_started_port), timeout_s=_START_TIMEOUT_S)


def stop_broker() -> None:
    """Stop the broker this process started and delete its data; no-op otherwise."""
    global _started_port
    if _started_port is None:
        return
    port, _started_port = _started_port, None
    _kafka_sh("stop", str(port), timeout_s=_STOP_TIMEOUT_S)


def unavailable_reason() -> str | None:
    """Say why no broker can be had here, or return None when one can.

    Meant for a skip reason on machines without Java or Maven; on CI, where both
    exist, a broker that fails to start is an error, not a skip.
    """
    if os.environ.get(BOOTSTRAP_ENV, "").strip():
        return None
    return _local_broker_reason()


def _local_broker_reason() -> str | None:
    """Why kafka.sh cannot start a broker here (no java, no jars and no mvn), or None."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        return "no java (JDK 17+) to run the Kafka broker; install one or set KAFKA_BOOTSTRAP"
    installed = (KAFKA_SH.parent / "lib" / ".installed").exists()
    if not installed and shutil.which("mvn") is None:
        return "no mvn to download the Kafka jars; install Maven or set KAFKA_BOOTSTRAP"
    return None


def free_port_pair(rng: random.Random | None = None, attempts: int = 200) -> int:
    """Pick a port P such that both P (broker) and P+1 (controller) are free."""
    rng = rng or random.Random()
    for _ in range(attempts):
        port = rng.randrange(*_PORT_RANGE)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise KafkaBrokerError(f"no free pair of ports in {_PORT_RANGE} after {attempts} tries")


def create_topic(bootstrap: str, name: str, partitions: int, *, timeout_s: float = 30.0) -> None:
    """Create ``name`` with ``partitions`` partitions (replication factor 1).

    Idempotent for the same partition count, so tests can share a topic name.
    Returns only once every partition has a leader: a producer started right
    after would otherwise get "unknown topic or partition".

    Raises
    ------
    ValueError
        When ``partitions`` is not positive.
    KafkaBrokerError
        When the topic exists with another partition count, or its partitions
        get no leader within ``timeout_s``.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    try:
        futures[name].result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    _wait_for_leaders(admin, name, partitions, timeout_s)


def _wait_for_leaders(admin: AdminClient, name: str, partitions: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        topic = admin.list_topics(topic=name, timeout=timeout_s).topics.get(name)
        if topic is not None and topic.error is None:
            if len(topic.partitions) != partitions:
                raise KafkaBrokerError(
                    f"topic {name!r} exists with {len(topic.partitions)} partitions, "
                    f"not {partitions}; pick another name or delete it"
                )
            if all(p.leader >= 0 and p.error is None for p in topic.partitions.values()):
                return
        if time.monotonic() > deadline:
            raise KafkaBrokerError(
                f"topic {name!r} has no leader for every partition after {timeout_s} s"
            )
        time.sleep(0.1)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kafka_sh(*args: str, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run kafka.sh and return its stdout; its diagnostics become the error message.

    ``env`` adds variables (KAFKA_EXTRA_PROPERTIES, KAFKA_SCRAM_FILE) to this process's.
    """
    try:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={**os.environ, **env} if env else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(f"kafka.sh {' '.join(args)} took over {timeout_s} s") from exc
    if done.returncode != 0:
        raise KafkaBrokerError(
            f"kafka.sh {' '.join(args)} failed with exit code {done.returncode}:\n"
            f"{done.stderr[-6000:]}"
        )
    return done.stdout


def _kafka_sh_quietly(*args: str) -> None:
    """Best-effort cleanup after a failed start, so no half-started JVM lingers."""
    with contextlib.suppress(KafkaBrokerError):
        _kafka_sh(*args, timeout_s=_STOP_TIMEOUT_S)


# ---------------------------------------------------------------------------- secured broker

_TLS_TOOLS = ("openssl", "keytool")
_STORE_PASSWORD = "broker-store-pass"
"""Protects the broker's own keystore and truststore (throwaway files in a temp folder)."""

_secure: SecureBroker | None = None


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and what it signed, as PEM files and Java PKCS12 stores."""

    folder: Path
    ca: Path
    """The CA certificate (what clients pass as ``ssl.ca.location``)."""
    client_cert: Path
    client_key: Path
    keystore: Path
    """The broker's key and certificate chain (PKCS12, ``_STORE_PASSWORD``)."""
    truststore: Path
    """The CA for verifying client certificates (PKCS12, ``_STORE_PASSWORD``)."""
    other_ca: Path
    """A CA that signed nothing here: trusting it alone must fail verification."""
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SecureBroker:
    """A broker with PLAINTEXT, SASL_SSL (SCRAM) and SSL (client certificate) listeners."""

    port: int
    sasl_ssl_port: int
    ssl_port: int
    tls: TlsFiles
    users: dict[str, tuple[str, str]] = field(repr=False)
    """User name -> (SCRAM mechanism, password)."""

    @property
    def plaintext(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_ssl(self) -> str:
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def ssl(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"


def tls_tools_missing() -> str | None:
    """Why no TLS material can be made here (openssl or keytool missing), else None."""
    missing = [tool for tool in _TLS_TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found: the TLS tests make their CA with openssl and "
            "the broker's truststore with keytool (Debian: apt-get install openssl "
            "openjdk-17-jdk-headless)"
        )
    return None


def secure_unavailable_reason() -> str | None:
    """Why :func:`secure_broker` cannot run here, or None.

    Like :func:`unavailable_reason`, but ``KAFKA_BOOTSTRAP`` does not help (this broker is
    always started here), and openssl and keytool are needed for its TLS files.
    """
    return tls_tools_missing() or _local_broker_reason()


def _tool(*argv: str, cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise KafkaBrokerError(f"{' '.join(argv[:3])} failed: {done.stderr[-2000:]}")


def _sign(folder: Path, name: str, ca: str, extensions: str, subject: str) -> None:
    """A P-256 key ``name.key`` and its certificate ``name.pem`` signed by ``ca``."""
    _tool(
        "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions)
    _tool(
        "openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
        f"{ca}.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile",
        f"{name}.ext", cwd=folder,
    )  # fmt: skip


def _make_ca(folder: Path, name: str, subject: str) -> None:
    _tool(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj",
        subject, "-addext", "basicConstraints=critical,CA:TRUE", "-addext",
        "keyUsage=critical,keyCertSign,cRLSign", cwd=folder,
    )  # fmt: skip


def make_tls_files(folder: Path) -> TlsFiles:
    """Make a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
    the broker's PKCS12 keystore (openssl) and truststore (keytool) in ``folder``.

    Raises
    ------
    KafkaBrokerError
        When openssl or keytool is missing or fails.
    """
    reason = tls_tools_missing()
    if reason:
        raise KafkaBrokerError(reason)
    folder.mkdir(parents=True, exist_ok=True)
    _make_ca(folder, "ca", "/CN=gpu-pipeline test CA")
    _make_ca(folder, "other-ca", "/CN=an unrelated CA")
    _sign(
        folder,
        "server",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        "/CN=localhost",
    )
    _sign(
        folder,
        "client",
        "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        "/CN=gpu-pipeline client",
    )
    _tool(
        "openssl", "pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key",
        "-certfile", "ca.pem", "-name", "broker", "-out", "broker.keystore.p12",
        "-passout", f"pass:{_STORE_PASSWORD}", cwd=folder,
    )  # fmt: skip
    _tool(
        "keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem",
        "-keystore", "broker.truststore.p12", "-storetype", "PKCS12",
        "-storepass", _STORE_PASSWORD, cwd=folder,
    )  # fmt: skip
    return TlsFiles(
        folder=folder,
        ca=folder / "ca.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        keystore=folder / "broker.keystore.p12",
        truststore=folder / "broker.truststore.p12",
        other_ca=folder / "other-ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
    )


def _secure_properties(port: int, sasl_ssl: int, ssl: int, tls: TlsFiles) -> str:
    listeners = (
        f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1},"
        f"SASL_SSL://127.0.0.1:{sasl_ssl},SSL://127.0.0.1:{ssl}"
    )
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return "\n".join(
        [
            f"listeners={listeners}",
            f"advertised.listeners={listeners}",
            "listener.security.protocol.map="
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL",
            "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}",
            f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={jaas}",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={tls.keystore}",
            f"ssl.keystore.password={_STORE_PASSWORD}",
            f"ssl.key.password={_STORE_PASSWORD}",
            "ssl.truststore.type=PKCS12",
            f"ssl.truststore.location={tls.truststore}",
            f"ssl.truststore.password={_STORE_PASSWORD}",
            "listener.name.ssl.ssl.client.auth=required",
            "",
        ]
    )


def free_port(avoid: Collection[int] = (), rng: random.Random | None = None) -> int:
    """A free port in the test range, not one of ``avoid``."""
    rng = rng or random.Random()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port not in avoid and _bindable(port):
            return port
    raise KafkaBrokerError(f"no free port in {_PORT_RANGE} after 200 tries")


def secure_broker() -> SecureBroker:
    """This process's broker with TLS listeners, started on first use and stopped at exit.

    Listeners: ``PLAINTEXT`` (for test setup), ``SASL_SSL`` with SCRAM users ``alice``
    (SCRAM-SHA-512) and ``bob`` (SCRAM-SHA-256), random passwords made here and stored at
    format time, and ``SSL`` that requires a client certificate signed by the test CA.
    ``KAFKA_BOOTSTRAP`` does not apply: a broker named there has no such listeners.

    Raises
    ------
    KafkaBrokerError
        When the TLS files cannot be made or the broker does not start.
    """
    global _secure
    if _secure is not None:
        return _secure
    folder = Path(tempfile.mkdtemp(prefix="gpu-pipeline-tls-"))
    atexit.register(shutil.rmtree, folder, True)
    tls = make_tls_files(folder / "tls")
    users = {
        "alice": ("SCRAM-SHA-512", secrets.token_urlsafe(18)),
        "bob": ("SCRAM-SHA-256", secrets.token_urlsafe(18)),
    }
    port = free_port_pair()
    sasl_ssl = free_port({port, port + 1})
    ssl = free_port({port, port + 1, sasl_ssl})
    extra = folder / "extra.properties"
    extra.write_text(_secure_properties(port, sasl_ssl, ssl, tls))
    scram = folder / "scram.txt"
    scram.write_text(
        "".join(f"{mech}=[name={name},password={pw}]\n" for name, (mech, pw) in users.items())
    )
    scram.chmod(0o600)
    env = {"KAFKA_EXTRA_PROPERTIES": str(extra), "KAFKA_SCRAM_FILE": str(scram)}
    try:
        _kafka_sh("start", str(port), timeout_s=_START_TIMEOUT_S, env=env)
    except KafkaBrokerError:
        _kafka_sh_quietly("stop", str(port))
        raise
    atexit.register(_kafka_sh_quietly, "stop", str(port))
    _secure = SecureBroker(port, sasl_ssl, ssl, tls, users)
    return _secure

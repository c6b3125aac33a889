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
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
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


def _kafka_sh(*args: str, timeout_s: float) -> str:
    """Run kafka.sh and return its stdout; its diagnostics become the error message."""
    try:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
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

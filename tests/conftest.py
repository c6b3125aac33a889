"""Shared fixtures: engines (CPU always, GPU where usable), markers that skip with a reason."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.backend.gpu import gpu_unavailable_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip hardware/service-marked tests that cannot run here, saying why."""
    gpu_reason = gpu_unavailable_reason()
    for item in items:
        if "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {gpu_reason}"))
        if "clickhouse_server" in item.keywords and not os.environ.get("CLICKHOUSE_URL"):
            item.add_marker(
                pytest.mark.skip(
                    reason="needs a ClickHouse server: set CLICKHOUSE_URL=http://user:pass@host:8123"
                )
            )


def _make_backend(name: str) -> Backend:
    if name == "cpu":
        from gpu_pipeline.backend.cpu import CpuBackend

        return CpuBackend()
    from gpu_pipeline.backend.gpu import GpuBackend

    return GpuBackend()


@pytest.fixture(
    scope="session",
    params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)],
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every engine this machine can run: the same test body runs on each."""
    yield _make_backend(request.param)


@pytest.fixture(scope="session")
def cpu_backend() -> Backend:
    """The CPU engine, the oracle of parity tests."""
    return _make_backend("cpu")


from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "tsan", deadline=None, max_examples=15, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The session's Kafka broker: $KAFKA_BOOTSTRAP, or one started here and stopped at exit."""
    from tests.kafka_broker import broker_bootstrap, unavailable_reason

    reason = unavailable_reason()
    if reason and not os.environ.get("CI"):
        pytest.skip(f"no Kafka broker: {reason}")
    return broker_bootstrap()

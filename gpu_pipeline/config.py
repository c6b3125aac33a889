"""Typed run configuration, read from defaults < config file < environment < command line.

Every option has one name (``batch_size``); on the command line it is ``--batch-size``, in
the environment ``GPU_PIPELINE_BATCH_SIZE``, in a TOML config file ``batch_size = 100000``.
A bad value fails at once with a :class:`ConfigError` naming the option.  Durations accept
integer milliseconds or a number with a unit (``500ms``, ``5s``, ``30min``, ``1h``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpu_pipeline.errors import ConfigError
from gpu_pipeline.semantics import Semantics

ENV_PREFIX = "GPU_PIPELINE_"
DEFAULT_DATA_DIR = "gpu_pipeline_data"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h|d)?\s*$")
_UNIT_MS = {
    None: 1,
    "ms": 1,
    "s": 1000,
    "sec": 1000,
    "m": 60_000,
    "min": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
}


def parse_duration_ms(option: str, value: Any) -> int:
    """Milliseconds from an int or a string such as ``"5s"``; ConfigError naming ``option``."""
    if isinstance(value, bool):
        raise ConfigError(option, f"expected a duration such as 5s or 500ms, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(option, "must not be negative")
        return value
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ConfigError(
            option, f"expected a duration such as 5s, 30min or 500 (ms), got {value!r}"
        )
    ms = float(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms != int(ms):
        raise ConfigError(option, f"{value!r} is not a whole number of milliseconds")
    return int(ms)


def positive_int(option: str, value: Any) -> int:
    """A positive integer (``1_000`` allowed in text); ConfigError naming ``option``."""
    try:
        number = int(str(value).replace("_", "")) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(option, f"expected a positive integer, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(option, f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(option: str, value: Any) -> int:
    """Zero or a positive integer; ConfigError naming ``option``."""
    if isinstance(value, str) and value.strip() == "0":
        return 0
    if value == 0 and not isinstance(value, bool):
        return 0
    return positive_int(option, value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(option: str, value: Any) -> str:
        text = str(value)
        if text not in choices:
            raise ConfigError(option, f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _boolean(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(option, f"expected true or false, got {value!r}")


def _source(option: str, value: Any) -> str:
    text = str(value)
    if text == "synthetic" or text.startswith("file:"):
        if text.startswith("file:") and len(text) == len("file:"):
            raise ConfigError(option, "file: needs a path, e.g. file:events.ndjson")
        return text
    if text.startswith("kafka://"):
        parts = urlsplit(text)
        if not parts.hostname or not parts.port or not parts.path.strip("/"):
            raise ConfigError(option, f"expected kafka://HOST:PORT/TOPIC, got {redact(text)!r}")
        return text
    raise ConfigError(
        option, f"expected synthetic, file:PATH or kafka://HOST:PORT/TOPIC, got {redact(text)!r}"
    )


def _sink(option: str, value: Any) -> str:
    text = str(value)
    if text.startswith("chdb://") and len(text) > len("chdb://"):
        return text
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if not parts.hostname:
            raise ConfigError(option, "expected http(s)://USER:PASS@HOST:PORT")
        return text
    raise ConfigError(
        option, f"expected chdb://PATH or http(s)://USER:PASS@HOST:PORT, got {redact(text)!r}"
    )


def _identifier(option: str, value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise ConfigError(option, f"must be a plain identifier (letters, digits, _), got {value!r}")
    return text


def _job_name(option: str, value: Any) -> str:
    text = str(value)
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ConfigError(option, f"must be 1-64 letters, digits, '.', '_' or '-', got {value!r}")
    return text


def _port(option: str, value: Any) -> int:
    port = non_negative_int(option, value)
    if port > 65535:
        raise ConfigError(option, f"expected a TCP port 1-65535 (0 = off), got {value!r}")
    return port


def _scheduler(option: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        return ""
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    if parts.scheme not in ("tcp", "tls", "ws", "wss", "ucx") or not parts.hostname:
        raise ConfigError(
            option, f"expected a dask scheduler address tcp://HOST:PORT, got {value!r}"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise ConfigError(
            option, f"expected a dask scheduler address tcp://HOST:PORT, got {value!r}"
        )
    return parts.geturl()


def _text(option: str, value: Any) -> str:
    return str(value)


_SECRET_QUERY = re.compile(r"([?&][^=&]*(?:password|secret)[^=&]*=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """A URL with its password, and any ``?...password=``/``secret=`` query value (Kafka
    client properties), replaced by ``***`` (never print secrets)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        url = parts._replace(netloc=netloc).geturl()
    return _SECRET_QUERY.sub(r"\1***", url)


@dataclass(frozen=True)
class RunConfig:
    """Everything ``gpu-pipeline run`` needs; see the README's configuration table."""

    source: str = "synthetic"
    sink: str = f"chdb://{DEFAULT_DATA_DIR}/clickhouse"
    database: str = "clickstream"
    engine: str = "auto"
    decoder: str = "native"
    batch_size: int = 100_000
    events: int = 1_000_000
    seed: int = 42
    threads: int = 0
    checkpoint_dir: str = f"{DEFAULT_DATA_DIR}/checkpoints"
    checkpoint_interval_ms: int = 5_000
    fresh: bool = False
    progress: str = "auto"
    max_out_of_orderness_ms: int = 5_000
    allowed_lateness_ms: int = 60_000
    dedup_ttl_ms: int = 3_600_000
    session_gap_ms: int = 1_800_000
    max_future_skew_ms: int = 3_600_000
    job_id: str = ""
    group_id: str = ""
    until_idle: bool = False
    idle_timeout_ms: int = 5_000
    max_batch_bytes: int = 64 << 20
    max_batch_wait_ms: int = 500
    dead_letter_topic: str = ""
    idle_partition_timeout_ms: int = 0
    metrics_port: int = 0
    workers: int = 0
    scheduler: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def semantics(self) -> Semantics:
        """The SPEC §2 parameters of this run."""
        return Semantics(
            max_out_of_orderness_ms=self.max_out_of_orderness_ms,
            allowed_lateness_ms=self.allowed_lateness_ms,
            dedup_ttl_ms=self.dedup_ttl_ms,
            session_gap_ms=self.session_gap_ms,
            max_future_skew_ms=self.max_future_skew_ms,
        )


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "source": _source,
    "sink": _sink,
    "database": _identifier,
    "engine": _choice(("auto", "cpu", "gpu")),
    "decoder": _choice(("native", "arrow")),
    "batch_size": positive_int,
    "events": non_negative_int,
    "seed": non_negative_int,
    "threads": non_negative_int,
    "checkpoint_dir": _text,
    "checkpoint_interval_ms": parse_duration_ms,
    "fresh": _boolean,
    "progress": _choice(("auto", "always", "never")),
    "max_out_of_orderness_ms": parse_duration_ms,
    "allowed_lateness_ms": parse_duration_ms,
    "dedup_ttl_ms": parse_duration_ms,
    "session_gap_ms": parse_duration_ms,
    "max_future_skew_ms": parse_duration_ms,
    "job_id": _job_name,
    "group_id": _text,
    "until_idle": _boolean,
    "idle_timeout_ms": parse_duration_ms,
    "max_batch_bytes": positive_int,
    "max_batch_wait_ms": parse_duration_ms,
    "dead_letter_topic": _text,
    "idle_partition_timeout_ms": parse_duration_ms,
    "metrics_port": _port,
    "workers": non_negative_int,
    "scheduler": _scheduler,
}
OPTION_NAMES: tuple[str, ...] = tuple(_PARSERS)
_ALIASES = {
    "max_out_of_orderness": "max_out_of_orderness_ms",
    "allowed_lateness": "allowed_lateness_ms",
    "dedup_ttl": "dedup_ttl_ms",
    "session_gap": "session_gap_ms",
    "max_future_skew": "max_future_skew_ms",
    "checkpoint_interval": "checkpoint_interval_ms",
    "idle_timeout": "idle_timeout_ms",
    "max_batch_wait": "max_batch_wait_ms",
    "idle_partition_timeout": "idle_partition_timeout_ms",
}


def canonical_option(name: str) -> str:
    """``--batch-size`` / ``BATCH_SIZE`` / ``batch-size`` -> ``batch_size``; aliases resolved."""
    key = name.strip().lstrip("-").lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _apply(values: dict[str, Any], updates: Mapping[str, Any], origin: str) -> None:
    for raw_name, value in updates.items():
        name = canonical_option(raw_name)
        if name not in _PARSERS:
            raise ConfigError(
                raw_name, f"unknown option (from {origin}); known: {', '.join(OPTION_NAMES)}"
            )
        values[name] = _PARSERS[name](name, value)


def load_config(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Resolve the run configuration: defaults < config file < environment < command line.

    ``cli`` holds only the options the user gave (``None`` values are ignored).
    """
    values: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError("config", f"config file {str(file)!r} does not exist")
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{file} is not valid TOML: {exc}") from None
        data.pop("config", None)
        _apply(values, data, f"config file {file}")
    from_env = {
        key[len(ENV_PREFIX) :]: value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
        and key != f"{ENV_PREFIX}CONFIG"
        and canonical_option(key[len(ENV_PREFIX) :]) in _PARSERS
    }
    _apply(values, from_env, "environment")
    _apply(values, {k: v for k, v in (cli or {}).items() if v is not None}, "command line")
    config = replace(RunConfig(), **values)
    config.semantics()  # validates the semantic parameters together
    return config


def config_fields() -> list[tuple[str, Any]]:
    """(option, default) pairs for documentation and ``--help``."""
    return [(f.name, f.default) for f in fields(RunConfig) if f.name != "extra"]

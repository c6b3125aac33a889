"""Secrets from the environment: a variable ``NAME``, or a file named by ``NAME_FILE``.

The ``_FILE`` form is the Docker/Kubernetes secrets convention (``/run/secrets/…``): the
secret never appears in a command line, a URL, a config file or ``docker inspect``.

* ``NAME`` set (and not empty): its value, surrounding whitespace stripped.
* ``NAME_FILE`` set: the file's text, surrounding whitespace (a trailing newline) stripped.
* both set: an error, as the two could disagree; neither: ``None``.

Errors are :class:`~gpu_pipeline.errors.ConfigError` naming the variable, and never carry
the secret itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gpu_pipeline.errors import ConfigError

KAFKA_PASSWORD = "GPU_PIPELINE_KAFKA_PASSWORD"
"""The SASL password of the Kafka clients (``sasl.password``), when the URL has none."""
KAFKA_SSL_KEY_PASSWORD = "GPU_PIPELINE_KAFKA_SSL_KEY_PASSWORD"
"""The password of an encrypted client key (``ssl.key.password``), when the URL has none."""
CLICKHOUSE_PASSWORD = "GPU_PIPELINE_CLICKHOUSE_PASSWORD"
"""The ClickHouse server password, when the sink URL has none."""


def read_secret(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret ``name`` from ``$NAME`` or from the file ``$NAME_FILE``; None if unset.

    Raises
    ------
    ConfigError
        Naming ``NAME_FILE`` when its file cannot be read, is not UTF-8 text or is empty,
        and naming ``NAME`` when both variables are set.
    """
    env = os.environ if environ is None else environ
    file_var = f"{name}_FILE"
    value = env.get(name, "").strip()
    path = env.get(file_var, "").strip()
    if value and path:
        raise ConfigError(name, f"both {name} and {file_var} are set; set only one of them")
    if value:
        return value
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(
            file_var, f"cannot read the secret file {path!r}: {exc.strerror or exc}"
        ) from None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(file_var, f"the secret file {path!r} is not UTF-8 text") from None
    if not text:
        raise ConfigError(file_var, f"the secret file {path!r} is empty")
    return text


__all__ = ["CLICKHOUSE_PASSWORD", "KAFKA_PASSWORD", "KAFKA_SSL_KEY_PASSWORD", "read_secret"]

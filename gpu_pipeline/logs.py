"""What the command line says while it works: rich text for people, or one JSON object per
line (``--log-format json``) for log collectors (Loki, Elasticsearch, CloudWatch, …).

Every status line of the CLI goes through :func:`say` and every library log record through
the standard ``logging`` tree, so in JSON mode nothing but JSON reaches stderr: a record is
``{"ts": …, "level": …, "logger": …, "message": …}`` plus the fields the call site gave
(``job``, ``source``, ``option``, the run's counters…).  Progress bars are off in JSON
mode, and ``run`` prints its summary as one JSON object on stdout instead of a table.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

FORMATS = ("text", "json")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_log = logging.getLogger("gpu_pipeline")
_format = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        payload: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def configure(log_format: str, level: str = "info") -> None:
    """Send every log record to stderr in ``log_format`` (``text`` or ``json``)."""
    global _format
    _format = log_format
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ours_or_warnings)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("gpu_pipeline").setLevel(level.upper())
    if log_format == "json":
        # dask configures its own text handlers at import: route them through ours
        for name in ("distributed", "dask", "bokeh", "tornado"):
            library = logging.getLogger(name)
            library.handlers = []
            library.propagate = True


def _ours_or_warnings(record: logging.LogRecord) -> bool:
    """Libraries (dask logs every connection at INFO) speak only when something is wrong."""
    return record.name.startswith("gpu_pipeline") or record.levelno >= logging.WARNING


def is_json() -> bool:
    """Whether the CLI speaks JSON (``--log-format json``)."""
    return _format == "json"


def say(
    message: str, *, level: int = logging.INFO, markup: str | None = None, **fields: Any
) -> None:
    """A status line of the CLI: printed for people (``markup``: the rich text, default the
    message), or logged as one JSON record with ``fields``."""
    if is_json():
        _log.log(level, message, extra=fields)
    else:
        Console(stderr=True).print(markup if markup is not None else message)


def emit_json(payload: dict[str, Any]) -> None:
    """A command's result as one JSON line on stdout (JSON mode's summary)."""
    sys.stdout.write(json.dumps(payload, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()

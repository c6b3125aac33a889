"""Which job a database belongs to: the ``pipeline_jobs`` table.

A database holds the output of one job (docs/semantics.md, "Jobs").  The first run of a job
records the job there before it writes anything; later runs read it back to refuse a second,
different job (its rows would mix with the first one's and be counted twice by every
dashboard), and to notice a database that was dropped or emptied by hand while a checkpoint
still says the job wrote to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gpu_pipeline.sinks import ddl
from gpu_pipeline.sinks.base import Sink
from gpu_pipeline.sinks.ddl import JOBS_TABLE


@dataclass(frozen=True)
class JobRecord:
    """A job as recorded in a database."""

    job_id: str
    identity: dict[str, Any]
    cuts: str
    """How the job's first run cut batches and checkpoints (a rerun must cut the same)."""


def recorded_jobs(sink: Sink, db: str) -> list[JobRecord]:
    """Every job recorded in database ``db`` (the sink must be open)."""
    rows = sink.query(
        f"SELECT job_id, identity, cuts FROM {db}.{JOBS_TABLE} FINAL ORDER BY recorded_at"
    ).to_pylist()
    return [JobRecord(str(r["job_id"]), _json(r["identity"]), str(r["cuts"])) for r in rows]


def record_job(sink: Sink, db: str, job_id: str, identity: dict[str, Any], cuts: str) -> None:
    """Record ``job_id`` as the owner of ``db`` (idempotent: one row per job)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    sink.query(
        f"INSERT INTO {db}.{JOBS_TABLE} (job_id, identity, cuts, recorded_at) VALUES "
        f"({ddl.quote_string(job_id)}, {ddl.quote_string(text)}, {ddl.quote_string(cuts)}, "
        "now64(3))"
    )


def row_counts(sink: Sink, db: str, tables: list[str]) -> dict[str, int]:
    """``count()`` of each table in ``db``."""
    union = " UNION ALL ".join(
        f"SELECT {ddl.quote_string(t)} AS name, count() AS n FROM {db}.{t}" for t in tables
    )
    return {str(r["name"]): int(r["n"]) for r in sink.query(union).to_pylist()}


def _json(value: Any) -> dict[str, Any]:
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

"""What a job is: the identity that names its checkpoints, insert tokens and consumer group.

A job is *what is read* (the source), *where it is written* (the sink and the database) and
*how it is computed* (every SPEC §2 parameter).  Two runs that differ in any of these are
different jobs: they never share a checkpoint folder, an insert token, a Kafka consumer
group or a static member id.  The batch size is not part of it: the tables do not depend on
it (SPEC §2), only the replay of an interrupted run does, which the checkpoint checks.

The identity never holds a secret: sink URLs are reduced to scheme, user, host and port
(chdb folders to their absolute path), Kafka URLs to bootstrap and topic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpu_pipeline.config import RunConfig

DEFAULT_GROUP_PREFIX = "gpu-pipeline-"


def job_identity(config: RunConfig) -> dict[str, Any]:
    """The secret-free description of ``config``'s job (what the job id is a hash of)."""
    identity: dict[str, Any] = {"source": _source_identity(config)}
    identity["sink"] = sink_identity(config)
    identity["database"] = config.database
    identity["semantics"] = asdict(config.semantics())
    return identity


def job_id(config: RunConfig) -> str:
    """The job's id: ``--job-id`` when given, else 16 hex digits of the hash of
    :func:`job_identity`."""
    if config.job_id:
        return config.job_id
    text = json.dumps(job_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def consumer_group(config: RunConfig, job: str) -> str:
    """The Kafka consumer group: ``--group-id`` when given, else one group per job."""
    return config.group_id or f"{DEFAULT_GROUP_PREFIX}{job}"


def sink_identity(config: RunConfig) -> str:
    """The sink without secrets: ``chdb:///abs/path`` or ``http://user@host:port``."""
    from gpu_pipeline.sinks.clickhouse import parse_sink_url

    return parse_sink_url(config.sink, config.database).safe_url


def identity_conflict(named: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """What differs between a job named with ``--job-id`` and the job first run under that
    name, other than where it writes; None when they are the same job."""
    for key in ("source", "semantics"):
        if json.dumps(named.get(key), sort_keys=True, default=str) != json.dumps(
            recorded.get(key), sort_keys=True, default=str
        ):
            return key
    return None


def describe_identity(identity: dict[str, Any]) -> str:
    """One line for error messages: source, sink and database of a job."""
    source = identity.get("source", {})
    where = source.get("source", "?") if isinstance(source, dict) else str(source)
    return f"source {where}, sink {identity.get('sink', '?')}, database {identity.get('database')}"


def _source_identity(config: RunConfig) -> dict[str, Any]:
    source = config.source
    if source == "synthetic":
        return {"source": source, "events": config.events, "seed": config.seed}
    if source.startswith("file:"):
        path = Path(source[len("file:") :])
        identity: dict[str, Any] = {"source": source}
        if path.is_file():
            stat = path.stat()
            identity.update(path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        elif path.exists() or any(ch in str(path) for ch in "*?["):
            # a directory or glob: every partition's file, in partition order
            from gpu_pipeline.errors import SourceError
            from gpu_pipeline.sources.files import partition_files

            try:
                files = partition_files(path)
            except SourceError:
                return identity
            identity["files"] = [
                [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
            ]
        return identity
    if source.startswith("kafka://"):
        from gpu_pipeline.sources.kafka import parse_kafka_url

        bootstrap, topic, _ = parse_kafka_url(source, "source")
        # the query string may carry client secrets (SASL passwords): never part of the id
        return {"source": f"kafka://{bootstrap}/{topic}", "group_id": config.group_id}
    return {"source": source}


__all__ = ["consumer_group", "describe_identity", "job_id", "job_identity", "sink_identity"]

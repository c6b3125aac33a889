"""Run benchmarks/peers/chdb_job.sql on an NDJSON file into a chdb folder; print a summary.

    python benchmarks/peers/chdb_job.py FILE FOLDER

The summary (one JSON line) is what bench_peers.py compares across contenders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("chdb_job.sql")

SUMMARY = {
    "events": "SELECT count() FROM peer.events",
    "sessions": "SELECT count() FROM peer.sessions",
    "traffic_events": "SELECT sum(events) FROM peer.traffic_1m",
    "traffic_users": "SELECT sum(users) FROM peer.traffic_1m",
    "product_rows": "SELECT count() FROM peer.product_5m",
    "product_views": "SELECT sum(views) FROM peer.product_5m",
    "revenue": "SELECT round(sum(revenue), 2) FROM peer.traffic_1m",
}


def main() -> None:
    source, folder = Path(sys.argv[1]).resolve(), sys.argv[2]
    from chdb import session

    db = session.Session(folder)
    try:
        text = SCRIPT.read_text().replace("{path}", str(source))
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
        for statement in "\n".join(lines).split(";"):
            if statement.strip():
                db.query(statement)
        summary = {
            name: float(db.query(sql, "CSV").bytes().decode().strip() or 0)
            for name, sql in SUMMARY.items()
        }
    finally:
        db.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

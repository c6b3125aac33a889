"""Render ``initdb/01-schema.sql``: the database, tables and views the pipeline creates.

The SQL comes from :func:`gpu_pipeline.sinks.ddl.schema_statements`, the very statements a
run executes when it opens its sink, so the server's schema cannot drift from the code:
``tests/test_deploy.py`` fails when the committed file differs from a fresh rendering.

    .venv/bin/python deploy/clickhouse/render_schema.py           # rewrite the file
    .venv/bin/python deploy/clickhouse/render_schema.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
OUTPUT = HERE / "initdb" / "01-schema.sql"
DATABASE = "clickstream"
COMMAND = ".venv/bin/python deploy/clickhouse/render_schema.py"

HEADER = f"""\
-- gpu-pipeline: database `{DATABASE}`, its tables and its dashboard views.
-- Generated from gpu_pipeline.sinks.ddl.schema_statements: do not edit by hand.
-- Regenerate with: {COMMAND}
-- Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE VIEW): the server's
-- entrypoint may run this file at every start, and the pipeline runs the same statements.
"""


def render(database: str = DATABASE) -> str:
    """The init SQL for ``database``: one statement per paragraph, each ending with ``;``."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from gpu_pipeline.sinks.ddl import schema_statements

    return HEADER + "".join(f"\n{statement};\n" for statement in schema_statements(database))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the file is stale"
    )
    args = parser.parse_args(argv)
    fresh = render()
    current = OUTPUT.read_text() if OUTPUT.is_file() else None
    if args.check:
        if current != fresh:
            print(f"{OUTPUT.relative_to(REPO_ROOT)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != fresh:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(fresh)
        print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

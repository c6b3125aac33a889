"""Rendering query results for people (a terminal table) and for scripts (CSV, NDJSON)."""

from __future__ import annotations

import io
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
from rich.console import Console
from rich.table import Table

MAX_TABLE_ROWS = 1000


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, float):
        return (
            f"{value:,.6g}"
            if abs(value) >= 1e15
            else f"{value:,.2f}"
            if value != int(value)
            else f"{value:,.0f}"
        )
    if isinstance(value, int):
        return f"{value:,}" if abs(value) < 10**12 else str(value)
    return str(value)


def render_table(table: pa.Table, console: Console | None = None, title: str | None = None) -> None:
    """Print ``table`` as a readable terminal table (numbers right-aligned)."""
    console = console or Console()
    view = Table(title=title, show_header=True, header_style="bold")
    for field in table.schema:
        numeric = (
            pa.types.is_integer(field.type)
            or pa.types.is_floating(field.type)
            or pa.types.is_decimal(field.type)
        )
        view.add_column(field.name, justify="right" if numeric else "left")
    for row in table.slice(0, MAX_TABLE_ROWS).to_pylist():
        view.add_row(*(_cell(row[name]) for name in table.column_names))
    console.print(view)
    suffix = f" (first {MAX_TABLE_ROWS} shown)" if table.num_rows > MAX_TABLE_ROWS else ""
    console.print(f"{table.num_rows:,} row(s){suffix}", style="dim")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(table: pa.Table, out: Any = None) -> None:
    """CSV with a header row, for scripts."""
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    (out or sys.stdout).write(buffer.getvalue().decode("utf-8", errors="backslashreplace"))


def write_json(table: pa.Table, out: Any = None) -> None:
    """One JSON object per row (NDJSON), for scripts."""
    stream = out or sys.stdout
    for row in table.to_pylist():
        stream.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")

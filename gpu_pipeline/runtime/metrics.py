"""Run counters, the live progress display and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

COUNTERS = (
    "records",
    "events",
    "dead_letters",
    "future_ts",
    "duplicates",
    "late",
    "on_time",
    "sessions",
    "window_rows",
    "batches",
)


@dataclass
class RunMetrics:
    """Counters of a run (restored from the checkpoint, so they survive restarts)."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    started: float = field(default_factory=time.perf_counter)
    records_this_process: int = 0

    def add(self, **values: int) -> None:
        """Add to counters by name."""
        for key, value in values.items():
            self.counters[key] = self.counters.get(key, 0) + value

    @property
    def elapsed_s(self) -> float:
        """Seconds since this process started the run."""
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        """Records per second processed by this process."""
        return self.records_this_process / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ProgressDisplay:
    """A progress bar on a terminal (``auto``), always, or never; silent otherwise."""

    def __init__(self, mode: str, total: int | None, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        enabled = mode == "always" or (mode == "auto" and sys.stderr.isatty())
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>12}"),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("records", total=total, rate="", detail="")

    def __enter__(self) -> ProgressDisplay:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.stop()

    @property
    def enabled(self) -> bool:
        """Whether anything is displayed (callers skip building details otherwise)."""
        return self._progress is not None

    def update(self, metrics: RunMetrics, detail: str = "") -> None:
        """Refresh the bar with the current counters."""
        if self._progress:
            self._progress.update(
                self._task,
                completed=metrics.counters["records"],
                rate=f"{metrics.rate:,.0f} rec/s",
                detail=detail,
            )


def summary_table(metrics: RunMetrics, title: str) -> Table:
    """The end-of-run summary as a terminal table."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    c = metrics.counters
    rows = [
        ("records in", c["records"]),
        ("valid events", c["events"]),
        ("dead letters", c["dead_letters"]),
        ("  of which far-future ts (guard)", c.get("future_ts", 0)),
        ("duplicates dropped", c["duplicates"]),
        ("late events (side output)", c["late"]),
        ("on-time events", c["on_time"]),
        ("sessions written", c["sessions"]),
        ("window rows written", c["window_rows"]),
        ("batches", c["batches"]),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:,}")
    table.add_row("elapsed (this process)", f"{metrics.elapsed_s:,.2f} s")
    table.add_row("records/s (this process)", f"{metrics.rate:,.0f}")
    return table

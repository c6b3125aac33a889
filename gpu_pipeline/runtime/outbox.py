"""Output rows waiting for the next checkpoint, per partition and table.

ClickHouse is fastest with few large inserts: every insert is a part to write and later to
merge, and an insert has a fixed cost of its own.  So a micro-batch's rows are not written
at once; they wait here and each checkpoint writes one block per table for each partition
it checkpoints, covering every batch since the partition's previous checkpoint.
"""

from __future__ import annotations

import pyarrow as pa


class Outbox:
    """Pending output rows, in arrival order, by partition and table."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[str, list[pa.Table]]] = {}
        self._rows = 0

    def add(self, partition: int, tables: dict[str, pa.Table]) -> None:
        """Queue a batch's (or a flush's) rows for ``partition``."""
        pending = self._tables.setdefault(partition, {})
        for name, rows in tables.items():
            if rows.num_rows:
                pending.setdefault(name, []).append(rows)
                self._rows += rows.num_rows

    def take(self, partition: int) -> dict[str, pa.Table]:
        """Remove and return ``partition``'s rows, one table each, batches concatenated."""
        pending = self._tables.pop(partition, {})
        taken = {name: pa.concat_tables(parts) for name, parts in pending.items()}
        self._rows -= sum(t.num_rows for t in taken.values())
        return taken

    def drop(self, partition: int) -> None:
        """Forget ``partition``'s rows (it left this process without a checkpoint)."""
        self.take(partition)

    def rows_of(self, partition: int) -> int:
        """Rows waiting for ``partition``."""
        return sum(t.num_rows for parts in self._tables.get(partition, {}).values() for t in parts)

    @property
    def rows(self) -> int:
        """Rows waiting, over every partition and table."""
        return self._rows

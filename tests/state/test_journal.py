"""The batch journal keeps every acknowledged cut across a crash and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpu_pipeline.state.journal import BatchJournal


def test_cuts_survive_reopening(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    for first, nxt in [(0, 100), (100, 250), (250, 251)]:
        journal.record(3, first, nxt)
    journal.record(0, 7, 9)
    journal.close()

    reopened = BatchJournal(tmp_path)
    assert reopened.planned(3, 0) == [100, 250, 251]
    assert reopened.planned(0, 7) == [9]
    assert reopened.planned(1, 0) == []


def test_planned_follows_the_chain_from_the_resume_position(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    for first, nxt in [(0, 10), (10, 20), (20, 35), (35, 40)]:
        journal.record(0, first, nxt)
    assert journal.planned(0, 10) == [20, 35, 40]
    assert journal.planned(0, 40) == []
    # A position inside a journaled batch starts no chain: there is no cut to reproduce.
    assert journal.planned(0, 15) == []


def test_a_later_cut_from_the_same_start_wins(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    journal.record(0, 0, 10)
    journal.record(0, 10, 20)
    journal.record(0, 10, 30)  # replayed later with a different cut: its outputs are newest
    journal.record(0, 30, 31)
    assert journal.planned(0, 0) == [10, 30, 31]


def test_truncate_forgets_checkpointed_batches_durably(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    for first, nxt in [(0, 10), (10, 20), (20, 30)]:
        journal.record(1, first, nxt)
    journal.truncate(1, 20)
    assert journal.planned(1, 0) == []
    assert journal.planned(1, 20) == [30]
    journal.record(1, 30, 45)  # appends still work after the atomic rewrite
    journal.close()

    reopened = BatchJournal(tmp_path)
    assert reopened.planned(1, 20) == [30, 45]
    assert reopened.planned(1, 10) == []
    assert not list(tmp_path.glob("*.tmp"))


def test_truncate_keeps_batches_that_end_after_the_checkpoint(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    journal.record(0, 0, 10)
    journal.record(0, 10, 20)
    journal.truncate(0, 15)
    assert journal.planned(0, 10) == [20]


@pytest.mark.parametrize(
    "tail",
    [b"30 4", b"30 40 0000", b"\x00\x00\x00\x00", b"30 40 deadbeef\n", b"garbage\n"],
    ids=["torn-number", "torn-crc", "zero-fill", "bad-crc", "garbage-line"],
)
def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path: Path, tail: bytes) -> None:
    journal = BatchJournal(tmp_path)
    journal.record(2, 0, 10)
    journal.record(2, 10, 30)
    journal.close()
    path = tmp_path / "p2.journal"
    with open(path, "ab") as out:
        out.write(tail)

    reopened = BatchJournal(tmp_path)
    assert reopened.planned(2, 0) == [10, 30]
    reopened.record(2, 30, 50)  # lands on a clean line, not glued to the torn one
    reopened.close()
    assert BatchJournal(tmp_path).planned(2, 0) == [10, 30, 50]


def test_a_process_killed_mid_append_leaves_a_readable_journal(tmp_path: Path) -> None:
    """A real crash: a child appends forever and is SIGKILLed; every acknowledged cut survives."""
    acknowledged = tmp_path / "acknowledged"
    child = textwrap.dedent(
        f"""
        import sys
        from gpu_pipeline.state.journal import BatchJournal
        journal = BatchJournal({str(tmp_path / "journal")!r})
        first = 0
        while True:
            journal.record(0, first, first + 7)
            first += 7
            with open({str(acknowledged)!r}, "w") as out:
                out.write(str(first))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=Path(__file__).parents[2])
    try:
        while not acknowledged.exists() or int(acknowledged.read_text() or 0) < 70:
            assert proc.poll() is None, "the journaling child died by itself"
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait(timeout=30)
    last_acknowledged = int(acknowledged.read_text() or 0)
    cuts = BatchJournal(tmp_path / "journal").planned(0, 0)
    assert cuts == list(range(7, cuts[-1] + 1, 7))
    assert cuts[-1] >= last_acknowledged


def test_bad_ranges_are_refused(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path)
    with pytest.raises(ValueError):
        journal.record(0, 5, 5)
    with pytest.raises(ValueError):
        journal.record(0, -1, 3)
    with pytest.raises(ValueError):
        journal.planned(-1, 0)


def test_files_are_private_to_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "journal"
    journal = BatchJournal(target)
    journal.record(0, 0, 1)
    assert sorted(os.listdir(target)) == ["p0.journal"]

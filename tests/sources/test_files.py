"""``file:`` sources: line numbering, blank lines, compression, Parquet, resumption, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_pipeline.decode.base import TypedBatch
from gpu_pipeline.decode.json import ArrowJsonDecoder
from gpu_pipeline.errors import ConfigError, SourceError
from gpu_pipeline.sources import files
from gpu_pipeline.sources.base import RawBatch
from gpu_pipeline.sources.files import FileSource
from gpu_pipeline.sources.synthetic import generate_arrow, generate_ndjson_chunks

TEXT = b'{"a":0}\n\n{"a":2}\r\n   \t\n  {"a":4}\nnot json\n\r\n{"a":7}'
"""Records at lines 0, 2, 4, 5 and 7; lines 1, 3 and 6 are blank; no final newline."""
EXPECTED = [(0, b'{"a":0}'), (2, b'{"a":2}'), (4, b'  {"a":4}'), (5, b"not json"), (7, b'{"a":7}')]


def records(batches: list[RawBatch]) -> list[tuple[int, bytes]]:
    return [(int(b.offsets[i]), b.record(i)) for b in batches for i in range(len(b))]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix.lower() == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["x.ndjson", "x.jsonl", "x.json", "x.ndjson.gz", "X.JSONL.GZ"])
def test_records_keep_their_line_numbers_and_blank_lines_are_skipped(
    tmp_path: Path, name: str
) -> None:
    source = FileSource(f"file:{write(tmp_path / name, TEXT)}")
    batches = list(source.batches(100, {}))
    assert records(batches) == EXPECTED
    assert batches[-1].next_offset == 8
    assert all(b.partition == 0 and b.source == source.name for b in batches)


@pytest.mark.parametrize("read_bytes", [1, 3, 7, 64])
def test_block_boundaries_do_not_change_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_bytes: int
) -> None:
    monkeypatch.setattr(files, "READ_BYTES", read_bytes)
    path = write(tmp_path / "x.ndjson.gz", TEXT)
    assert records(list(FileSource(path).batches(2, {}))) == EXPECTED


@pytest.mark.parametrize("read_bytes", [1, 5, 64, 1 << 20])
@pytest.mark.parametrize("batch_size", [1, 3, 1000, 10**6])
def test_batches_are_the_size_asked_for_across_read_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_bytes: int, batch_size: int
) -> None:
    """``--batch-size`` is honoured whatever the read block: records left at the end of a
    block go into the next batch (a large batch size once gave one batch per block)."""
    monkeypatch.setattr(files, "READ_BYTES", read_bytes)
    data = b"".join(generate_ndjson_chunks(3000, 8))
    path = write(tmp_path / "x.ndjson", data)
    batches = list(FileSource(path).batches(batch_size, {}))
    total = len(data.splitlines())
    assert [len(b) for b in batches] == [batch_size] * (total // batch_size) + (
        [total % batch_size] if total % batch_size else []
    )
    lines = data.splitlines()
    assert [b.record(i) for b in batches for i in range(len(b))] == lines
    resumed = list(FileSource(path).batches(batch_size, {0: 1234}))
    assert sum(len(b) for b in resumed) == total - 1234
    assert all(len(b) == batch_size for b in resumed[:-1])


def test_batches_respect_max_records_and_resume(tmp_path: Path) -> None:
    path = write(tmp_path / "x.ndjson", TEXT)
    source = FileSource(path)
    batches = list(source.batches(2, {}))
    assert [len(b) for b in batches] == [2, 2, 1]
    for start in range(9):
        resumed = records(list(source.batches(2, {0: start})))
        assert resumed == [r for r in EXPECTED if r[0] >= start]
    assert list(source.batches(2, {1: 99})) != [], "other partitions' offsets are ignored"


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n  \n\t\r\n", b"   "])
def test_files_without_records_yield_no_batches(tmp_path: Path, data: bytes) -> None:
    for name in ("empty.ndjson", "empty.ndjson.gz"):
        assert list(FileSource(write(tmp_path / name, data)).batches(10, {})) == []


def test_a_large_generated_file_reads_back_exactly(tmp_path: Path) -> None:
    data = b"".join(generate_ndjson_chunks(30_000, 4))
    path = write(tmp_path / "big.ndjson.gz", data)
    batches = list(FileSource(path).batches(7_000, {}))
    assert [r for _, r in records(batches)] == data.split(b"\n")[:-1]
    assert np.concatenate([b.offsets for b in batches]).tolist() == list(range(30_000))


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        FileSource(tmp_path / "absent.ndjson")


def test_unknown_format_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source"):
        FileSource(write(tmp_path / "x.csv", b"a,b\n"))


def test_corrupt_gzip_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson.gz"
    path.write_bytes(gzip.compress(TEXT)[:-12])
    with pytest.raises(SourceError, match="read failed"):
        list(FileSource(path).batches(10, {}))


def test_bad_batch_size_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        list(FileSource(write(tmp_path / "x.ndjson", TEXT)).batches(0, {}))


def test_parquet_rows_decode_to_the_generated_events(tmp_path: Path) -> None:
    table = pa.Table.from_batches(list(generate_arrow(8_000, 2)))
    path = tmp_path / "events.parquet"
    pq.write_table(table, path, row_group_size=1_500)
    source = FileSource(f"file:{path}")
    decoder = ArrowJsonDecoder(threads=1)
    for start in (0, 1, 1_499, 1_500, 4_321, table.num_rows):
        batches = list(source.batches(1_000, {0: start}))
        assert all(isinstance(b, TypedBatch) and len(b) <= 1_000 for b in batches)
        results = [decoder.decode(b) for b in batches]
        if start == table.num_rows:
            assert results == []
            continue
        events = pa.concat_tables([r.events for r in results])
        assert sum(r.dead.num_rows for r in results) == 0
        assert events.select(table.column_names).equals(table.slice(start))
        assert events.column("offset").to_pylist() == list(range(start, table.num_rows))
        assert batches[-1].next_offset == table.num_rows


def test_unreadable_parquet_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="Parquet"):
        list(FileSource(write(tmp_path / "x.parquet", b"not parquet")).batches(10, {}))


def test_a_directory_is_one_partition_per_file_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "b.ndjson.gz", b'{"b":0}\n{"b":1}\n')
    write(tmp_path / "a.jsonl", b'{"a":0}\n')
    write(tmp_path / "notes.txt", b"not an input file\n")
    pq.write_table(pa.Table.from_batches(list(generate_arrow(5, seed=3))), tmp_path / "c.parquet")
    source = FileSource(f"file:{tmp_path}")
    assert [f.name for f in source.files] == ["a.jsonl", "b.ndjson.gz", "c.parquet"]
    assert source.partition_count == 3
    batches = list(source.batches(10, {}))
    assert [b.partition for b in batches] == [0, 1, 2]
    assert records(batches[:2]) == [(0, b'{"a":0}'), (0, b'{"b":0}'), (1, b'{"b":1}')]
    assert batches[1].source == f"file:{tmp_path / 'b.ndjson.gz'}"
    assert batches[2].rows.num_rows == 5  # type: ignore[attr-defined]


def test_a_glob_and_a_chosen_subset_of_partitions(tmp_path: Path) -> None:
    for i in range(4):
        write(tmp_path / f"part-{i}.ndjson", b"".join(b'{"i":%d}\n' % i for _ in range(i + 1)))
    source = FileSource(f"file:{tmp_path}/part-*.ndjson", partitions=[3, 1])
    batches = list(source.batches(2, {3: 2}))
    assert [(b.partition, len(b)) for b in batches] == [(1, 2), (3, 2)]
    assert [int(o) for o in batches[1].offsets] == [2, 3]  # partition 3 resumed at line 2


def test_partition_errors_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no file matches"):
        FileSource(f"file:{tmp_path}/*.ndjson")
    with pytest.raises(SourceError, match=r"holds no \.ndjson"):
        FileSource(f"file:{tmp_path}")
    write(tmp_path / "only.ndjson", TEXT)
    with pytest.raises(SourceError, match="no partition 1"):
        FileSource(f"file:{tmp_path}", partitions=[1])

"""Job identity on the real Kafka broker: groups per job, offsets without state refused.

A Kafka job keeps state in three places that must belong to it: its checkpoint folder, its
consumer group's committed offsets and its database.  These tests take one of them away or
share it between two jobs and check that nothing is silently lost or doubled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpu_pipeline.sources.kafka_producer import produce_synthetic
from tests.engine_harness import assert_tables_equal as assert_same_tables
from tests.test_kafka_pipeline import Topic, new_job, new_topic, read_topic, unique

pytestmark = pytest.mark.kafka
PARTITIONS = 2


@pytest.fixture(scope="module")
def synthetic(kafka_bootstrap: str) -> Topic:
    """A small synthetic clickstream in a 2-partition topic, keyed by user."""
    name = new_topic(kafka_bootstrap, PARTITIONS)
    produce_synthetic(f"kafka://{kafka_bootstrap}/{name}", 1500, 9, partitions=PARTITIONS)
    return read_topic(kafka_bootstrap, name, PARTITIONS)


def test_two_sinks_with_the_default_group_each_get_the_whole_topic(
    synthetic: Topic, tmp_path: Path
) -> None:
    """The Kafka form of the two-sinks bug: a shared default group would have resumed the
    second job at the first one's committed offsets."""
    first = new_job(tmp_path / "one", synthetic, group_id="")
    second = new_job(tmp_path / "two", synthetic, group_id="", checkpoint_dir=first.checkpoint_dir)
    first.run_ok()
    second.run_ok()
    assert_same_tables(first.tables(), synthetic.reference.tables)
    assert_same_tables(second.tables(), synthetic.reference.tables)


def test_committed_offsets_without_a_checkpoint_are_refused(
    synthetic: Topic, tmp_path: Path
) -> None:
    group = unique("shared")
    first = new_job(tmp_path / "one", synthetic, group_id=group)
    first.run_ok()
    # another job (another sink) told to use the same group finds its offsets committed
    second = new_job(tmp_path / "two", synthetic, group_id=group)
    assert second.run() == 1
    log = second.log_tail()
    assert "has committed offsets" in log and "--fresh" in log, log
    assert sum(t.num_rows for t in second.tables().values()) == 0
    # --fresh reads the topic from its earliest offsets instead
    second.with_options("--fresh").run_ok()
    assert_same_tables(second.tables(), synthetic.reference.tables)


def test_a_kafka_job_that_lost_its_checkpoint_is_not_read_again(
    synthetic: Topic, tmp_path: Path
) -> None:
    job = new_job(tmp_path, synthetic)
    job.run_ok()
    shutil.rmtree(job.checkpoint_dir)
    assert job.run() == 1
    assert "would store those rows twice" in job.log_tail()
    assert_same_tables(job.tables(), synthetic.reference.tables)

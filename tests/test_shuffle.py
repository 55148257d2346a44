"""Shuffled batches streamed from Parquet row groups: every row once per pass, memory bounded by the
window, and a restored position continues the same sequence."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.trainer.shuffle import ShuffledBatches, blocks_of


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """200 rows in 4 files of row groups of 10 rows (sample_id 0..199, in order)."""
    directory = tmp_path_factory.mktemp("shards")
    paths = []
    for index in range(4):
        path = directory / f"part-{index}.parquet"
        pq.write_table(pa.table({"sample_id": list(range(50 * index, 50 * (index + 1)))}), path, row_group_size=10)
        paths.append(str(path))
    return paths


def ids(batch: pa.Table) -> list[int]:
    return batch["sample_id"].to_pylist()


def test_each_pass_draws_every_row_once_from_a_bounded_window(files):
    batches = ShuffledBatches(blocks_of(files), batch_size=16, seed=0, window_rows=30)
    passes, largest = [], 0
    for _ in range(2):
        rows = []
        for _ in range(200 // 16):
            rows += ids(next(batches))
            largest = max(largest, batches.table.num_rows)
        passes.append(rows)
    for rows in passes:
        assert len(set(rows)) == len(rows) == 192  # 12 whole batches; the 8 rows left wait for a later pass
    assert passes[0] != passes[1]
    assert largest <= 30  # three row groups of 10 make a window: never the whole dataset in memory
    first_window = passes[0][:30]
    assert len({i // 10 for i in first_window}) == 3 and sorted(first_window) != list(range(30))  # blocks shuffled, not file order
    assert passes[0][:16] != sorted(passes[0][:16])  # rows shuffled within the window


def test_restored_position_continues_the_sequence(files):
    original = ShuffledBatches(blocks_of(files), batch_size=16, seed=3, window_rows=30)
    for _ in range(17):  # into the second pass, mid-window
        next(original)
    position, tensors = original.state()
    restored = ShuffledBatches(blocks_of(files), batch_size=16, seed=3, window_rows=30)
    restored.restore(position, tensors)
    assert [ids(next(restored)) for _ in range(10)] == [ids(next(original)) for _ in range(10)]


def test_rows_that_fit_one_window_are_one_shuffle_over_all(files):
    """All rows within the window: the order of a plain shuffle of the concatenated files."""
    batches = ShuffledBatches(blocks_of(files), batch_size=16, seed=5, window_rows=1000)
    expected = torch.randperm(200, generator=torch.Generator().manual_seed(5))[:32].tolist()
    assert ids(next(batches)) + ids(next(batches)) == expected


def test_fewer_rows_than_a_batch_is_an_error(files):
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShuffledBatches(blocks_of(files[:1]), batch_size=64, seed=0, window_rows=30)

"""Model work in shards: a labeling killed with kill -9 resumes by redoing only unfinished shards and
ends with the rows of an uninterrupted run (on a local Ray cluster: tests/test_ray.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from assets.datasets import seed_prompts, teacher_labeled
from assets.executor import ShardExecutor, read_slice
from assets.models import teacher_model
from assets.resources import ModelEngine, store_resource
from storage.store import Store

SHARD_SIZE = 4
PROMPTS = 48


def labeling_run_config(chat_pair, seeds) -> dict:
    return {"ops": {
        "teacher_model": {"config": {"model": str(chat_pair["teacher"])}},
        "seed_prompts": {"config": {"source": "files", "files": [str(seeds)], "task": "none"}},
        "teacher_labeled": {"config": {"sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 12}, "k": 8}},
    }}


WORKER = """
import json, sys
import dagster as dg
from assets.datasets import seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.models import teacher_model
from assets.resources import ModelEngine, store_resource
dg.materialize([teacher_model, seed_prompts, teacher_labeled], run_config=json.loads(sys.argv[1]), resources={
    "store": store_resource, "model_engine": ModelEngine(batch_size=4), "shard_executor": ShardExecutor(shard_size=int(sys.argv[2]))})
"""


def label(home, run_config, executor: ShardExecutor, selection=None) -> dict:
    if selection:
        run_config = {"ops": {name: run_config["ops"][name] for name in selection}}
    result = dg.materialize([teacher_model, seed_prompts, teacher_labeled], selection=selection, run_config=run_config,
                            resources={"store": store_resource.configured({"home": str(home)}), "model_engine": ModelEngine(batch_size=4),
                                       "shard_executor": executor})
    assert result.success
    return result.asset_materializations_for_node("teacher_labeled")[0].metadata


def rows(home):
    table = Store(home).read_dataset("teacher_labeled").sort_by("sample_id")
    return table["sample_id"].to_pylist(), pc.list_flatten(pc.list_flatten(table["topk_logprobs"])).to_numpy()


@pytest.fixture(scope="module")
def reference(chat_pair, tmp_path_factory):
    """An uninterrupted local labeling: the rows every other way must reproduce."""
    directory = tmp_path_factory.mktemp("sharded")
    seeds = directory / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"prompt": f"{i} plus {i} makes"}) for i in range(PROMPTS)))
    run_config = labeling_run_config(chat_pair, seeds)
    figures = label(directory / "uninterrupted", run_config, ShardExecutor(shard_size=SHARD_SIZE))
    assert figures["shards"].value == PROMPTS // SHARD_SIZE and figures["shards_resumed"].value == 0
    prompts = Store(directory / "uninterrupted").read_dataset("teacher_labeled", columns=["prompt"])["prompt"]
    assert sorted(prompts.to_pylist()) == sorted(f"{i} plus {i} makes" for i in range(PROMPTS))  # each seed once
    return run_config, rows(directory / "uninterrupted"), directory


def test_read_slice_reads_exactly_its_rows_across_row_groups_and_files(tmp_path):
    for name, start in [("a", 0), ("b", 10)]:
        pq.write_table(pa.table({"i": range(start, start + 10)}), tmp_path / f"{name}.parquet", row_group_size=6)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    assert [read_slice(paths, start, 3)["i"].to_pylist() for start in range(0, 20, 3)] == [
        list(range(start, min(20, start + 3))) for start in range(0, 20, 3)]


def test_a_killed_labeling_resumes_where_it_stopped(reference):
    run_config, (sample_ids, logprobs), directory = reference
    home = directory / "killed"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(run_config), str(SHARD_SIZE)],
                              env={**os.environ, "DISTILL_HOME": str(home)})
    work = home / "work" / "teacher_labeled" / "all"
    deadline = time.monotonic() + 120
    while not list(work.glob("*/part-*.json")):  # kill -9 once the first shard is done
        assert worker.poll() is None and time.monotonic() < deadline, "the labeling never finished a shard"
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    finished = len(list(work.glob("*/part-*.json")))
    assert 1 <= finished < PROMPTS // SHARD_SIZE and not Store(home).has_dataset("teacher_labeled")

    figures = label(home, run_config, ShardExecutor(shard_size=SHARD_SIZE), selection=["teacher_labeled"])
    assert figures["shards_resumed"].value == finished  # only the unfinished shards were redone
    again_ids, again_logprobs = rows(home)
    assert again_ids == sample_ids and np.array_equal(again_logprobs, logprobs)

"""The paths that run on a local Ray cluster, in one file so that no two clusters run side by side
under pytest-xdist (two local clusters on one machine find each other: "Found multiple active Ray
instances"): the labeling asset with two engine replicas (`executor: ray`) gives the rows of a local
run, and `launcher: ray` trains on Ray Train workers."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_distill import labeled  # noqa: F401  (a module fixture: the tiny model's signal on 48 prompts)
from test_sharded_work import PROMPTS, SHARD_SIZE, label, reference, rows  # noqa: F401  (reference: a module fixture)

from assets.executor import ShardExecutor
from training.launch.command import DistillCommand
from training.models.checkpoints import load_model
from training.trainer.loop import train_student
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for


def test_ray_replicas_give_the_rows_of_a_local_run(reference):
    run_config, (sample_ids, logprobs), directory = reference
    figures = label(directory / "ray", run_config, ShardExecutor(executor="ray", shard_size=SHARD_SIZE, replicas=2))
    assert figures["executor"].value == "ray" and figures["shards"].value == PROMPTS // SHARD_SIZE
    ray_ids, ray_logprobs = rows(directory / "ray")
    assert ray_ids == sample_ids
    assert np.abs(ray_logprobs - logprobs).max() < 1e-3


def test_ray_train_workers_with_fsdp_follow_the_curve_of_one(tiny_model_dir, labeled, tmp_path):
    """`launcher: ray`: the command starts two Ray Train workers on a local Ray cluster (gloo, FSDP2),
    which give the loss curve of one process with the same global batch; rank 0's reports reach the
    driver, and rank 0 writes the whole model."""
    pq.write_table(labeled, tmp_path / "data.parquet")
    settings = dict(student=str(tiny_model_dir), data=[str(tmp_path / "data.parquet")], steps=10, batch_size=7, micro_batch_size=2,
                    learning_rate=3e-3, warmup_steps=2, nll_weight=1.0)
    model, tokenizer = load_model(str(tiny_model_dir))
    alone = TrainingSettings(**settings)
    one = train_student(model, tokenizer, batches_for(model, tokenizer, alone, labeled), alone)
    launch = {"launcher": "ray", "processes": 2, "strategy": "fsdp"}
    (tmp_path / "run.json").write_text(DistillCommand(**settings, output=str(tmp_path / "student"), launch=launch).model_dump_json())
    done = subprocess.run([sys.executable, "-m", "training.launch", "--config", str(tmp_path / "run.json")], check=True,
                          stdout=subprocess.PIPE, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"})
    assert "step 9/10 loss" in done.stdout  # rank 0's reports, relayed to the driver
    two = json.loads((tmp_path / "student" / "curve.json").read_text())
    assert [c["completion_tokens"] for c in two] == [c["completion_tokens"] for c in one]
    assert [c["loss"] for c in two] == pytest.approx([c["loss"] for c in one], rel=1e-4)
    trained, _ = load_model(str(tmp_path / "student"))
    torch.testing.assert_close(trained.state_dict(), model.state_dict(), rtol=1e-3, atol=1e-5)

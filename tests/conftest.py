"""Shared fixtures: a tiny real model on disk, and a fresh DISTILL_HOME / DAGSTER_HOME per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at test time: everything is built locally
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dagster as dg
import pytest
import torch

from training.models import STUDENT_ARCHITECTURE, build_embedded, save_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised embedded-architecture Llama saved in HF format."""
    directory = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = build_embedded(STUDENT_ARCHITECTURE, seed=0)
    save_model(model, tokenizer, directory)
    return directory


@pytest.fixture
def distill_home(tmp_path, monkeypatch):
    home = tmp_path / "distill"
    monkeypatch.setenv("DISTILL_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    os.makedirs(tmp_path / "dagster")
    return home


@pytest.fixture
def instance(distill_home):
    with dg.DagsterInstance.get() as dagster_instance:
        yield dagster_instance

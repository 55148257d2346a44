import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.cli import main as distill
from storage.catalog import query, refresh_catalog
from storage.store import Store
from training.schema.cards import ModelCard
from training.schema.tables import with_content_id

CONFIGURED_CARD = {"name": "Qwen/Qwen3-0.6B", "revision": None, "weights_hash": "abc", "num_parameters": 596049920,
                   "vocab_size": 151936, "tokenizer_size": 151669, "tokenizer_hash": "t", "chat_template_hash": "c",
                   "path": "Qwen/Qwen3-0.6B", "context_length": 40960}  # a configured model's card.json


def test_a_new_version_replaces_the_old_at_once_and_a_crash_leaves_the_old(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_dataset("things", pa.table({"x": list(range(10))}), rows_per_shard=4)
    assert [p.name for p in store.shard_paths("things")] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    first = store.dataset_version("things")

    def crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        store.write_dataset("things", pa.table({"x": [9]}))
    monkeypatch.undo()
    assert store.read_dataset("things")["x"].to_pylist() == list(range(10))  # the old version is whole and current
    assert store.dataset_version("things") == first
    assert sorted(p.name for p in store.dataset_dir("things").iterdir()) == [
        "_manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # nothing half-written
    old = store.dataset_dir("things").resolve()
    store.write_dataset("things", pa.table({"x": [4]}))
    assert store.read_dataset("things")["x"].to_pylist() == [4] and store.dataset_version("things") != first
    assert not old.exists()  # the replaced version is gone; readers of the link never saw a mix


def test_sharded_write_resumes_under_the_same_fingerprint_and_restarts_under_another(tmp_path):
    store = Store(tmp_path)
    writer = store.sharded_write("labeled", "r001", "fingerprint-a")
    writer.write(0, pa.table({"x": [1, 2]}), {"tokens": 5})
    assert not store.has_dataset("labeled", "r001")  # nothing is visible before publish
    assert store.sharded_write("labeled", "r001", "fingerprint-a").done()[0]["tokens"] == 5  # a re-run finds shard 0
    assert store.sharded_write("labeled", "r001", "fingerprint-b").done() == {}  # other settings: afresh
    writer = store.sharded_write("labeled", "r001", "fingerprint-b")
    writer.write(1, pa.table({"x": [3]}))
    with pytest.raises(RuntimeError, match=r"shards \[0\] are missing"):
        writer.publish()
    writer.write(0, pa.table({"x": [1, 2]}))
    assert writer.publish()["rows"] == 3
    assert not (tmp_path / "work" / "labeled" / "r001").exists()
    assert [t.to_pylist() for t in map(lambda t: t["x"], store.iter_rows("labeled", "r001", rows=2))] == [[1, 2], [3]]


def test_a_store_of_single_files_moves_to_versions_on_its_next_write(tmp_path):
    store = Store(tmp_path)
    legacy = tmp_path / "data" / "things"
    legacy.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), legacy / "part-0.parquet")
    store.write_dataset("things", pa.table({"x": [2]}))
    assert store.dataset_dir("things").is_symlink() and store.read_dataset("things")["x"].to_pylist() == [2]


def test_a_moved_store_keeps_its_datasets_and_checkpoints(tmp_path):
    store = Store(tmp_path / "here")
    store.write_dataset("teacher_labeled", pa.table({"x": [1, 2]}))
    card = store.save_model("teacher", ModelCard(**CONFIGURED_CARD), lambda directory: directory.mkdir(parents=True))
    assert card.path == str(tmp_path / "here" / "models" / "teacher" / "abc")
    assert json.loads(store.card_path("teacher").read_text())["store_path"] == "models/teacher/abc"
    (tmp_path / "here").rename(tmp_path / "there")
    moved = Store(tmp_path / "there")
    assert moved.read_dataset("teacher_labeled")["x"].to_pylist() == [1, 2]
    assert moved.read_card("teacher").path == str(tmp_path / "there" / "models" / "teacher" / "abc")
    refresh_catalog(moved)
    assert query(moved, "SELECT sum(x) FROM teacher_labeled")[1] == [(3,)]


def test_a_card_json_reads_and_writes_back_with_exactly_its_keys(tmp_path):
    """An existing store's card.json loads as it is (its null revision kept) and is written back the
    same; a field no card declares fails where the card is built."""
    store = Store(tmp_path)
    store.card_path("teacher").parent.mkdir(parents=True)
    store.card_path("teacher").write_text(json.dumps(CONFIGURED_CARD))
    card = store.read_card("teacher")
    assert card.revision is None and card.train_steps is None and card.as_dict() == CONFIGURED_CARD
    store.write_card("student", card)
    assert json.loads(store.card_path("student").read_text()) == CONFIGURED_CARD
    with pytest.raises(ValidationError, match="train_step"):
        card.extended(train_step=900)


def test_missing_dataset_names_the_asset(tmp_path):
    with pytest.raises(FileNotFoundError, match="'seed_prompts' has not been materialized"):
        Store(tmp_path).read_dataset("seed_prompts")
    with pytest.raises(FileNotFoundError, match="materialize the `teacher` asset"):
        Store(tmp_path).read_card("teacher")


def test_content_ids_are_stable_and_distinguish_rows():
    table = pa.table({"a": ["x", "x", "y"], "b": [[1, 2], [1, 2], [1, 2]]})
    ids = with_content_id(table, "id", ["a", "b"])["id"].to_pylist()
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 16
    assert with_content_id(table, "id", ["a", "b"])["id"].to_pylist() == ids


def test_catalog_views_lineage_and_cli(tmp_path, capsys):
    store = Store(tmp_path)
    store.write_dataset("rounds_of_things", pa.table({"x": [1, 2]}), partition="r001")
    store.write_dataset("rounds_of_things", pa.table({"x": [3]}), partition="r002")
    store.append_lineage({"asset": "a", "partition": None, "run_id": "run1", "metrics": "{}"})
    store.append_lineage({"asset": "a", "partition": None, "run_id": "run2", "metrics": "{}"})
    assert refresh_catalog(store) == ["lineage", "rounds_of_things"]
    columns, rows = query(store, "SELECT round, sum(x) FROM rounds_of_things GROUP BY round ORDER BY round")
    assert rows == [("r001", 3), ("r002", 3)]
    assert query(store, "SELECT count(*) FROM lineage")[1] == [(2,)]
    with pytest.raises(duckdb.Error):  # the catalog is opened read-only
        query(store, "CREATE TABLE t AS SELECT 1")

    assert distill(["--home", str(tmp_path), "datasets"]) == 0
    out = capsys.readouterr().out
    assert "rounds_of_things  3" in out and "lineage" in out
    assert distill(["--home", str(tmp_path), "query", "SELECT 40 + 2 AS answer"]) == 0
    assert "42" in capsys.readouterr().out
    assert distill(["--home", str(tmp_path), "query", "SELECT * FROM nope"]) == 1
    assert "nope" in capsys.readouterr().err

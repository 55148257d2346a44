import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as distill
from storage.catalog import query, refresh_catalog
from storage.store import Store
from training.tables import with_content_id


def test_write_is_atomic_and_replaces_cleanly(tmp_path, monkeypatch):
    store = Store(tmp_path)
    path = store.write_dataset("things", pa.table({"x": [1, 2, 3]}))
    assert pq.read_table(path)["x"].to_pylist() == [1, 2, 3]

    def crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        store.write_dataset("things", pa.table({"x": [9]}))
    monkeypatch.undo()
    assert pq.read_table(path)["x"].to_pylist() == [1, 2, 3]  # the old data is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]  # nothing half-written
    store.write_dataset("things", pa.table({"x": [4]}))
    assert store.read_dataset("things")["x"].to_pylist() == [4]


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

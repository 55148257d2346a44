"""`distill query` reads the store's datasets and nothing else, and writes nothing: real DuckDB on a real small store."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as distill
from storage.catalog import connect_read_only, query, refresh_catalog
from storage.store import Store

READS_ONLY = "only reads the store's datasets"


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store")
    store.write_dataset("teacher_labeled", pa.table({"x": [1, 2, 3]}))
    store.write_dataset("student_rollouts", pa.table({"x": [4]}), partition="r001")
    store.append_lineage({"asset": "round_eval", "partition": "r001", "run_id": "run1",
                          "metrics": json.dumps({"greedy_exact_match": 0.5})})
    refresh_catalog(store)
    pq.write_table(pa.table({"secret": [7]}), tmp_path / "outside.parquet")
    (tmp_path / "outside.csv").write_text("secret\n7\n")
    return store


def test_the_views_and_the_store_files_read(store):
    assert query(store, "SELECT sum(x) FROM teacher_labeled")[1] == [(6,)]
    assert query(store, "SELECT round, x FROM student_rollouts")[1] == [("r001", 4)]
    assert query(store, "SELECT round, greedy_exact_match FROM rounds")[1] == [("r001", 0.5)]
    shard = store.shard_paths("teacher_labeled")[0]  # under versions/, where data/'s links lead
    assert query(store, f"SELECT count(*) FROM read_parquet('{shard}')")[1] == [(3,)]
    assert query(store, "DESCRIBE teacher_labeled")[1][0][:2] == ("x", "BIGINT")
    assert query(store, "EXPLAIN SELECT * FROM teacher_labeled")[1]


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{outside}/written.csv'",
    "COPY teacher_labeled TO '{root}/data/written.csv'",
    "EXPORT DATABASE '{root}/data/exported'",
    "ATTACH '{outside}/new.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "CREATE TEMP TABLE t AS SELECT 1",
    "SELECT 1; COPY (SELECT 1) TO '{outside}/written.csv'",
])
def test_statements_other_than_queries_are_refused(store, sql, capsys):
    outside = store.root.parent
    before = sorted(outside.rglob("*"))
    with pytest.raises(duckdb.PermissionException, match=READS_ONLY):
        query(store, sql.format(root=store.root, outside=outside))
    assert distill(["--home", str(store.root), "query", sql.format(root=store.root, outside=outside)]) == 1
    assert READS_ONLY in capsys.readouterr().err
    assert sorted(outside.rglob("*")) == before  # nothing was written


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{outside}/outside.csv')",
    "SELECT * FROM read_parquet('{outside}/outside.parquet')",
    "SELECT * FROM read_parquet('{root}/data/../../outside.parquet')",
    "SELECT * FROM read_text('{root}/catalog.lock')",
    "SELECT * FROM glob('{outside}/*')",
])
def test_files_outside_the_store_data_are_refused(store, sql):
    with pytest.raises(duckdb.PermissionException, match=f"{READS_ONLY}.*Cannot access"):
        query(store, sql.format(root=store.root, outside=store.root.parent))


def test_the_sandbox_stays_with_its_own_connection(store, tmp_path):
    with connect_read_only(store):  # another query meanwhile gets a sandbox of its own
        assert query(store, "SELECT count(*) FROM teacher_labeled")[1] == [(3,)]
    with duckdb.connect(str(tmp_path / "store" / "catalog.duckdb"), read_only=True) as plain:
        assert query(store, "SELECT 1")[1] == [(1,)]
        assert plain.execute(f"SELECT secret FROM read_csv('{tmp_path}/outside.csv')").fetchall() == [(7,)]

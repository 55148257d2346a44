"""The DuckDB catalog: `catalog.duckdb` holds one view per dataset over its Parquet files.

DuckDB allows one writer per database file, so views are refreshed here only, under a file lock;
readers (`distill query`, notebooks) open the catalog read-only. Views read globs through the
current-version symlinks, so a new version or a new round shows up without a refresh; a new dataset
needs one.

`query` (and so `distill query`) only reads the store's datasets: it runs SELECT or EXPLAIN statements,
in a DuckDB of its own that opens files under the store's data/ and versions/ and no others, with its
configuration locked so that no statement can lift that.

Besides the datasets, `rounds` is a view over `lineage`: one row per on-policy round (its latest
round_eval), with its parent, checkpoint hashes and headline metrics.
"""

# Annotations stay strings: an evaluated `duckdb.DuckDBPyConnection` below would be kept alive past
# interpreter exit (through dagster's and torch's long-lived objects), and duckdb's nanobind
# bindings would then print a wall of "leaked instance" warnings after every command.
from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

from storage.store import Store
from training.schema.tables import duckdb_identifier


@contextmanager
def _catalog_lock(store: Store):
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / "catalog.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dataset_names(store: Store) -> list[str]:
    data = store.root / "data"
    if not data.exists():
        return []
    return sorted(d.name for d in data.iterdir() if d.is_dir() and not d.name.startswith(".") and _files(d))


def _files(directory: Path) -> str | None:
    """The glob of a dataset's current files: its shards, or each round's (symlinks, which DuckDB's
    `*` follows and `**` does not)."""
    for pattern in ("part-*.parquet", "round=*/part-*.parquet"):
        if any(directory.glob(pattern)):
            return str(directory / pattern)
    return None


def view_sql(store: Store, name: str) -> str:
    glob = _files(store.root / "data" / name).replace("'", "''")
    return (
        f"CREATE OR REPLACE VIEW {duckdb_identifier(name)} AS SELECT * FROM "
        f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true)"
    )


ROUNDS_VIEW = """
CREATE OR REPLACE VIEW rounds AS
SELECT partition AS round,
       json_extract_string(input_versions, '$.parent') AS parent,
       json_extract_string(input_versions, '$.parent_checkpoint') AS parent_checkpoint,
       json_extract_string(metrics, '$.checkpoint') AS checkpoint,
       round(json_extract(metrics, '$.greedy_exact_match')::DOUBLE, 4) AS greedy_exact_match,
       round(json_extract(metrics, '$.sampled_exact_match')::DOUBLE, 4) AS sampled_exact_match,
       round(json_extract(metrics, '$.parent_greedy_exact_match')::DOUBLE, 4) AS parent_greedy_exact_match,
       round(json_extract(metrics, '$.improvement')::DOUBLE, 4) AS improvement,
       round(json_extract(metrics, '$.reverse_kl_on_student_samples')::DOUBLE, 4) AS reverse_kl,
       round(json_extract(metrics, '$.parent_reverse_kl_on_student_samples')::DOUBLE, 4) AS parent_reverse_kl,
       round(json_extract(metrics, '$.teacher_logprob_on_student_samples')::DOUBLE, 4) AS teacher_logprob,
       round(json_extract(metrics, '$.forward_kl_on_teacher_samples')::DOUBLE, 4) AS forward_kl,
       round(json_extract(metrics, '$.student_nll_on_teacher_samples')::DOUBLE, 4) AS student_nll,
       round(json_extract(metrics, '$.rollout_reward')::DOUBLE, 4) AS rollout_reward,
       run_id, created_at
FROM lineage WHERE asset = 'round_eval'
QUALIFY row_number() OVER (PARTITION BY partition ORDER BY created_at DESC) = 1
"""


def refresh_catalog(store: Store, attempts: int = 20) -> list[str]:
    """(Re)creates a view per dataset; waits for a reader holding the file, then gives up clearly."""
    names = dataset_names(store)
    with _catalog_lock(store):
        for attempt in range(attempts):
            try:
                with duckdb.connect(str(catalog_path(store))) as connection:
                    for name in names:
                        connection.execute(view_sql(store, name))
                    if "lineage" in names:
                        connection.execute(ROUNDS_VIEW)
                return names
            except duckdb.IOException as error:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"cannot refresh {catalog_path(store)}: another process holds it ({error}). "
                        "Close other DuckDB connections to the catalog and run `distill refresh`."
                    ) from error
                time.sleep(0.25 * (attempt + 1))
    return names


READ_ONLY = "`distill query` only reads the store's datasets (the views in catalog.duckdb): it writes no file and reads no other"
QUERIES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def connect_read_only(store: Store) -> duckdb.DuckDBPyConnection:
    """The catalog attached read-only to a DuckDB of its own (an instance shared with other connections
    would lock them too), which opens files under data/ and versions/ only (DuckDB checks the targets of
    the views' symlinks); its configuration is locked, so no SET lifts that."""
    path = catalog_path(store)
    if not path.exists():
        raise FileNotFoundError(f"no catalog at {path}: materialize an asset first (`make demo`)")
    connection = duckdb.connect(config={"temp_directory": f"{path}.tmp"})  # where a read-only catalog spills anyway
    connection.execute("ATTACH $1 AS catalog (READ_ONLY)", [str(path)])
    connection.execute("USE catalog")
    connection.execute("SET allowed_directories = $1", [[f"{store.root / name}/" for name in ("data", "versions")]])
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def query(store: Store, sql: str):
    """Runs `sql` (SELECT or EXPLAIN statements only) on the sandboxed catalog; returns (column names, rows)."""
    with connect_read_only(store) as connection:
        refused = [s.type.name for s in connection.extract_statements(sql) if s.type not in QUERIES]
        if refused:
            raise duckdb.PermissionException(f"{READ_ONLY}; run a SELECT, not {refused[0]} (`distill export` writes datasets)")
        try:
            result = connection.execute(sql)
        except duckdb.PermissionException as error:
            raise duckdb.PermissionException(f"{READ_ONLY}. {error}") from None
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()


def catalog_path(store: Store) -> Path:
    return store.root / "catalog.duckdb"

"""Arrow table building shared by labeling, expansion, rollouts and feedback: content-hash ids,
constant columns, carrying prompt columns onto the rows generated from them, and the SQL that
reads a dataset's shards."""

# Annotations stay strings: an evaluated `duckdb.DuckDBPyConnection` would be kept alive past interpreter
# exit and make duckdb's bindings print a wall of "leaked instance" warnings (as in storage/catalog.py).
from __future__ import annotations

import atexit
import os
from pathlib import Path

import duckdb
import pyarrow as pa


def content_id(columns: list[str]) -> str:
    """SQL: the first 16 hex digits of sha256 over `columns` (as JSON): every content-hash id's rule."""
    parts = ", ".join(f"to_json({duckdb_identifier(c)})::VARCHAR" for c in columns)
    return f"substr(sha256(concat_ws('|', {parts})), 1, 16)"


def arrow_sql() -> duckdb.DuckDBPyConnection:
    """A new cursor on this process's in-memory DuckDB, for SQL over Arrow tables on a hot path (once per
    batch): opening a connection takes ~15 ms, a cursor ~1 ms. Close it after use (a with statement);
    each thread uses its own cursor. A forked child opens its own connection."""
    global _PROCESS_DUCKDB
    if _PROCESS_DUCKDB is None or _PROCESS_DUCKDB[0] != os.getpid():
        _PROCESS_DUCKDB = (os.getpid(), duckdb.connect())
        atexit.register(_close_process_duckdb)
    return _PROCESS_DUCKDB[1].cursor()


_PROCESS_DUCKDB: tuple[int, duckdb.DuckDBPyConnection] | None = None


def _close_process_duckdb() -> None:
    """Closed and dropped before the interpreter tears DuckDB's bindings down: a connection alive then
    makes them print a wall of "leaked instance" warnings (see storage/catalog.py)."""
    global _PROCESS_DUCKDB
    if _PROCESS_DUCKDB is not None:
        _PROCESS_DUCKDB[1].close()
        _PROCESS_DUCKDB = None


def with_content_id(table: pa.Table, name: str, columns: list[str]) -> pa.Table:
    """Adds `name` = `content_id(columns)`, computed in DuckDB."""
    with arrow_sql() as connection:
        connection.register("source_rows", table)
        ids = connection.sql(f"SELECT {content_id(columns)} AS id FROM source_rows")
        return table.append_column(name, ids.to_arrow_table().column("id"))


def with_constants(table: pa.Table, **values) -> pa.Table:
    """Appends one column per keyword, the same value on every row (a string unless it is an
    Arrow scalar): the identity stamps of a table (model, hashes, sampling, round, run)."""
    for name, value in values.items():
        scalar = value if isinstance(value, pa.Scalar) else pa.scalar(value, pa.string())
        table = table.append_column(name, pa.repeat(scalar, table.num_rows))
    return table


def join_prompts(generated: pa.Table, prompts: pa.Table) -> pa.Table:
    """The prompt columns of `prompts` (row `prompt_index` of each generated row), then the generated
    columns but `prompt_index`."""
    prompt_rows = prompts.take(generated["prompt_index"])
    columns = {name: prompt_rows[name] for name in prompt_rows.column_names}
    columns.update({name: generated[name] for name in generated.column_names if name != "prompt_index"})
    return pa.table(columns)


def duckdb_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def parquet(paths: list[Path], filename: bool = False) -> str:
    """SQL: the rows of the Parquet files `paths`, columns matched by name (with `filename`, the file
    each row came from)."""
    files = ", ".join("'" + str(path).replace("'", "''") + "'" for path in paths)
    return f"read_parquet([{files}], union_by_name = true{', filename = true' if filename else ''})"

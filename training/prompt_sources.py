"""Prompts from the task's generator, local files, or any `datasets.load_dataset` source, as Arrow.

Rows whose prompt is missing, not a string, or blank are dropped and counted, never fatal.
"""

from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from training.tables import with_constants, with_content_id
from training.tasks import Task

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _file_builder(files: list[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - FILE_BUILDERS.keys()
    if unknown:
        raise ValueError(f"cannot read {sorted(unknown)} files: give .jsonl, .json, .parquet or .csv")
    builders = {FILE_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise ValueError(f"files mix formats {sorted(builders)}: give files of one format")
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"prompt files not found: {missing}")
    return builders.pop()


def load_source(
    source: str,
    split: str,
    files: list[str] | None = None,
    dataset: str | None = None,
    subset: str | None = None,
) -> pa.Table:
    """The whole split as an Arrow table, through `datasets.load_dataset` (local files included)."""
    if source == "files":
        loaded = datasets.load_dataset(_file_builder(files), data_files={split: list(files)}, split=split)
    elif source == "datasets":
        loaded = datasets.load_dataset(dataset, subset, split=split)
    else:
        raise ValueError(f"unknown prompt source {source!r}: use 'embedded', 'files' or 'datasets'")
    return loaded.with_format("arrow")[:]


def select_prompts(table: pa.Table, prompt_column: str, answer_column: str | None, limit: int):
    """Columns `prompt` (and `answer`) of usable rows, at most `limit`; returns (table, dropped)."""
    for column in filter(None, (prompt_column, answer_column)):
        if column not in table.column_names:
            raise ValueError(f"no column {column!r} in the prompt source; its columns are {table.column_names}")
    prompt = table.column(prompt_column)
    if not pa.types.is_string(prompt.type) and not pa.types.is_large_string(prompt.type):
        usable = pa.repeat(pa.scalar(False), table.num_rows)
    else:
        usable = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0), False)
    selected = {"prompt": prompt}
    if answer_column:
        selected["answer"] = pc.cast(table.column(answer_column), pa.string())
    kept = pa.table(selected).filter(usable)
    return kept.slice(0, limit), table.num_rows - kept.num_rows


def prompt_table(task: Task, source: str, split: str, num_prompts: int, seed: int, files: list[str], dataset: str | None,
                 subset: str | None, prompt_column: str, answer_column: str | None, run_id: str) -> tuple[pa.Table, int]:
    """The prompt table of a source (prompt_id, prompt, answer, task, source, run_id), at most
    `num_prompts` rows; `embedded` generates them with the task. Returns (table, rows dropped)."""
    if source == "embedded":
        table, dropped = task.prompts(split, num_prompts, seed), 0
    else:
        table, dropped = select_prompts(load_source(source, split, files, dataset, subset), prompt_column, answer_column, num_prompts)
    if table.num_rows == 0:
        raise ValueError(f"the prompt source has no usable prompts ({dropped} rows dropped as empty or non-string)")
    if "answer" not in table.column_names:
        table = table.append_column("answer", pa.nulls(table.num_rows, pa.string()))
    table = with_constants(with_content_id(table, "prompt_id", ["prompt"]), task=task.name, source=source, run_id=run_id)
    return table.select(["prompt_id", "prompt", "answer", "task", "source", "run_id"]), dropped

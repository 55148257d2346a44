"""Prompts from the task's generator, local files, or any `datasets.load_dataset` source, as Arrow.

The prompt column holds text or conversations (`messages`: a list of {role, content}, multi-turn,
OpenAI style); a `system_prompt` may be set for all rows. Rows whose prompt is unusable are dropped
and counted by reason, never fatal; a file that cannot be parsed is an error that names it.
"""

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

import datasets
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from training.models.chat import MESSAGES, with_conversation_columns
from training.schema.tables import with_constants, with_content_id
from training.tasks import get_task

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


def _loaded(load, what: str) -> pa.Table:
    """`load()`'s dataset as Arrow, or an error that names `what` and the reason."""
    try:
        return load().with_format("arrow")[:]
    except Exception as error:
        reason = error.__cause__ or error  # datasets wraps the parser's error (line and column) in a generic one
        raise ValueError(f"cannot read {what}: {type(reason).__name__}: {reason}") from error


def load_source(
    source: str,
    split: str,
    files: list[str] | None = None,
    dataset: str | None = None,
    subset: str | None = None,
) -> pa.Table:
    """The whole split as an Arrow table, through `datasets.load_dataset` (local files included). A
    file that cannot be parsed is named, with the parser's reason."""
    if source == "files":
        builder = _file_builder(files)
        try:
            return _loaded(lambda: datasets.load_dataset(builder, data_files={split: list(files)}, split=split), f"the files {files}")
        except ValueError:
            for file in files:  # which one: each alone, only now that reading them together failed
                _loaded(lambda: datasets.load_dataset(builder, data_files={split: [file]}, split=split), f"the prompt file {file}")
            raise
    if source == "datasets":
        return _loaded(
            lambda: datasets.load_dataset(dataset, subset, split=split),
            f"dataset {dataset!r} (subset {subset!r}, split {split!r}); give a local path or a hub id reachable from here",
        )
    raise ValueError(f"unknown prompt source {source!r}: use 'embedded', 'files' or 'datasets'")


ROLES = "('system', 'user', 'assistant')"
TEXT_REASON = """CASE WHEN p IS NULL THEN 'missing' WHEN json_type(p) = 'NULL' THEN 'missing'
    WHEN json_type(p) IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN 'not a string (a number)'
    WHEN json_type(p) = 'ARRAY' THEN 'not a string (a list)'
    WHEN json_type(p) <> 'VARCHAR' THEN 'not a string (' || lower(json_type(p)) || ')'
    WHEN trim(p ->> '$') = '' THEN 'blank' END"""
CONVERSATION_REASON = f"""CASE WHEN p IS NULL OR len(p) = 0 THEN 'missing'
    WHEN len(list_filter(p, lambda m: m.role IS NULL OR m.role NOT IN {ROLES})) > 0 THEN 'a turn with an unknown role'
    WHEN len(list_filter(p, lambda m: m.content IS NULL)) > 0 THEN 'a turn without content'
    WHEN NOT list_contains(list_transform(p, lambda m: m.role), 'user') THEN 'no user turn' END"""
# up to the last user turn (a dataset of whole chats ends with the reply to replace)
TO_LAST_USER = "p[1 : len(p) + 1 - list_position(list_reverse(list_transform(p, lambda m: m.role)), 'user')]"
# one text per conversation, for dedup, decontamination and display: a lone user turn's content, else
# `role: content` lines; system turns left out
FLATTENED = """CASE WHEN len(list_filter(c, lambda m: m.role <> 'system')) = 1 THEN list_filter(c, lambda m: m.role = 'user')[1].content
    ELSE array_to_string(list_transform(list_filter(c, lambda m: m.role <> 'system'),
                                        lambda m: m.role || ': ' || m.content), chr(10)) END"""


def _json_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, str]:
    """(column, the SQL that makes its values JSON text), so one rule handles strings, numbers, lists
    and nulls: a column `datasets` read as JSON (mixed types) already is; any other is cast to JSON."""
    if isinstance(column.type, pa.ExtensionType):
        return pa.chunked_array([chunk.storage for chunk in column.chunks], column.type.storage_type), "p"
    return column, "to_json(p)"


def select_prompts(table: pa.Table, prompt_column: str, answer_column: str | None, limit: int,
                   teacher_column: str | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Columns `prompt`, `messages`, `answer` and `teacher_id` of usable rows, at most `limit`; returns (table,
    rows dropped by reason). The prompt column holds text, or conversations (a list of {role,
    content}): a row is dropped when its prompt is missing, blank or not a string, or its
    conversation has an unknown role, a turn without content or no user turn."""
    for column in filter(None, (prompt_column, answer_column, teacher_column)):
        if column not in table.column_names:
            raise ValueError(f"no column {column!r} in the prompt source; its columns are {table.column_names}")
    prompt = table.column(prompt_column)
    answer = pc.cast(table.column(answer_column), pa.string()) if answer_column else pa.nulls(table.num_rows, pa.string())
    values, as_json = _json_text(prompt)
    teacher = pc.cast(table.column(teacher_column), pa.string()) if teacher_column else pa.nulls(table.num_rows, pa.string())
    rows = pa.table({"p": values, "answer": answer, "teacher_id": teacher})
    conversational = pa.types.is_list(prompt.type) or pa.types.is_large_list(prompt.type)
    if conversational:
        sql = f"""WITH checked AS (SELECT *, {CONVERSATION_REASON} AS reason FROM rows),
                       cut AS (SELECT *, CASE WHEN reason IS NULL THEN {TO_LAST_USER} END AS c FROM checked)
                  SELECT {FLATTENED} AS prompt, c AS messages, answer, teacher_id, reason FROM cut"""
    else:
        sql = f"""WITH j AS (SELECT {as_json} AS p, answer, teacher_id FROM rows)
                  SELECT p ->> '$' AS prompt, NULL::STRUCT(role VARCHAR, content VARCHAR)[] AS messages, answer, teacher_id,
                         {TEXT_REASON} AS reason FROM j"""
    with duckdb.connect() as connection:
        connection.register("rows", rows)
        checked = connection.sql(sql).to_arrow_table()
    usable = pc.is_null(checked["reason"])
    dropped = dict(collections.Counter(checked["reason"].drop_null().to_pylist()))
    kept = checked.filter(usable).select(["prompt", "messages", "answer", "teacher_id"])
    kept = kept.set_column(1, "messages", kept["messages"].cast(MESSAGES))
    return kept.slice(0, limit), dropped


SLICE_ROWS = 1 << 18  # source rows read at a time by `prompt_tables`
PROMPT_COLUMNS = ["prompt_id", "prompt", "messages", "system_prompt", "answer", "teacher_id", "task", "source", "run_id"]


class PromptSource(BaseModel):
    """Where prompts come from: the task's generator, local files or a `datasets` source."""

    source: Literal["embedded", "files", "datasets"] = Field(
        "embedded",
        description="'embedded': the task's generator; 'files': local jsonl/json/parquet/csv `files`; "
        "'datasets': datasets.load_dataset(`dataset`, `subset`, split=`split`)",
    )
    task: str = Field(
        "arithmetic",
        description="what 'correct' means for these prompts (training/tasks): 'arithmetic' (the embedded task), "
        "'gsm8k' (#### <number>), 'boxed' (\\boxed{…}), 'exact' (normalized string match), 'regex:<pattern with "
        "(?P<answer>…)>', 'module.path:function' (your verifier (completion, reference) → bool | float), or 'none' "
        "(no verifier); stored on every row, read by every asset downstream",
    )
    num_prompts: int = Field(512, ge=1, description="prompts to generate (embedded) or the most to keep")
    seed: int = 0
    files: list[str] = Field([], description="local files for source 'files' (one format)")
    dataset: Optional[str] = Field(None, description="dataset path or hub id for source 'datasets'")
    subset: Optional[str] = Field(None, description="dataset configuration name")
    split: str = "train"
    prompt_column: str = Field(
        "prompt", description="the column with the prompt: text, or a conversation (a list of {role, content}, e.g. "
        "'messages'; turns after the last user turn are cut, as they are the reply the teacher replaces)"
    )
    answer_column: Optional[str] = Field(None, description="column with the reference answer, if any")
    teacher_column: Optional[str] = Field(None, description="column naming the teacher that answers each prompt (stored as "
                                          "`teacher_id`; teacher_labeled's routing 'column' follows it), e.g. by task or topic")
    system_prompt: Optional[str] = Field(
        None, description="a system turn put first in every conversation that has none (needs chat-template models)"
    )

    @model_validator(mode="after")
    def _source_has_input(self):
        if self.source == "files" and not self.files:
            raise ValueError("source 'files' needs `files`: a list of local .jsonl/.json/.parquet/.csv paths")
        if self.source == "datasets" and not self.dataset:
            raise ValueError("source 'datasets' needs `dataset`: a path or hub id for datasets.load_dataset")
        return self


def prompt_tables(settings: PromptSource, split: str, run_id: str) -> Iterator[tuple[pa.Table, dict[str, int]]]:
    """The prompt table of a source (PROMPT_COLUMNS), at most `num_prompts` rows, in slices of at most
    SLICE_ROWS source rows (memory is bounded by a slice: `datasets` memory-maps the source), each
    with the rows it dropped by reason (a slice may keep none); rows are read until `num_prompts` are
    kept; `embedded` generates them with the task. `prompt_id` hashes
    the prompt, the conversation and the system prompt. Raises if no row is usable."""
    task, source, num_prompts = get_task(settings.task), settings.source, settings.num_prompts
    if source == "embedded":
        table, select = task.prompts(split, num_prompts, settings.seed), lambda rows, limit: (rows, {})
    else:
        table = load_source(source, split, settings.files, settings.dataset, settings.subset)
        select = lambda rows, limit: select_prompts(rows, settings.prompt_column, settings.answer_column, limit,
                                                    settings.teacher_column)
    left, dropped = num_prompts, collections.Counter()
    for start in range(0, table.num_rows, SLICE_ROWS):
        rows, reasons = select(table.slice(start, SLICE_ROWS), left)
        dropped.update(reasons)
        for column in ("answer", "teacher_id"):
            if column not in rows.column_names:
                rows = rows.append_column(column, pa.nulls(rows.num_rows, pa.string()))
        rows = with_conversation_columns(rows, settings.system_prompt)
        rows = with_constants(with_content_id(rows, "prompt_id", ["prompt", "messages", "system_prompt"]),
                              task=task.name, source=source, run_id=run_id)
        yield rows.select(PROMPT_COLUMNS), reasons
        left -= rows.num_rows
        if left == 0:
            return
    if left == num_prompts:
        raise ValueError(f"the prompt source has no usable prompts (rows dropped, by reason: {dict(dropped)})")

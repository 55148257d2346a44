"""Export a stored dataset (teacher_labeled, curated, teacher_feedback, …) for other trainers:

    trl        `prompt` and `completion`: what TRL's SFTTrainer (prompt-completion) and its distillation
               trainers load as is; conversational (lists of {role, content}, the prompt with its system
               turn, the completion one assistant turn) when the teacher rendered a chat template, else text
    messages   `messages`: the conversation with the teacher's response as its last, assistant turn, what
               TRL's SFTTrainer (conversational) and GKDTrainer load as is
    axolotl    `messages` plus the sparse teacher signal in axolotl's KD layout (its `kd` integration,
               `type: axolotl.integrations.kd.chat_template`): `target_token_ids` (list<list<int>>) and
               `logprobs` (list<list<float>>), one row of k per completion token, in token-id space (never
               decoded strings), at the signal temperature the dataset stores
    dpo        a pair table (preference_pairs, round_pairs) as TRL's preference layout, one row per pair, what
               its DPOTrainer loads as is: `prompt` (the conversation up to the assistant turn, with its system
               turn), `chosen` and `rejected` (each one assistant turn), conversational when the teacher rendered
               a chat template, else text; and `margin`

The response formats keep `sample_id`, `dpo` keeps `pair_id`, so rows trace back to the stored dataset.
Files are Parquet (or JSON Lines), written whole under a temporary name and renamed, so a reader never
sees half a file.
"""

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from training.models.chat import CONVERSATION, RAW, with_conversation_columns

FORMATS = ("trl", "messages", "axolotl", "dpo")
FILE_TYPES = ("parquet", "jsonl")
PAIR_COLUMNS = {"pair_id", "prompt", "chosen", "rejected", "margin"}


def reply(response: str) -> str:
    """SQL: the column `response` as one assistant turn."""
    return f"[{{'role': 'assistant', 'content': {response}}}]"


def exported(table: pa.Table, format: str) -> pa.Table:
    """`table`'s rows in `format` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {FORMATS}")
    pairs = "pair_id" in table.column_names
    if format == "dpo":
        missing = PAIR_COLUMNS - set(table.column_names)
        if missing:
            raise ValueError(f"the dpo format takes a pair table, and this dataset has no {sorted(missing)}: "
                             "export preference_pairs or round_pairs")
    elif pairs:
        raise ValueError(f"this dataset is a pair table (a chosen and a rejected response per prompt), not responses for "
                         f"the {format} format: export it in the dpo format")
    else:
        missing = {"sample_id", "prompt", "completion"} - set(table.column_names)
        if missing:
            raise ValueError(f"this dataset has no {sorted(missing)}: export a dataset of responses (teacher_labeled, curated, "
                             "expanded, synthesized, student_rollouts, teacher_feedback)")
    table = with_conversation_columns(table)
    conversational = "prompt_rendering" not in table.column_names or set(table["prompt_rendering"].to_pylist()) != {RAW}
    if format == "trl":
        columns = f"({CONVERSATION}) AS prompt, {reply('completion')} AS completion" if conversational else "prompt, completion"
    elif format == "messages":
        columns = f"list_concat({CONVERSATION}, {reply('completion')}) AS messages"
    elif format == "axolotl":
        if "topk_ids" not in table.column_names:
            raise ValueError("the axolotl format needs the teacher's top-k signal: export teacher_labeled, curated or teacher_feedback")
        columns = (f"list_concat({CONVERSATION}, {reply('completion')}) AS messages, "
                   "topk_ids::INTEGER[][] AS target_token_ids, topk_logprobs::FLOAT[][] AS logprobs")
    elif conversational:
        columns = f"({CONVERSATION}) AS prompt, {reply('chosen')} AS chosen, {reply('rejected')} AS rejected, margin"
    else:
        columns = "prompt, chosen, rejected, margin"
    with duckdb.connect() as connection:
        connection.register("rows", table)
        return connection.sql(f"SELECT {'pair_id' if pairs else 'sample_id'}, {columns} FROM rows").to_arrow_table()


def export_dataset(table: pa.Table, format: str, out: Path | str, file_type: str = "parquet") -> Path:
    """Writes `exported(table, format)` to `out`/train.<file_type>; returns the file's path."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown file type {file_type!r}: use one of {FILE_TYPES}")
    rows = exported(table, format)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"train.{file_type}"
    temp = directory / f".train.{file_type}.tmp"
    try:
        if file_type == "parquet":
            pq.write_table(rows, temp, compression="zstd")
        else:
            with duckdb.connect() as connection:
                connection.register("rows", rows)
                connection.sql(f"COPY rows TO '{str(temp).replace(chr(39), chr(39) * 2)}' (FORMAT json)")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path

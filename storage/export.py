"""Export a stored dataset (teacher_labeled, curated, teacher_feedback, …) for other trainers:

    trl        `prompt` and `completion`: what TRL's SFTTrainer (prompt-completion) and its distillation
               trainers load as is; conversational (lists of {role, content}, the prompt with its system
               turn, the completion one assistant turn) when the teacher rendered a chat template, else text
    messages   `messages`: the conversation with the teacher's response as its last, assistant turn, what
               TRL's SFTTrainer (conversational) and GKDTrainer load as is
    axolotl    `messages` plus the sparse teacher signal laid out as axolotl's KD integration reads it
               (`type: axolotl.integrations.kd.chat_template`): `target_token_ids` (list<list<int>>) and
               `logprobs` (list<list<float>>), k per row, in token-id space (never decoded strings), at the
               signal temperature the dataset stores; the rows are aligned to the student's chat template
               (`axolotl_signal`), so it needs the student's tokenizer
    dpo        a pair table (preference_pairs, round_pairs) as TRL's preference layout, one row per pair, what
               its DPOTrainer loads as is: `prompt` (the conversation up to the assistant turn, with its system
               turn), `chosen` and `rejected` (each one assistant turn), conversational when the teacher rendered
               a chat template, else text; and `margin`

The response formats keep `sample_id`, `dpo` keeps `pair_id`, so rows trace back to the stored dataset.
Files are Parquet (or JSON Lines), written whole under a temporary name and renamed, so a reader never
sees half a file; a dataset card (README.md) goes beside them.
"""

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.dataset_card import dataset_card, distinct, write_readme
from storage.store import Store
from training.models.chat import CONVERSATION, RAW, conversations, render, with_conversation_columns
from training.models.tokenizer import tokenizer_hash
from training.schema.signal import CODEC, Q8_CODEC

FORMATS = ("trl", "messages", "axolotl", "dpo")
FILE_TYPES = ("parquet", "jsonl")
EXPORT_ROWS = 8192  # rows exported at a time: memory is bounded by a slice of the dataset
PAIR_COLUMNS = {"pair_id", "prompt", "chosen", "rejected", "margin"}
# axolotl's KD strategy takes exp, then log, of every stored value (after its temperature rescale, a power
# up to T_gen / T_kd): -inf, or a value whose exp underflows float32, becomes NaN in its loss. A floor of
# -40 (p = 4e-18) changes no distribution measurably.
AXOLOTL_LOGPROB_FLOOR = -40.0


def reply(response: str) -> str:
    """SQL: the column `response` as one assistant turn."""
    return f"[{{'role': 'assistant', 'content': {response}}}]"


def axolotl_signal(table: pa.Table, tokenizer) -> tuple[pa.Table, dict]:
    """`table` (responses with the top-k signal) with `target_token_ids` and `target_logprobs` laid out
    for axolotl's KD strategy (`ChatTemplateStrategyWithKDv2`, unchanged from axolotl 0.10 to 0.21), and
    the count of rows dropped, by reason.

    axolotl renders the conversation with the student's chat template into input_ids x_0 … x_{T−1},
    right-aligns the R stored rows to its end (row r at position T − R + r, no shift), masks position p
    by labels[p], and its loss scores the student's hidden state at p, which predicts x_{p+1}, against
    the row at p. So the row at p must hold the teacher's distribution of x_{p+1}. With the reply
    y_0 … y_{n−1} (ending with the end-of-turn token) at positions s … s+n−1, the rows are

        the teacher's n rows, p(y_j | prompt, y_<j), from position s−1 (the prompt's last token, whose
            label is masked: axolotl never trains y_0's row)
        one row per template token after the reply (ChatML's "\\n" after <|im_end|>): probability 1 on it
        a filler row at T−1: probability 1 on the tokenizer's eos (masked where the template ends with
            a token axolotl does not train, like ChatML's "\\n"; where it ends with the end-of-turn
            token, which axolotl trains, it teaches that the sequence ends there)

    so R = n + (template tokens after the reply) + 1, every row k wide, every value finite (floored at
    `AXOLOTL_LOGPROB_FLOOR`). Earlier turns of the conversation get `training: false` (axolotl's
    per-message key), so its cross-entropy term trains on the teacher's reply only, as the KD term does.
    A row is dropped (and counted) when the student's template does not reproduce the stored ids (the
    prompt renders differently with and without the reply, or the reply re-tokenizes into other ids),
    or when the response was cut at the length limit (no end of turn to learn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("axolotl's KD strategy renders conversations with the student's chat template, and this tokenizer "
                         "has none (the embedded pair renders raw text): export --format trl or messages, or pass the "
                         "tokenizer of a chat model (--tokenizer)")
    codecs = set(table["codec"].to_pylist())
    if not codecs <= {CODEC, Q8_CODEC}:  # both hold float logprobs (q8's on a 1/16-nat grid): written as they are
        raise ValueError(f"the axolotl format writes the {CODEC} or {Q8_CODEC} signal (top-k ids and logprobs), and this "
                         f"dataset holds {sorted(codecs)}: decode it first")
    if pc.min(table["k"]).as_py() == 0:
        raise ValueError("the axolotl format writes the teacher's top-k, and this dataset stores k = 0 (each token's own logprob "
                         "only, for objective kl_advantage): export a dataset scored with k ≥ 1")
    if "tokenizer_hash" in table.column_names and set(table["tokenizer_hash"].to_pylist()) != {tokenizer_hash(tokenizer)}:
        raise ValueError("the signal's token ids are the teacher tokenizer's, and this tokenizer has another vocabulary: "
                         "pass the tokenizer of a student that shares the teacher's")
    replies = [conversation + [{"role": "assistant", "content": text}]
               for conversation, text in zip(conversations(table), table["completion"].to_pylist())]
    whole = tokenizer(tokenizer.apply_chat_template(replies, tokenize=False), add_special_tokens=False)["input_ids"]
    prefixes = render(tokenizer, table)
    k, vocabulary, end = table["k"][0].as_py(), len(tokenizer), tokenizer.eos_token_id
    if end is None:
        raise ValueError("the tokenizer has no eos token for axolotl's last (filler) row: set eos_token in its tokenizer_config.json")
    kept, after, dropped = [], [], {"cut_at_length_limit": 0, "prompt_renders_differently": 0, "reply_tokenizes_differently": 0}
    stops = table["finish_reason"].to_pylist()
    for index, (ids, prefix, response, stop) in enumerate(zip(whole, prefixes, table["completion_token_ids"].to_pylist(), stops)):
        reply = ids[len(prefix):]
        if stop != "stop":
            dropped["cut_at_length_limit"] += 1
        elif ids[:len(prefix)] != prefix:
            dropped["prompt_renders_differently"] += 1
        elif reply[:len(response)] != response:
            dropped["reply_tokenizes_differently"] += 1
        else:
            kept.append(index)
            after.append(reply[len(response):] + [end])
    certain = [[[(token + j) % vocabulary for j in range(k)] for token in tokens] for tokens in after]  # probability 1 on the token
    extra = pa.table({"extra_ids": pa.array(certain, pa.list_(pa.list_(pa.int32()))),
                      "extra_logprobs": pa.array([[[0.0] + [AXOLOTL_LOGPROB_FLOOR] * (k - 1)] * len(t) for t in after],
                                                 pa.list_(pa.list_(pa.float32())))})
    with duckdb.connect() as connection:
        connection.register("rows", table.take(pa.array(kept, pa.int64())).append_column("extra_ids", extra["extra_ids"])
                            .append_column("extra_logprobs", extra["extra_logprobs"]))
        floored = f"list_transform(topk_logprobs, lambda r: list_transform(r, lambda x: greatest(x, {AXOLOTL_LOGPROB_FLOOR})))"
        laid_out = connection.sql(f"""SELECT * EXCLUDE (extra_ids, extra_logprobs),
            list_concat(topk_ids::INTEGER[][], extra_ids) AS target_token_ids,
            list_concat({floored}::FLOAT[][], extra_logprobs) AS target_logprobs FROM rows""").to_arrow_table()
    return laid_out, dropped


def widened(table: pa.Table) -> pa.Table:
    """`table` with float16 values (a signal stored at `logprob_dtype: float16`) as float32: DuckDB reads no Arrow
    float16, and the formats' readers expect float32."""
    def wider(type_: pa.DataType) -> pa.DataType:
        if type_ == pa.float16():
            return pa.float32()
        return pa.list_(wider(type_.value_type)) if pa.types.is_list(type_) else type_
    return table.cast(pa.schema([field.with_type(wider(field.type)) for field in table.schema]))


def exported(table: pa.Table, format: str, tokenizer=None, renderings: list[str] | None = None,
             teacher: str | None = None) -> tuple[pa.Table, dict]:
    """`table`'s rows in `format` (see the module docstring), and the rows dropped by reason (axolotl:
    `axolotl_signal`, which needs `tokenizer`, the student's). `renderings`: the dataset's prompt renderings, when
    `table` is a slice of it (the layout, conversational or text, is the dataset's, not the slice's).
    Rows several teachers scored (`teacher_id`): `teacher`'s only; without it each response once, its
    author's row (`written_by`)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {FORMATS}")
    if teacher is not None:
        table = table.filter(pc.equal(table["teacher_id"], teacher))
    elif "written_by" in table.column_names:
        table = table.filter(pc.fill_null(pc.equal(table["teacher_id"], table["written_by"]), True))  # null: labeled before
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
    table = with_conversation_columns(widened(table))
    dropped = {}
    if renderings is None:
        renderings = table["prompt_rendering"].unique().to_pylist() if "prompt_rendering" in table.column_names else []
    conversational = set(renderings) != {RAW}
    if format == "trl":
        columns = f"({CONVERSATION}) AS prompt, {reply('completion')} AS completion" if conversational else "prompt, completion"
    elif format == "messages":
        columns = f"list_concat({CONVERSATION}, {reply('completion')}) AS messages"
    elif format == "axolotl":
        if "topk_ids" not in table.column_names:
            raise ValueError("the axolotl format needs the teacher's top-k signal: export teacher_labeled, curated or teacher_feedback")
        if tokenizer is None:
            raise ValueError("the axolotl format lays the signal out on the student's chat template: give the student's tokenizer")
        table, dropped = axolotl_signal(table, tokenizer)
        earlier = f"list_transform({CONVERSATION}, lambda m: {{'role': m.role, 'content': m.content, 'training': false}})"
        columns = (f"list_concat({earlier}, [{{'role': 'assistant', 'content': completion, 'training': true}}]) AS messages, "
                   "target_token_ids, target_logprobs AS logprobs")
    elif conversational:
        columns = f"({CONVERSATION}) AS prompt, {reply('chosen')} AS chosen, {reply('rejected')} AS rejected, margin"
    else:
        columns = "prompt, chosen, rejected, margin"
    with duckdb.connect() as connection:
        connection.register("rows", table)
        return connection.sql(f"SELECT {'pair_id' if pairs else 'sample_id'}, {columns} FROM rows").to_arrow_table(), dropped


def export_dataset(store: Store, name: str, format: str, out: Path | str, partition: str | None = None,
                   file_type: str = "parquet", tokenizer=None, teacher: str | None = None) -> tuple[Path, dict]:
    """Writes the stored dataset `name` (`partition`) as `exported(rows, format, tokenizer)` to
    `out`/train.<file_type>, `EXPORT_ROWS` rows at a time (memory bounded by a slice, not the dataset),
    with its dataset card as README.md beside it (storage/dataset_card.py), so that `out` is ready to
    push to the Hub; returns the file's path and the rows dropped, by reason. Nothing is left behind
    when it fails."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown file type {file_type!r}: use one of {FILE_TYPES}")
    directory = Path(out)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path, temp = directory / f"train.{file_type}", directory / f".train.{file_type}.tmp"
    dropped, written, num_bytes, schema = Counter(), 0, 0, None
    renderings = distinct(store.shard_paths(name, partition), "prompt_rendering")
    teachers = distinct(store.shard_paths(name, partition), "teacher_id")
    if teacher is not None and teacher not in teachers:
        raise ValueError(f"{name} has no rows of teacher {teacher!r}: its teachers are {teachers}")
    if format == "axolotl" and teacher is None and len(teachers) > 1:
        raise ValueError(f"{name} holds the signals of several teachers ({teachers}): name the one to export (--teacher; "
                         "'mixture' for their mixture)")
    try:
        with open(temp, "wb") as file, contextlib.ExitStack() as closing:
            writer = None
            for slice_ in store.iter_rows(name, partition, rows=EXPORT_ROWS):
                rows, left_out = exported(slice_, format, tokenizer, renderings, teacher)
                dropped.update(left_out)
                schema = schema or rows.schema
                rows = rows.cast(schema)
                written, num_bytes = written + rows.num_rows, num_bytes + rows.nbytes
                if file_type == "parquet":
                    writer = writer or closing.enter_context(pq.ParquetWriter(file, schema, compression="zstd"))
                    writer.write_table(rows)
                else:
                    file.write(json_lines(rows))
            if schema is None and format != "axolotl":  # an empty dataset: an empty file of the format's columns
                schema = exported(store.read_dataset(name, partition), format, tokenizer, renderings, teacher)[0].schema
                if file_type == "parquet":
                    closing.enter_context(pq.ParquetWriter(file, schema, compression="zstd"))
        if format == "axolotl" and not written:
            reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count)
            raise ValueError(f"no row could be laid out for axolotl ({reasons}): responses need an end of turn (raise the "
                             "sampling's max_new_tokens) and ids the student's template reproduces" if reasons else
                             f"{name} has no rows to export")
        card = dataset_card(store, name, partition, schema, path.name, written, num_bytes, format, dict(dropped))
        os.replace(temp, path)
        write_readme(card, directory)
    except BaseException:
        temp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return path, dict(dropped)


def json_lines(rows: pa.Table) -> bytes:
    """`rows` as JSON Lines, as DuckDB writes them."""
    with duckdb.connect() as connection, tempfile.TemporaryDirectory() as scratch:
        connection.register("rows", rows)
        lines = Path(scratch) / "rows.jsonl"
        connection.sql(f"COPY rows TO '{str(lines).replace(chr(39), chr(39) * 2)}' (FORMAT json)")
        return lines.read_bytes()

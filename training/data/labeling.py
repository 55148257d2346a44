"""Labeling: the teacher answers prompts, then scores its own answers into the sparse signal.

Generation and scoring are separate engine calls, so the stored logprobs are always the raw model
distribution at `signal_temperature`, whatever temperature or top_p sampled the response.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from training.engines.base import Engine
from training.engines.sampling import Sampling
from training.models.chat import prompt_ids_for, prompt_rendering, render
from training.schema.cards import ModelCard
from training.schema.signal import CODECS, LOGPROB_MODE, SignalSettings, signal_columns, signal_statistics
from training.schema.tables import join_prompts, with_constants, with_content_id

if TYPE_CHECKING:
    from training.tasks import Task


class LabelingSettings(SignalSettings):
    """How the teacher answers prompts (and, inherited, what of its distribution is stored)."""

    sampling: Sampling = Field(Sampling(temperature=0.0, max_new_tokens=96),
                               description="how the responses are sampled (greedy by default; the longest embedded solution is "
                               "~75 tokens); each shard of the inputs samples with its own seed (derived_seed)")
    overlong_prompts: Literal["drop", "truncate"] = Field(
        "drop", description="prompts that leave no room for max_new_tokens: drop them, or keep their last tokens"
    )


@dataclass
class Labeled:
    table: pa.Table  # one row per response: prompt_index, sample_index, ids, text, signal columns
    dropped_overlong: int
    truncated_overlong: int
    statistics: dict


def fit_prompts(engine: Engine, prompts: pa.Table, max_new_tokens: int, overlong: str):
    """Token ids per prompt row, rendered for the engine's model (`training.chat.render`), with room
    for `max_new_tokens` in the context; overlong ones are dropped (None) or keep their last tokens.
    Returns (ids or None per prompt, dropped, truncated)."""
    budget = engine.context_length - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{engine.context_length}-token context; lower max_new_tokens"
        )
    encoded = render(engine.tokenizer, prompts)
    lengths = np.array([len(ids) for ids in encoded])
    overlong_rows = lengths > budget
    if overlong == "drop":
        fitted = [None if too_long else ids for ids, too_long in zip(encoded, overlong_rows)]
        return fitted, int(overlong_rows.sum()), 0
    fitted = [ids[-budget:] for ids in encoded]
    return fitted, 0, int(overlong_rows.sum())


def sample(engine: Engine, prompts: pa.Table, sampling: Sampling, overlong: str = "drop", logprob_column: str | None = None):
    """n completions per prompt row (`prompt`, optionally `messages`, `system_prompt`) from `engine`,
    as token ids. Returns (table, dropped, truncated); the table has one row per completion:
    prompt_index (into `prompts`), sample_index, prompt_token_ids (as the model saw them),
    prompt_rendering, completion_token_ids, completion, finish_reason, num_tokens; with
    `logprob_column`, also each sampled token's raw logprob (T = 1) as the engine sampled it, under that name."""
    fitted, dropped, truncated = fit_prompts(engine, prompts, sampling.max_new_tokens, overlong)
    kept = [i for i, ids in enumerate(fitted) if ids is not None]
    prompt_ids = [fitted[i] for i in kept]
    generations = engine.generate(prompt_ids, sampling, logprobs=1 if logprob_column else 0) if prompt_ids else []
    columns = {
        "prompt_index": pa.array([kept[g.prompt_index] for g in generations], pa.int64()),
        "sample_index": pa.array([g.sample_index for g in generations], pa.int32()),
        "prompt_token_ids": pa.array([prompt_ids[g.prompt_index] for g in generations], pa.list_(pa.int32())),
        "prompt_rendering": pa.array([prompt_rendering(engine.tokenizer)] * len(generations), pa.string()),
        "completion_token_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
        "completion": pa.array([g.text for g in generations], pa.string()),
        "finish_reason": pa.array([g.finish_reason for g in generations], pa.string()),
        "num_tokens": pa.array([len(g.completion_ids) for g in generations], pa.int32()),
    }
    if logprob_column:
        columns[logprob_column] = pa.array([g.signal.token_logprob for g in generations], pa.list_(pa.float32()))
    return pa.table(columns), dropped, truncated


def score(
    engine: Engine, sequences: pa.Table, k: int, signal_temperature: float = 1.0, logprob_dtype: str = "float32"
) -> tuple[pa.Table, dict]:
    """`engine`'s sparse signal on every completion token of `sequences` (prompt_token_ids,
    completion_token_ids; the prompts rendered anew when another template rendered them, see
    `training.chat.prompt_ids_for`): a table of the signal columns plus k, temperature, logprob_mode
    and codec, one row per sequence, and statistics."""
    signals = engine.score(
        prompt_ids_for(engine.tokenizer, sequences).to_pylist(), sequences["completion_token_ids"].to_pylist(), k, signal_temperature
    )
    table = with_constants(
        pa.table(signal_columns(signals, logprob_dtype)), k=pa.scalar(k, pa.int32()),
        temperature=pa.scalar(signal_temperature, pa.float32()), logprob_mode=LOGPROB_MODE, codec=CODECS[logprob_dtype],
    )
    return table, signal_statistics(signals)


def with_columns(table: pa.Table, columns: pa.Table) -> pa.Table:
    """`table` with every column of `columns` (as many rows) appended, or put in place of its namesake."""
    for name in columns.column_names:
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, columns[name]) if index >= 0 else table.append_column(name, columns[name])
    return table


def label(
    engine: Engine,
    prompts: pa.Table,
    sampling: Sampling,
    k: int,
    signal_temperature: float = 1.0,
    overlong: str = "drop",
    logprob_dtype: str = "float32",
) -> Labeled:
    """n responses per prompt row with the teacher's top-k signal on every response token."""
    if k > len(engine.tokenizer):
        raise ValueError(f"k={k} is larger than the vocabulary ({len(engine.tokenizer)} tokens); lower k")
    engine.check_signal(k, signal_temperature)
    responses, dropped, truncated = sample(engine, prompts, sampling, overlong)
    signal, statistics = score(engine, responses, k, signal_temperature, logprob_dtype)
    return Labeled(with_columns(responses, signal), dropped, truncated, statistics)


def label_table(engine: Engine, prompts: pa.Table, settings: LabelingSettings, card: ModelCard, task: "Task", run_id: str,
                id_columns: tuple = (), shard: int = 0) -> tuple[pa.Table, dict]:
    """Teacher responses to `prompts` (prompt_id, prompt, answer, and any extra columns, carried onto
    each response) with the sparse signal, the task's verdict (`correct`) and the teacher's identity;
    returns (table, metrics). `sample_id` hashes the prompt, the response, the teacher, the sampling
    and `id_columns`. `shard` numbers the slice of a dataset `prompts` is (its own seed: derived_seed)."""
    sampling = settings.sampling.derived(part=shard)
    labeled = label(engine, prompts, sampling, settings.k, settings.signal_temperature,
                    settings.overlong_prompts, settings.logprob_dtype)
    table = join_prompts(labeled.table, prompts.drop_columns([c for c in ("task", "source", "run_id") if c in prompts.column_names]))
    table = table.append_column("correct", task.verify(table["completion"], table["answer"]))
    table = with_constants(
        table, teacher=card.name, teacher_revision=card.revision, teacher_weights_hash=card.weights_hash,
        tokenizer_hash=card.tokenizer_hash, sampling=sampling.as_json(), run_id=run_id,
    )
    identity = ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash", "sampling", *id_columns]
    table = with_content_id(table, "sample_id", identity)
    correct = table["correct"].drop_null()
    metrics = {
        **labeled.statistics,
        "responses": table.num_rows,
        "dropped_overlong_prompts": labeled.dropped_overlong,
        "truncated_overlong_prompts": labeled.truncated_overlong,
        "teacher_accuracy": pc.mean(pc.cast(correct, pa.float64())).as_py() if len(correct) else None,
        "stopped_share": finished_share(table),
        "engine": engine.backend,
        "cache_hit_rate": getattr(engine, "hit_rate", None),
    }
    return table, metrics


def finished_share(table: pa.Table) -> float | None:
    """The share of completions that ended at an end-of-turn id or stop string (finish_reason 'stop')
    rather than at the length limit."""
    return pc.mean(pc.cast(pc.equal(table["finish_reason"], "stop"), pa.float64())).as_py()

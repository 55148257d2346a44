"""Labeling: the teacher answers prompts, then scores its own answers into the sparse signal.

Generation and scoring are separate engine calls, so the stored logprobs are always the raw model
distribution at `signal_temperature`, whatever temperature or top_p sampled the response.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from training.engines.base import Engine, SamplingParams
from training.signal import CODEC, LOGPROB_MODE, signal_columns, signal_statistics


@dataclass
class Labeled:
    table: pa.Table  # one row per response: prompt_index, sample_index, ids, text, signal columns
    dropped_overlong: int
    truncated_overlong: int
    statistics: dict


def fit_prompts(engine: Engine, prompts: list[str], max_new_tokens: int, overlong: str):
    """Token ids per prompt with room for `max_new_tokens` in the context; overlong ones are dropped
    (None) or keep their last tokens. Returns (ids or None per prompt, dropped, truncated)."""
    budget = engine.context_length - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{engine.context_length}-token context; lower max_new_tokens"
        )
    encoded = engine.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded])
    overlong_rows = lengths > budget
    if overlong == "drop":
        fitted = [None if too_long else ids for ids, too_long in zip(encoded, overlong_rows)]
        return fitted, int(overlong_rows.sum()), 0
    fitted = [ids[-budget:] for ids in encoded]
    return fitted, 0, int(overlong_rows.sum())


def sample(engine: Engine, prompts: list[str], sampling: SamplingParams, overlong: str = "drop"):
    """n completions per prompt from `engine`, as token ids. Returns (table, dropped, truncated); the
    table has one row per completion: prompt_index (into `prompts`), sample_index, prompt_token_ids,
    completion_token_ids, completion, finish_reason, num_tokens."""
    fitted, dropped, truncated = fit_prompts(engine, prompts, sampling.max_new_tokens, overlong)
    kept = [i for i, ids in enumerate(fitted) if ids is not None]
    prompt_ids = [fitted[i] for i in kept]
    generations = engine.generate(prompt_ids, sampling) if prompt_ids else []
    columns = {
        "prompt_index": pa.array([kept[g.prompt_index] for g in generations], pa.int64()),
        "sample_index": pa.array([g.sample_index for g in generations], pa.int32()),
        "prompt_token_ids": pa.array([prompt_ids[g.prompt_index] for g in generations], pa.list_(pa.int32())),
        "completion_token_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
        "completion": pa.array([g.text for g in generations], pa.string()),
        "finish_reason": pa.array([g.finish_reason for g in generations], pa.string()),
        "num_tokens": pa.array([len(g.completion_ids) for g in generations], pa.int32()),
    }
    return pa.table(columns), dropped, truncated


def score(
    engine: Engine, sequences: pa.Table, k: int, signal_temperature: float = 1.0, logprob_type: pa.DataType = pa.float32()
) -> tuple[dict[str, pa.Array], dict]:
    """`engine`'s sparse signal on every completion token of `sequences` (prompt_token_ids,
    completion_token_ids): the signal columns plus k, temperature, logprob_mode and codec, and statistics."""
    signals = engine.score(
        sequences["prompt_token_ids"].to_pylist(), sequences["completion_token_ids"].to_pylist(), k, signal_temperature
    )
    n = sequences.num_rows
    columns = {
        **signal_columns(signals, logprob_type),
        "k": pa.repeat(pa.scalar(k, pa.int32()), n),
        "temperature": pa.repeat(pa.scalar(signal_temperature, pa.float32()), n),
        "logprob_mode": pa.repeat(pa.scalar(LOGPROB_MODE), n),
        "codec": pa.repeat(pa.scalar(CODEC), n),
    }
    return columns, signal_statistics(signals)


def label(
    engine: Engine,
    prompts: list[str],
    sampling: SamplingParams,
    k: int,
    signal_temperature: float = 1.0,
    overlong: str = "drop",
    logprob_type: pa.DataType = pa.float32(),
) -> Labeled:
    """n responses per prompt with the teacher's top-k signal on every response token."""
    if k > len(engine.tokenizer):
        raise ValueError(f"k={k} is larger than the vocabulary ({len(engine.tokenizer)} tokens); lower k")
    engine.check_signal(k, signal_temperature)
    responses, dropped, truncated = sample(engine, prompts, sampling, overlong)
    columns, statistics = score(engine, responses, k, signal_temperature, logprob_type)
    table = responses
    for name, column in columns.items():
        table = table.append_column(name, column)
    return Labeled(table, dropped, truncated, statistics)

"""The sparse teacher signal: top-k token ids and logprobs per completion token, plus the tail.

For every completion token t of a sequence the teacher's distribution p_t (at `temperature`, from raw
model logits, before any sampling processor) is stored as

    topk_ids[t]       k token ids, int32, by descending probability
    topk_logprobs[t]  their log p_t, sorted descending
    token_logprob[t]  log p_t(y_t) of the token actually in the sequence
    tail_mass[t]      1 − Σ_{i∈top-k} p_t(i), the mass the top-k leaves out

so the tail policy (renormalize over the top-k, or a (k+1)-th bucket) is a training-time choice.

Codecs (the `codec` column; each a value of `SignalSettings.logprob_dtype`):
    topk-v1     the logprobs in float32, or float16 (`logprob_dtype: float16`)
    topk-q8-v1  the logprobs rounded to multiples of 1/16 nat, the top-k's clamped at −255/16, the tail
                mass to float16's precision (`logprob_dtype: q8`). Still float32 columns, so DuckDB,
                training and the exports read them as they read topk-v1; but a top-k logprob takes at
                most 256 values, which Parquet's dictionary encoding stores in 8 bits (with zstd on
                top): ~2× smaller than float16 at V = 151,936, for a loss within 1e-3 of float32's
                (docs/benchmarks.md). The rounding is monotone, so the top-k stays sorted.
A sampled, importance-weighted codec would get a new codec name.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, Field

CODEC = "topk-v1"
Q8_CODEC = "topk-q8-v1"
CODECS = {"float32": CODEC, "float16": CODEC, "q8": Q8_CODEC}  # logprob_dtype → the codec its rows are stamped with
Q8_STEPS_PER_NAT = 16
Q8_FLOOR = -255 / Q8_STEPS_PER_NAT  # the top-k logprobs' lowest value: with 0, 256 values in all
LOGPROB_MODE = "raw"
STUDENT_LOGPROB = "student_token_logprob"  # on the student's own samples: log q(y_t) of each token, as it was sampled


class SignalSettings(BaseModel):
    """What of the teacher's distribution is stored per token (teacher_labeled, teacher_feedback)."""

    k: int = Field(20, ge=0, description="top-k teacher logprobs stored per token; 0 keeps only each token's own logprob "
                   "(token_logprob: all that objective kl_advantage needs, one logprob per token from a server)")
    signal_temperature: float = Field(
        1.0, gt=0, description="temperature of the stored distribution, log_softmax(logits / T); 1 is raw"
    )
    logprob_dtype: Literal[tuple(CODECS)] = Field(
        "float32", description="how the logprobs are stored: 'float32'; 'float16'; 'q8': rounded to 1/16 nat (codec "
        "topk-q8-v1, ~2× smaller than float16 at a real vocabulary, still read as floats everywhere)"
    )


@dataclass
class SparseSignal:
    """The signal of one sequence's completion: arrays with one row per completion token."""

    topk_ids: np.ndarray  # (T, k) int32
    topk_logprobs: np.ndarray  # (T, k) float32
    token_logprob: np.ndarray  # (T,) float32
    tail_mass: np.ndarray  # (T,) float32


def topk_signal(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0):
    """(…, V) logits and (…) targets → top-k ids, top-k logprobs, target logprob, tail mass.

    log p = log_softmax(logits / temperature); tail = 1 − Σ_top-k exp(log p), clamped to [0, 1].
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    token_logprob = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return topk_ids.to(torch.int32), topk_logprobs, token_logprob, tail_mass(topk_logprobs)


def tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """1 − Σ_top-k exp(log p), clamped to [0, 1]."""
    return (1.0 - topk_logprobs.exp().sum(-1)).clamp(0.0, 1.0)


def signal_from_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray, token_logprob: np.ndarray) -> SparseSignal:
    """A SparseSignal from a backend's (T, k) top-k ids and logprobs and (T,) actual-token logprobs."""
    topk_logprobs = np.ascontiguousarray(topk_logprobs, dtype=np.float32)
    return SparseSignal(
        np.ascontiguousarray(topk_ids, dtype=np.int32),
        topk_logprobs,
        np.ascontiguousarray(token_logprob, dtype=np.float32),
        tail_mass(torch.from_numpy(topk_logprobs)).numpy(),
    )


def nested_lists(flat: np.ndarray, lengths: np.ndarray, width: int | None, value_type: pa.DataType) -> pa.Array:
    """Flat values → list<value> per sequence (width None) or list<list<value>> (width k per token)."""
    values = pa.array(flat.reshape(-1), type=value_type)
    if width is not None:  # k = 0 too: an empty list per token
        values = pa.ListArray.from_arrays(pa.array(np.arange(int(lengths.sum()) + 1, dtype=np.int32) * width), values)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def on_q8_grid(logprobs: np.ndarray, floor: float | None = None) -> np.ndarray:
    """Logprobs rounded to the nearest multiple of 1/16 nat (at most 1/32 off), not below `floor`."""
    rounded = np.round(logprobs * Q8_STEPS_PER_NAT) / Q8_STEPS_PER_NAT
    return rounded if floor is None else np.maximum(rounded, floor)


def mixed_signal(signals: list[SparseSignal], weights: np.ndarray) -> SparseSignal:
    """The mixture p = Σ_j w_j p_j of several teachers' signals on the same tokens (one tokenizer, one
    temperature), stored like one teacher's: over the union of their top-k,

        p(i) = Σ_j w_j p_j(i)   (p_j(i) taken as 0 where i is outside teacher j's top-k: that mass
                                 stays in its tail, so the mixture's tail mass 1 − Σ_top-k p keeps it)

    the k most probable ids of the union, sorted; the token's own logprob is exact,
    log Σ_j w_j exp(token_logprob_j). `weights` sum to 1."""
    ids = np.concatenate([s.topk_ids for s in signals], axis=1)  # (T, m·k): every teacher's candidates
    probs = np.concatenate([w * np.exp(s.topk_logprobs.astype(np.float64)) for s, w in zip(signals, weights)], axis=1)
    order = np.argsort(ids, axis=1, kind="stable")
    ids, probs = np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)
    first = np.ones(ids.shape, bool)  # the first entry of each run of one id holds the run's summed probability
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(first)
    summed = np.full(ids.shape, -np.inf)  # each id's mixed probability, once
    if starts.size:
        summed.reshape(-1)[starts] = np.add.reduceat(probs.reshape(-1), starts)  # runs never cross rows: each row starts one
    k = signals[0].topk_ids.shape[1]
    top = np.argsort(-summed, axis=1, kind="stable")[:, :k]
    token = np.log(sum(w * np.exp(s.token_logprob.astype(np.float64)) for s, w in zip(signals, weights)))
    return signal_from_topk(np.take_along_axis(ids, top, 1), np.log(np.take_along_axis(summed, top, 1)), token)


def signal_columns(signals: list[SparseSignal], logprob_dtype: str = "float32") -> dict[str, pa.Array]:
    """Arrow columns for a batch of signals, built from concatenated arrays (no per-token loops), the
    logprobs stored as `logprob_dtype` says (`CODECS`)."""
    lengths = np.array([len(s.token_logprob) for s in signals], dtype=np.int64)
    k = signals[0].topk_ids.shape[1] if signals else 0
    empty = lambda name: np.zeros((0, k) if name.startswith("topk") else 0)
    cat = lambda name: np.concatenate([getattr(s, name) for s in signals]) if signals else empty(name)
    return flat_signal_columns(SparseSignal(*(cat(name) for name in SparseSignal.__dataclass_fields__)), lengths, logprob_dtype)


def flat_signal_columns(signal: SparseSignal, lengths: np.ndarray, logprob_dtype: str = "float32") -> dict[str, pa.Array]:
    """`signal_columns` from one signal over all the rows' tokens, in order, `lengths` tokens per row."""
    k = signal.topk_ids.shape[1]
    topk_logprobs, token_logprob, tail = (a.astype(np.float32) for a in (signal.topk_logprobs, signal.token_logprob, signal.tail_mass))
    if logprob_dtype == "q8":
        topk_logprobs, token_logprob = on_q8_grid(topk_logprobs, Q8_FLOOR), on_q8_grid(token_logprob)
        tail = tail.astype(np.float16).astype(np.float32)
    return {
        "topk_ids": nested_lists(signal.topk_ids.astype(np.int32), lengths, k, pa.int32()),
        "topk_logprobs": nested_lists(topk_logprobs, lengths, k, pa.float16() if logprob_dtype == "float16" else pa.float32()),
        "token_logprob": nested_lists(token_logprob, lengths, None, pa.float32()),
        "tail_mass": nested_lists(tail, lengths, None, pa.float32()),
    }


def signals_from_columns(table: pa.Table) -> list[SparseSignal]:
    """The inverse of `signal_columns`: one SparseSignal per row of a table with the signal columns."""
    if table.num_rows == 0:
        return []
    signal, lengths = flat_signal(table)
    splits = np.cumsum(lengths)[:-1]
    parts = (np.split(getattr(signal, name), splits) for name in SparseSignal.__dataclass_fields__)
    return [SparseSignal(*pieces) for pieces in zip(*parts)]


def flat_signal(table: pa.Table) -> tuple[SparseSignal, np.ndarray]:
    """One signal over all the tokens of a table with the signal columns, in order, and the tokens per row."""
    lengths = pc.list_value_length(table.column("token_logprob")).to_numpy(zero_copy_only=False)
    k = int(pc.max(pc.list_value_length(pc.list_flatten(table.column("topk_ids")))).as_py() or 0)
    token_logprob = _flatten(table.column("token_logprob"), 1).astype(np.float32)
    topk_ids = _flatten(table.column("topk_ids"), 2).astype(np.int32).reshape(len(token_logprob), k)
    topk_logprobs = _flatten(table.column("topk_logprobs"), 2).astype(np.float32).reshape(len(token_logprob), k)
    tail = _flatten(table.column("tail_mass"), 1).astype(np.float32)
    return SparseSignal(topk_ids, topk_logprobs, token_logprob, tail), lengths


def signal_statistics(signals: list[SparseSignal]) -> dict[str, float]:
    """Tokens, mean entropy of the renormalized top-k distribution, mean tail mass, mean token logprob."""
    if not signals:
        return {"tokens": 0, "mean_topk_entropy": float("nan"), "mean_tail_mass": float("nan")}
    logprobs = torch.from_numpy(np.concatenate([s.topk_logprobs for s in signals]).astype(np.float32))
    renormalized = torch.log_softmax(logprobs, dim=-1)
    entropy = -(renormalized.exp() * renormalized).sum(-1)
    return {
        "tokens": int(logprobs.shape[0]),
        "mean_topk_entropy": float(entropy.mean()),
        "mean_tail_mass": float(np.concatenate([s.tail_mass for s in signals]).mean()),
        "mean_token_logprob": float(np.concatenate([s.token_logprob for s in signals]).mean()),
    }


def _flatten(column: pa.ChunkedArray, depth: int) -> np.ndarray:
    for _ in range(depth):
        column = pc.list_flatten(column)
    return column.to_numpy()


def signal_violations(table: pa.Table, vocab_size: int) -> dict[str, int]:
    """Counts of invalid entries in a table's signal columns; all zero means the signal is valid.

    Valid: k ids per token, ids in [0, vocab), logprobs finite, ≤ 0 and sorted descending per token,
    token logprob finite and ≤ 0, tail mass in [0, 1].
    """
    ids = _flatten(table.column("topk_ids"), 2)
    logprobs = _flatten(table.column("topk_logprobs"), 2).astype(np.float32)
    token_logprob = _flatten(table.column("token_logprob"), 1)
    tail_mass = _flatten(table.column("tail_mass"), 1)
    k = table.column("k").to_numpy()
    tokens = pc.list_value_length(table.column("token_logprob")).to_numpy(zero_copy_only=False)
    expected = int((k.astype(np.int64) * tokens).sum())
    width_ok = ids.size == expected and logprobs.size == expected and (len(k) == 0 or (k == k[0]).all())
    unsorted = (np.diff(logprobs.reshape(len(token_logprob), int(k[0])), axis=1) > 1e-6).any(axis=1).sum() if width_ok and len(k) else 0
    return {
        "topk_width_mismatch": int(not width_ok),
        "ids_out_of_vocab": int(((ids < 0) | (ids >= vocab_size)).sum()),
        "logprob_not_finite": int((~np.isfinite(logprobs)).sum() + (~np.isfinite(token_logprob)).sum()),
        "logprob_positive": int((logprobs > 1e-6).sum() + (token_logprob > 1e-6).sum()),
        "topk_not_sorted": int(unsorted),
        "tail_mass_out_of_range": int((~((tail_mass >= 0) & (tail_mass <= 1))).sum()),
    }

"""Objectives: what the loop minimizes on a batch. Each is one entry of `OBJECTIVES`, as a divergence
is one entry of `DIVERGENCES`: the batch kinds it takes, and the loss it trains a batch with.

    sft            −log q(y) on the sequence's tokens: SeqKD on teacher data     takes tokens, signal
    supervised_kd  D(p‖q) on the stored top-k (+ w_nll · NLL), `sparse_kd_loss`  takes signal

A batch's kind is read from its columns (`batch_kind`). A new objective (a reward term, a ranking
loss, an aligned cross-tokenizer loss) is a new entry here, never a new branch in the loop.
"""

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from training.trainer.losses import LossSettings, sparse_kd_loss

BATCH_KINDS = {"tokens": "token ids only", "signal": "token ids with the teacher's sparse top-k signal"}


def batch_kind(rows: pa.Table) -> str:
    return "signal" if "topk_ids" in rows.column_names else "tokens"


@dataclass(frozen=True)
class Objective:
    takes: frozenset[str]  # the batch kinds it trains on (BATCH_KINDS)
    settings: Callable[[LossSettings, str], LossSettings]  # (the configured loss, the batch's source) → the loss it uses
    loss: Callable = sparse_kd_loss  # (logits, SparseBatch, LossSettings, stored temperature, normalizer) → (loss, parts)


def divergence_for(configured: LossSettings, source: str) -> LossSettings:
    """The configured divergence; on-policy batches take `on_policy_divergence` when it is set
    (DistiLLM-2: skew KL on the teacher's data, skew reverse KL on the student's samples)."""
    settings = configured.model_dump(include=set(LossSettings.model_fields))
    other = getattr(configured, "on_policy_divergence", "same")
    if source == "on_policy" and other != "same":
        settings["divergence"] = other
    return LossSettings(**settings)


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(frozenset({"tokens", "signal"}), lambda configured, source: LossSettings(divergence="none", nll_weight=1.0)),
    "supervised_kd": Objective(frozenset({"signal"}), divergence_for),
}


def check_takes(objective: str, rows: pa.Table, source: str) -> None:
    """Fails before training when the objective cannot train on rows of this kind."""
    kind = batch_kind(rows)
    if kind not in OBJECTIVES[objective].takes:
        raise ValueError(f"objective {objective!r} trains on {' or '.join(BATCH_KINDS[k] for k in sorted(OBJECTIVES[objective].takes))}, "
                         f"but the {source} rows hold {BATCH_KINDS[kind]}: use objective 'sft', or label them with the teacher")

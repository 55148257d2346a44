"""Objectives: what the loop minimizes on a batch. Each is one entry of `OBJECTIVES`, as a divergence
is one entry of `DIVERGENCES`: the batch kinds it takes, and the loss it trains a batch with.

    sft            −log q(y) on the sequence's tokens: SeqKD on teacher data            takes tokens, signal
    supervised_kd  D(p‖q) on the stored top-k (+ w_nll · NLL), `sparse_kd_loss`        takes signal
    dpo            −log σ(β · the margin of the implicit rewards), `ranking.dpo_loss`   takes pairs
                   (+ kd_weight · D(p‖q) on both responses, + w_nll · NLL of the chosen)
    rrhf           Σ_{s_i < s_j} max(0, p_i − p_j) − p_best, `ranking.rrhf_loss`       takes ranked
    gkd_rl         D(p‖q) + w_r · PG(A = r − b): GKD with RL, reward maximization       takes signal
                   regularized by the divergence (GKD §5); b the mean reward of the prompt's samples
    kl_advantage   PG(A_t = log p(y_t) − log q_old(y_t) + w_r (r − b)): on-policy       takes signal
                   distillation as an advantage (verl, slime, tinker); needs only the teacher's
                   logprob of each sampled token, so k = 0 signals train too

PG is the clipped policy-gradient surrogate of `losses.policy_gradient_sums`; it applies to the
student's own samples (rows with `student_token_logprob`). On fixed batches (λ < 1) gkd_rl and
kl_advantage train the divergence alone, as supervised_kd.

A batch's kind is read from its columns (`batch_kind`); the kind says how its rows become tensors for
one forward, what its loss is averaged over (completion tokens, pairs, prompts) and how long its
longest sequence is, so the loop trains every kind alike. A new objective (a reward term, a ranking
loss, an aligned cross-tokenizer loss) is a new entry here, never a new branch in the loop.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from training.models.batches import list_lengths
from training.trainer.losses import LossSettings, sparse_batch, sparse_kd_loss
from training.trainer.ranking import (
    dpo_loss,
    pair_batch,
    pair_counts,
    pair_lengths,
    ranked_batch,
    ranked_counts,
    ranked_lengths,
    rrhf_loss,
)


def token_counts(rows: pa.Table) -> dict[str, int]:
    """What a token batch is averaged over: its completion tokens."""
    return {"completion_tokens": int(list_lengths(rows["completion_token_ids"]).sum())}


def sequence_lengths(rows: pa.Table) -> np.ndarray:
    return list_lengths(rows["prompt_token_ids"]) + list_lengths(rows["completion_token_ids"])


@dataclass(frozen=True)
class BatchKind:
    description: str  # for the messages
    build: str  # how to make rows of this kind, for the messages
    batch: Callable  # (rows, pad_token_id, k) → the tensors of one forward (a SparseBatch)
    counts: Callable[[pa.Table], dict[str, int]]  # rows → what a loss divides by; always with "completion_tokens"
    unit: str  # the count its loss and parts are averaged over
    lengths: Callable[[pa.Table], np.ndarray]  # rows → each row's longest sequence, for micro-batches of similar length


BATCH_KINDS = {
    "tokens": BatchKind("token ids only", "label prompts with the teacher", sparse_batch, token_counts, "completion_tokens",
                        sequence_lengths),
    "signal": BatchKind("token ids with the teacher's sparse top-k signal", "label them with the teacher", sparse_batch,
                        token_counts, "completion_tokens", sequence_lengths),
    "pairs": BatchKind("preference pairs (chosen and rejected token ids, the reference's log-probs)",
                       "build them with preference_pairs / round_pairs", pair_batch, pair_counts, "pairs", pair_lengths),
    "ranked": BatchKind("ranked responses (each prompt's responses_token_ids and scores)",
                        "build them from teacher_judgments, a row per prompt", ranked_batch, ranked_counts, "prompts", ranked_lengths),
}

RANKING_KINDS = frozenset({"pairs", "ranked"})  # judged responses against each other: the ranking objectives' kinds


def batch_kind(rows: pa.Table) -> str:
    columns = rows.column_names
    if "chosen_token_ids" in columns:
        return "pairs"
    if "responses_token_ids" in columns:
        return "ranked"
    return "signal" if "topk_ids" in columns else "tokens"


def token_loss(student, batch, settings: LossSettings, stored_temperature: float, counts: dict[str, int]):
    """`sparse_kd_loss` per completion token of the global batch."""
    return sparse_kd_loss(student, batch, settings, stored_temperature, normalizer=counts["completion_tokens"])


def own_samples(batch, stored_temperature: float) -> bool:
    """Whether the batch is the student's own samples, which a policy gradient trains on; their
    importance ratio needs the teacher and the sampler at the raw model (T = 1)."""
    if batch.sampled_logprobs is None:
        return False
    if stored_temperature != 1.0:
        raise ValueError(f"a policy gradient weighs each token by q_θ(y)/q_old(y) at T = 1, and the teacher's signal is stored "
                         f"at temperature {stored_temperature}: score the rollouts with signal_temperature 1")
    return True


def gkd_rl_loss(student, batch, settings: LossSettings, stored_temperature: float, counts: dict[str, int]):
    """D(p‖q) on every batch, + reward_weight · PG of the sequence advantage r − b on own samples."""
    advantages = settings.reward_weight * batch.advantages if own_samples(batch, stored_temperature) else None
    return sparse_kd_loss(student, batch, settings, stored_temperature, counts["completion_tokens"], advantages)


def kl_advantage_loss(student, batch, settings: LossSettings, stored_temperature: float, counts: dict[str, int]):
    """PG of A_t = log p(y_t) − log q_old(y_t) + reward_weight · (r − b) on own samples; the divergence on fixed batches."""
    if not own_samples(batch, stored_temperature):
        return token_loss(student, batch, settings, stored_temperature, counts)
    advantages = batch.teacher_token_logprobs - batch.sampled_logprobs
    if batch.advantages is not None:
        advantages = advantages + settings.reward_weight * batch.advantages
    policy_only = settings.model_copy(update={"divergence": "none", "nll_weight": 0.0})
    return sparse_kd_loss(student, batch, policy_only, stored_temperature, counts["completion_tokens"], advantages)


@dataclass(frozen=True)
class Objective:
    takes: frozenset[str]  # the batch kinds it trains on (BATCH_KINDS)
    settings: Callable[[LossSettings, str], LossSettings]  # (the configured loss, the batch's source) → the loss it uses
    loss: Callable = token_loss  # (student, batch, LossSettings, stored temperature, the global batch's counts) → (loss, parts)
    takes_hidden: bool = True  # its loss takes the student's `HiddenStates` as well as its logits (training/trainer/head.py)


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
    "dpo": Objective(frozenset({"pairs"}), divergence_for, dpo_loss, takes_hidden=False),
    "rrhf": Objective(frozenset({"ranked"}), divergence_for, rrhf_loss, takes_hidden=False),
    "gkd_rl": Objective(frozenset({"signal"}), divergence_for, gkd_rl_loss),
    "kl_advantage": Objective(frozenset({"signal"}), divergence_for, kl_advantage_loss),
}
POLICY_GRADIENT = frozenset({"gkd_rl", "kl_advantage"})  # the objectives that weigh own samples by an advantage


def check_takes(objective: str, rows: pa.Table, source: str) -> None:
    """Fails before training when the objective cannot train on rows of this kind."""
    kind, takes = batch_kind(rows), sorted(OBJECTIVES[objective].takes)
    if kind not in takes:
        fitting = " or ".join(repr(name) for name, entry in OBJECTIVES.items() if kind in entry.takes)
        raise ValueError(f"objective {objective!r} trains on {' or '.join(BATCH_KINDS[k].description for k in takes)}, "
                         f"but the {source} rows hold {BATCH_KINDS[kind].description}: use objective {fitting}, "
                         f"or {BATCH_KINDS[takes[-1]].build}")

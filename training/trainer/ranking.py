"""Ranking objectives: the student learns from responses the teacher judged, better against worse.

A pair row (preference_pairs, round_pairs) holds a prompt, its chosen response y_w and its rejected
one y_l; a ranked row holds a prompt's n responses y_1 … y_n and their scores s_i (higher is better).
Both are unpivoted into one token table of sequences (a pair's chosen and rejected, a prompt's
responses), so that one forward over all of them serves the loss (`sparse_batch`). Every log-prob is
at T = 1, summed over the response's tokens:

    log π(y|x) = Σ_t log π(y_t | x, y_<t)

DPO (Rafailov et al. 2023), with the reference π_ref's sums stored on the pair (the parent checkpoint):

    ℓ = −log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])

RRHF (Yuan et al. 2023), on the length-normalized log-probs p_i = (1/|y_i|) Σ_t log π_θ(y_i,t | x, y_i,<t):

    ℓ = Σ_{s_i < s_j} max(0, p_i − p_j)  −  p_best        (y_best: the highest score; ties rank nothing)

Both are averaged over the global batch's pairs (prompts), whatever its split into micro-batches or
processes: each micro-batch's sum is divided by the global count (`counts`), as the token losses are
divided by the global batch's completion tokens.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from training.feedback.pairs import pair_responses
from training.models.batches import flat_values, list_lengths
from training.trainer.losses import LossSettings, SparseBatch, sparse_batch, sparse_kd_loss


@dataclass(kw_only=True)
class PairBatch(SparseBatch):
    """2P sequences: the P chosen responses, then the P rejected ones, with the reference's log-probs."""

    reference_chosen: torch.Tensor  # (P,) log π_ref(y_w|x)
    reference_rejected: torch.Tensor  # (P,) log π_ref(y_l|x)


@dataclass(kw_only=True)
class RankedBatch(SparseBatch):
    """Σ n_r sequences, every prompt's responses one after the other."""

    owner: torch.Tensor  # (S,) the prompt (row of the batch) of each sequence
    scores: torch.Tensor  # (S,) its score
    best: torch.Tensor  # (R,) each prompt's best sequence: the highest score, the first of equals


def responses_of(rows: pa.Table) -> pa.ChunkedArray:
    """Every response of ranked rows, one list of token ids each, row after row."""
    return pc.list_flatten(rows["responses_token_ids"])


def pair_batch(rows: pa.Table, pad_token_id: int, k: int | None = None) -> PairBatch:
    """The tensors of a slice of pair rows: one batch of its 2P sequences."""
    sequences = sparse_batch(pair_responses(rows), pad_token_id, k)
    reference = [torch.from_numpy(rows[f"reference_{side}_logprob"].to_numpy().astype(np.float32)) for side in ("chosen", "rejected")]
    return PairBatch(**sequences.__dict__, reference_chosen=reference[0], reference_rejected=reference[1])


def ranked_batch(rows: pa.Table, pad_token_id: int, k: int | None = None) -> RankedBatch:
    """The tensors of a slice of ranked rows: one batch of all their responses."""
    counts = list_lengths(rows["responses_token_ids"])
    owner = np.repeat(np.arange(rows.num_rows), counts)
    sequences = sparse_batch(pa.table({"prompt_token_ids": rows["prompt_token_ids"].take(owner),
                                       "completion_token_ids": responses_of(rows)}), pad_token_id, k)
    scores = flat_values(rows["scores"], 1).astype(np.float64)
    order = np.lexsort((-scores, owner))  # by prompt, best first; stable, so the first of equal scores leads
    best = order[np.cumsum(counts) - counts]
    return RankedBatch(**sequences.__dict__, owner=torch.from_numpy(owner), scores=torch.from_numpy(scores.astype(np.float32)),
                       best=torch.from_numpy(best))


def pair_counts(rows: pa.Table) -> dict[str, int]:
    """What a pair batch is averaged over: its pairs (DPO), its completion tokens (the teacher's
    divergence on both responses) and its chosen tokens (NLL on the chosen response)."""
    chosen, rejected = (int(list_lengths(rows[f"{side}_token_ids"]).sum()) for side in ("chosen", "rejected"))
    return {"pairs": rows.num_rows, "completion_tokens": chosen + rejected, "chosen_tokens": chosen}


def ranked_counts(rows: pa.Table) -> dict[str, int]:
    """What a ranked batch is averaged over: its prompts; and the completion tokens it trains on."""
    return {"prompts": rows.num_rows, "completion_tokens": int(list_lengths(responses_of(rows)).sum())}


def pair_lengths(rows: pa.Table) -> np.ndarray:
    """Each pair's longest sequence: the prompt and its longer response (micro-batches sort on it)."""
    return list_lengths(rows["prompt_token_ids"]) + np.maximum(list_lengths(rows["chosen_token_ids"]),
                                                               list_lengths(rows["rejected_token_ids"]))


def ranked_lengths(rows: pa.Table) -> np.ndarray:
    """Each prompt's longest sequence: the prompt and its longest response."""
    counts = list_lengths(rows["responses_token_ids"])
    longest = np.zeros(rows.num_rows, dtype=np.int64)
    np.maximum.at(longest, np.repeat(np.arange(rows.num_rows), counts), list_lengths(responses_of(rows)))
    return list_lengths(rows["prompt_token_ids"]) + longest


def token_logprobs(logits: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """log π(y_t | x, y_<t) at T = 1 of the N completion tokens: the token's logit minus the
    logsumexp of its position's, so no (N, V) log-softmax is kept for the backward pass."""
    selected = logits[batch.rows, batch.positions].float()
    return selected.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(selected, dim=-1)


def sequence_logprobs(token: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) of each sequence, from its completion tokens' (`token_logprobs`): (B,)."""
    return torch.zeros(batch.input_ids.shape[0], device=token.device).index_add(0, batch.rows, token)


def dpo_loss(logits: torch.Tensor, batch: PairBatch, settings: LossSettings, stored_temperature: float, counts: dict[str, int]):
    """Σ_pairs ℓ_DPO / P, + nll_weight · NLL of the chosen responses per chosen token (RPO), + kd_weight ·
    the divergence to the teacher's signal on both responses per completion token (`sparse_kd_loss`,
    as supervised_kd computes it); P and the token counts are the global batch's (`counts`).
    Returns (loss, {"dpo", "margin": β-scaled chosen − rejected reward, "accuracy": share of margins > 0, …}),
    means over this batch."""
    token = token_logprobs(logits, batch)
    sums = sequence_logprobs(token, batch)
    pairs = sums.shape[0] // 2
    chosen, rejected = sums[:pairs], sums[pairs:]
    margin = settings.preference_beta * ((chosen - batch.reference_chosen) - (rejected - batch.reference_rejected))
    losses = -F.logsigmoid(margin)
    loss = losses.sum() / counts["pairs"]
    parts = {"dpo": losses.mean().item(), "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item()}
    if settings.nll_weight > 0:
        chosen_token = batch.rows < pairs
        chosen_nll = -token[chosen_token].sum()
        loss = loss + settings.nll_weight * chosen_nll / counts["chosen_tokens"]
        parts["nll"] = chosen_nll.item() / max(1, int(chosen_token.sum()))
    if settings.kd_weight > 0:
        divergence = settings.model_copy(update={"nll_weight": 0.0})
        kd, kd_parts = sparse_kd_loss(logits, batch, divergence, stored_temperature, normalizer=counts["completion_tokens"])
        loss = loss + settings.kd_weight * kd
        parts["divergence"] = kd_parts["divergence"]
    return loss, parts


def rrhf_loss(logits: torch.Tensor, batch: RankedBatch, settings: LossSettings, stored_temperature: float, counts: dict[str, int]):
    """Σ_prompts (ℓ_rank + ℓ_ft) / R, R the global batch's prompts (`counts`). Returns (loss,
    {"rank", "ft"}), means over this batch's prompts."""
    lengths = torch.bincount(batch.rows, minlength=batch.input_ids.shape[0]).clamp(min=1)
    normalized = sequence_logprobs(token_logprobs(logits, batch), batch) / lengths
    worse = (batch.owner[:, None] == batch.owner[None, :]) & (batch.scores[:, None] < batch.scores[None, :])  # (i, j): s_i < s_j
    hinge = ((normalized[:, None] - normalized[None, :]).clamp(min=0) * worse).sum(-1)
    prompts = batch.best.shape[0]
    rank = torch.zeros(prompts, device=logits.device).index_add(0, batch.owner, hinge)
    ft = -normalized[batch.best]
    loss = (rank + ft).sum() / counts["prompts"]
    return loss, {"rank": rank.mean().item(), "ft": ft.mean().item()}

"""Distillation losses on a batch: the stored sparse teacher signal, or dense teacher logits.

A batch is N completion tokens spread over B sequences. `rows` and `positions` (N,) say where each
completion token is predicted: by the logits at (rows[i], positions[i]) of the (B, L, V) output.
Only those N positions get a log-softmax over the vocabulary, and the teacher side stays (N, k).

loss = (1/N) Σ_i D(p_i ‖ q_i)  (+ w_nll · (1/N) Σ_i −log q_i(y_i) when mixed with NLL)

With gradient accumulation N is the completion tokens of the whole (global) batch, not of the
micro-batch (`normalizer`), so the loss does not depend on how a batch is split.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, Field, model_validator

from training.models.batches import completion_positions, flat_values
from training.trainer.divergences import DIVERGENCES, divergence, sparse_supports


@dataclass
class SparseBatch:
    input_ids: torch.Tensor  # (B, L) prompt ⊕ completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    rows: torch.Tensor  # (N,) sequence of each completion token
    positions: torch.Tensor  # (N,) logits position that predicts it
    targets: torch.Tensor  # (N,) the completion token
    topk_ids: torch.Tensor | None  # (N, k); None for rows without a teacher signal (SFT data)
    topk_logprobs: torch.Tensor | None  # (N, k), at the stored temperature
    tail_mass: torch.Tensor | None  # (N,)

    def to(self, device):
        """The same batch (of the same class: PairBatch, RankedBatch too) on `device`."""
        return type(self)(**{name: t.to(device, non_blocking=True) if t is not None else None for name, t in self.__dict__.items()})


def sparse_batch(rows: pa.Table, pad_token_id: int, k: int | None = None) -> SparseBatch:
    """Tensors for a slice of a token table: prompt_token_ids and completion_token_ids, and the
    teacher signal when the table has it (teacher_labeled, curated, teacher_feedback).

    `k` keeps the first k of the stored top-k (they are sorted); the rest joins the tail mass.
    """
    tensors = completion_positions(rows["prompt_token_ids"], rows["completion_token_ids"], pad_token_id)
    if "topk_ids" not in rows.column_names:
        return SparseBatch(*tensors, topk_ids=None, topk_logprobs=None, tail_mass=None)
    stored_k = int(rows["k"][0].as_py())
    keep = k or stored_k
    topk_ids = flat_values(rows["topk_ids"], 2).reshape(-1, stored_k)
    topk_logprobs = flat_values(rows["topk_logprobs"], 2).astype(np.float32).reshape(-1, stored_k)
    tail = flat_values(rows["tail_mass"], 1).astype(np.float32) + np.exp(topk_logprobs[:, keep:]).sum(-1)
    return SparseBatch(
        *tensors,
        topk_ids=torch.from_numpy(topk_ids[:, :keep].astype(np.int64)),
        topk_logprobs=torch.from_numpy(np.ascontiguousarray(topk_logprobs[:, :keep])),
        tail_mass=torch.from_numpy(np.clip(tail, 0.0, 1.0)),
    )


def student_logprobs_at(logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0):
    """log q = log_softmax(logits / τ) at the N completion positions only: (N, V)."""
    return torch.log_softmax(logits[rows, positions].float() / temperature, dim=-1)


def nll(log_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log q(y) per position: supervised fine-tuning on the tokens in the data."""
    return -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class LossSettings(BaseModel):
    """What the student minimizes per completion token, averaged over the batch's completion tokens:
    D(p‖q) of teacher p and student q, both at log_softmax(logits / τ), plus w_nll · NLL."""

    divergence: Literal[(*DIVERGENCES, "none")] = Field(  # every divergence of training/trainer/divergences.py
        "jsd", description="'none' trains on NLL alone (set nll_weight > 0)"
    )
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight: 0 is forward KL, 1 reverse KL")
    alpha: float = Field(0.1, gt=0, lt=1, description="skew of the skew KLs")
    tail_policy: Literal["renormalize", "bucket"] = Field(
        "renormalize", description="the mass outside the stored top-k: renormalize both over the top-k, or a (k+1)-th bucket"
    )
    temperature: float = Field(1.0, gt=0, description="loss temperature τ, applied to teacher and student alike")
    nll_weight: float = Field(0.0, ge=0, description="weight of NLL on the sequence's tokens, added to the divergence "
                              "(dpo: on the chosen response's tokens, RPO)")
    preference_beta: float = Field(0.1, gt=0, description="dpo's β: how far the student may move from the reference "
                                   "(the margin is β × the difference of the log-prob ratios)")
    kd_weight: float = Field(0.0, ge=0, description="dpo: weight of the divergence to the teacher's signal on both "
                             "responses (pairs scored by the teacher), per completion token, added to the DPO loss")

    @model_validator(mode="after")
    def _something_to_minimize(self):
        if self.divergence == "none" and self.nll_weight <= 0:
            raise ValueError("divergence 'none' trains on NLL alone: set nll_weight > 0")
        if self.divergence == "none" and self.kd_weight > 0:
            raise ValueError(f"kd_weight {self.kd_weight} mixes the divergence in, and divergence is 'none': set divergence "
                             "(e.g. jsd) or kd_weight 0")
        return self


CHUNK_ELEMENTS = 2**22  # positions per chunk × vocab: ~16 MB per float32 temporary


def _sparse_sums(selected_logits, targets, topk_ids, teacher_logprobs, tail_mass, objective: LossSettings):
    """(Σ divergence, Σ nll) over some positions, from their (n, V) student logits."""
    log_q = torch.log_softmax(selected_logits.float() / objective.temperature, dim=-1)
    nll_sum = nll(log_q, targets).sum()
    if objective.divergence == "none":
        return torch.stack([torch.zeros_like(nll_sum), nll_sum])
    log_p, log_q_support = sparse_supports(topk_ids, teacher_logprobs, tail_mass, log_q, objective.tail_policy)
    divergence_sum = divergence(objective.divergence, log_p, log_q_support, objective.beta, objective.alpha).sum()
    return torch.stack([divergence_sum, nll_sum])


class _ChunkedSparseLoss(torch.autograd.Function):
    """loss = (w_div · Σ D + w_nll · Σ NLL) / normalizer over N positions, chunk by chunk.

    The gradient of each chunk is computed in the forward pass and added into one buffer shaped like
    the logits (as fused-loss kernels do), so only one chunk's (chunk, V) temporaries are ever alive.
    Outputs (loss, [mean divergence, mean nll] over these N); only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, rows, positions, targets, topk_ids, teacher_logprobs, tail_mass, objective, weights, normalizer):
        n = rows.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        grad = torch.zeros_like(logits) if ctx.needs_input_grad[0] else None
        sums = torch.zeros(2, device=logits.device)
        for start in range(0, n, chunk):
            piece = slice(start, start + chunk)
            with torch.enable_grad():
                selected = logits[rows[piece], positions[piece]].detach().requires_grad_(grad is not None)
                signal = [t[piece] if t is not None else None for t in (topk_ids, teacher_logprobs, tail_mass)]
                chunk_sums = _sparse_sums(selected, targets[piece], *signal, objective)
                if grad is not None:
                    (chunk_grad,) = torch.autograd.grad((chunk_sums * weights).sum() / normalizer, selected)
                    grad.index_put_((rows[piece], positions[piece]), chunk_grad.to(grad.dtype), accumulate=True)
            sums += chunk_sums.detach()
        means = sums / max(1, n)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(means)
        return (sums * weights).sum() / normalizer, means

    @staticmethod
    def backward(ctx, grad_loss, grad_means):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss), None, None, None, None, None, None, None, None, None


def sparse_kd_loss(student_logits: torch.Tensor, batch: SparseBatch, objective: LossSettings, stored_temperature: float,
                   normalizer: int | None = None):
    """Σ over completion tokens of D(p‖q) on the stored top-k signal (+ weighted NLL), divided by
    `normalizer`: the global batch's completion tokens (default: this batch's, i.e. the mean).

    The stored teacher log-probs are at `stored_temperature`; at loss temperature τ they are
    rescaled, log p_τ = log p_T · T/τ, which is exact on the renormalized top-k support.
    Memory: besides the logits and their gradient, one chunk of (positions, V); see `_ChunkedSparseLoss`.
    Returns (loss, {"divergence": …, "nll": …}).
    """
    teacher_logprobs = batch.topk_logprobs
    if objective.divergence != "none" and teacher_logprobs is None:
        raise ValueError(f"divergence {objective.divergence!r} needs the teacher's signal, and these rows have none")
    if objective.divergence != "none" and objective.temperature != stored_temperature:
        if objective.tail_policy == "bucket":
            raise ValueError(
                f"the bucket tail policy needs the loss temperature ({objective.temperature}) to equal the "
                f"stored signal's ({stored_temperature}): the tail mass cannot be rescaled"
            )
        teacher_logprobs = teacher_logprobs * (stored_temperature / objective.temperature)
    weights = torch.tensor([0.0 if objective.divergence == "none" else 1.0, objective.nll_weight], device=student_logits.device)
    loss, means = _ChunkedSparseLoss.apply(
        student_logits, batch.rows, batch.positions, batch.targets, batch.topk_ids, teacher_logprobs,
        batch.tail_mass, objective, weights, normalizer or max(1, batch.rows.shape[0]),
    )
    parts = {"nll": means[1].item()}
    if objective.divergence != "none":
        parts["divergence"] = means[0].item()
    return loss, parts


def dense_kd_loss(student_logits, teacher_logits, rows, positions, targets, objective: LossSettings):
    """The same objective with the teacher's full logits in the loop (no top-k, no tail)."""
    log_q = student_logprobs_at(student_logits, rows, positions, objective.temperature)
    parts = {"nll": nll(log_q, targets).mean()}
    if objective.divergence != "none":
        log_p = student_logprobs_at(teacher_logits, rows, positions, objective.temperature)
        parts["divergence"] = divergence(objective.divergence, log_p, log_q, objective.beta, objective.alpha).mean()
    loss = parts.get("divergence", 0.0) + objective.nll_weight * parts["nll"]
    return loss, {name: value.item() for name, value in parts.items()}

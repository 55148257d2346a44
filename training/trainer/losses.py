"""Distillation losses on a batch: the stored sparse teacher signal, or dense teacher logits.

A batch is N completion tokens spread over B sequences. `rows` and `positions` (N,) say where each
completion token is predicted: by the logits at (rows[i], positions[i]) of the (B, L, V) output.
Only those N positions get a log-softmax over the vocabulary, and the teacher side stays (N, k).

loss = (1/N) Σ_i D(p_i ‖ q_i)  (+ w_nll · (1/N) Σ_i −log q_i(y_i) when mixed with NLL)
                                (+ (1/N) Σ_i PG_i on the student's own samples, given advantages A_i)

PG_i = −min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i),  ρ_i = q_θ(y_i) / q_old(y_i)

is the clipped policy-gradient surrogate (PPO): q_old is the policy that sampled the token (its
logprob kept from sampling), so a fresh batch has ρ = 1 and PG is REINFORCE, and a stale one (a
stored round's rollouts drawn again, a pipelined batch) moves at most ε from its sampler.

With gradient accumulation N is the completion tokens of the whole (global) batch, not of the
micro-batch (`normalizer`), so the loss does not depend on how a batch is split.
"""

import bisect
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, Field, model_validator

from training.models.alignment import UNMAPPED
from training.models.batches import completion_positions, flat_values, list_lengths
from training.schema.signal import STUDENT_LOGPROB
from training.trainer.divergences import DIVERGENCES, divergence, support_logprobs


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
    sampled_logprobs: torch.Tensor | None = None  # (N,) log q_old(y): the student's, as it sampled (on-policy rows)
    teacher_token_logprobs: torch.Tensor | None = None  # (N,) log p(y): the teacher's, of the token in the sequence
    advantages: torch.Tensor | None = None  # (N,) the advantage of the token's sequence, r − baseline (0: unknown)
    aligned: torch.Tensor | None = None  # (N,) 1: the token divergence applies; None: a shared tokenizer, everywhere
    group: torch.Tensor | None = None  # (N,) the token's alignment group, numbered across the batch (alignment.py)
    group_logprob: torch.Tensor | None = None  # (N,) the teacher's log p of the group's text, on unaligned tokens

    def to(self, device):
        """The same batch (of the same class: PairBatch, RankedBatch too) on `device`."""
        return type(self)(**{name: t.to(device, non_blocking=True) if t is not None else None for name, t in self.__dict__.items()})


def sparse_batch(rows: pa.Table, pad_token_id: int, k: int | None = None) -> SparseBatch:
    """Tensors for a slice of a token table: prompt_token_ids and completion_token_ids, and the
    teacher signal when the table has it (teacher_labeled, curated, teacher_feedback).

    `k` keeps the first k of the stored top-k (they are sorted); the rest joins the tail mass. The
    student's own samples (teacher_feedback, online batches) also bring what a policy gradient needs:
    the logprob each token was sampled with and its sequence's advantage.
    """
    tensors = completion_positions(rows["prompt_token_ids"], rows["completion_token_ids"], pad_token_id)
    columns = rows.column_names
    per_token = lambda name: torch.from_numpy(flat_values(rows[name], 1).astype(np.float32)) if name in columns else None
    rollout = {"sampled_logprobs": per_token(STUDENT_LOGPROB), "teacher_token_logprobs": per_token("token_logprob")}
    if "advantage" in columns:
        advantage = pc.fill_null(rows["advantage"], 0.0).to_numpy().astype(np.float32)
        rollout["advantages"] = torch.from_numpy(np.repeat(advantage, list_lengths(rows["completion_token_ids"])))
    if "topk_ids" not in columns:
        return SparseBatch(*tensors, topk_ids=None, topk_logprobs=None, tail_mass=None, **rollout)
    stored_k = int(rows["k"][0].as_py())
    keep = stored_k if k is None else k
    tokens = len(tensors[-1])
    topk_ids = flat_values(rows["topk_ids"], 2).reshape(tokens, stored_k)
    topk_logprobs = flat_values(rows["topk_logprobs"], 2).astype(np.float32).reshape(tokens, stored_k)
    tail = flat_values(rows["tail_mass"], 1).astype(np.float32) + np.exp(topk_logprobs[:, keep:]).sum(-1)
    if "aligned" in columns:  # a teacher with another tokenizer (training/models/alignment.py)
        local, row_of = flat_values(rows["group"], 1).astype(np.int64), np.repeat(np.arange(rows.num_rows), list_lengths(rows["group"]))
        counts = np.zeros(rows.num_rows, dtype=np.int64)
        np.maximum.at(counts, row_of, local + 1)  # each row's groups, numbered on after the previous row's
        rollout.update(aligned=torch.from_numpy(flat_values(rows["aligned"], 1).astype(np.float32)),
                       group=torch.from_numpy(local + (np.cumsum(counts) - counts)[row_of]),
                       group_logprob=torch.from_numpy(flat_values(rows["group_logprob"], 1).astype(np.float32)))
    return SparseBatch(
        *tensors,
        topk_ids=torch.from_numpy(topk_ids[:, :keep].astype(np.int64)),
        topk_logprobs=torch.from_numpy(np.ascontiguousarray(topk_logprobs[:, :keep])),
        tail_mass=torch.from_numpy(np.clip(tail, 0.0, 1.0)),
        **rollout,
    )


def student_logprobs_at(logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, temperature: float = 1.0):
    """log q = log_softmax(logits / τ) at the N completion positions only: (N, V)."""
    return torch.log_softmax(logits[rows, positions].float() / temperature, dim=-1)


def nll(log_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log q(y) per position: supervised fine-tuning on the tokens in the data."""
    return -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def policy_gradient_sums(token_logprob: torch.Tensor, entropy: torch.Tensor, sampled_logprobs, advantages,
                         clip_ratio: float) -> torch.Tensor:
    """[Σ PG, Σ clipped, Σ entropy, Σ k3] over positions, from the student's raw (T = 1) log q(y) of
    each token and its entropy −Σ_v q(v) log q(v) at that state:

        PG        −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A),  ρ = exp(log q(y) − log q_old(y))
        clipped   1 where the clipped branch is the one taken (its gradient is 0)
        k3        ρ − 1 − log ρ ≥ 0, an unbiased estimate of KL(q_old ‖ q) on tokens sampled by q_old
    """
    log_ratio = token_logprob - sampled_logprobs
    ratio = log_ratio.exp()
    unclipped, clipped = ratio * advantages, ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
    with torch.no_grad():
        k3 = ratio - 1.0 - log_ratio
    return torch.stack([-torch.minimum(unclipped, clipped).sum(), (clipped < unclipped).to(ratio.dtype).sum(), entropy.sum(), k3.sum()])


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
    reward_weight: float = Field(0.0, ge=0, description="gkd_rl: weight of the reward's policy gradient (advantage r − the "
                                 "mean reward of the prompt's samples) against the divergence; kl_advantage: weight of that "
                                 "reward advantage added to every token's log p_T(y) − log q(y)")
    clip_ratio: float = Field(0.2, gt=0, lt=1, description="gkd_rl, kl_advantage: ε of the clipped importance ratio "
                              "q_θ(y)/q_old(y) of tokens sampled by an earlier policy (stored rounds, pipelined batches)")

    @model_validator(mode="after")
    def _something_to_minimize(self):
        if self.divergence == "none" and self.nll_weight <= 0:
            raise ValueError("divergence 'none' trains on NLL alone: set nll_weight > 0")
        if self.divergence == "none" and self.kd_weight > 0:
            raise ValueError(f"kd_weight {self.kd_weight} mixes the divergence in, and divergence is 'none': set divergence "
                             "(e.g. jsd) or kd_weight 0")
        return self


CHUNK_ELEMENTS = 2**24  # positions per chunk × vocab: ~64 MB per float32 temporary (110 positions at V = 151,936)


@dataclass
class HiddenStates:
    """The student's output before its head: the last hidden states (B, L, H) and the head's weight
    (V, H), so that logits = hidden · headᵀ. The token losses build those logits a chunk of positions
    at a time and never whole (training/trainer/head.py says where this applies)."""

    hidden: torch.Tensor
    head: torch.Tensor
    product_dtype: torch.dtype  # what the model's own head would have multiplied in: the autocast dtype of its forward, if any

    @property
    def device(self) -> torch.device:
        return self.hidden.device


SUMS = ["divergence", "nll", "policy_gradient", "clip_fraction", "entropy", "kl_to_sampler"]  # what `_chunk_sums` returns


def group_divergence_sum(log_q_token, aligned, group, group_logprob, objective: LossSettings) -> torch.Tensor:
    """Σ over the unaligned groups g of D((p(g), 1 − p(g)) ‖ (q(g), 1 − q(g))), log q(g) = Σ_{t∈g} log q(y_t):
    a teacher with another tokenizer, where its tokens and the student's do not meet one to one
    (training/models/alignment.py)."""
    unaligned = aligned == 0
    if not unaligned.any():
        return log_q_token.new_zeros(())
    numbers, inverse = torch.unique(group[unaligned], return_inverse=True)
    log_q = log_q_token.new_zeros(len(numbers)).index_add(0, inverse, log_q_token[unaligned])
    log_p = log_q.new_zeros(len(numbers)).scatter(0, inverse, group_logprob[unaligned].to(log_q.dtype))
    two_point = lambda log_g: torch.stack([log_g, torch.log(-torch.expm1(log_g))], -1)
    ceiling = -1e-6  # log(1 − g) stays finite
    return divergence(objective.divergence, two_point(log_p.clamp(max=ceiling)), two_point(log_q.clamp(max=ceiling)),
                      objective.beta, objective.alpha).sum()


def _chunk_sums(logits, targets, topk_ids, teacher_logprobs, tail_mass, sampled_logprobs, advantages, aligned, group, group_logprob,
                objective: LossSettings, weights, normalizer, with_grad: bool):
    """The `SUMS` over a chunk of n positions from their (n, V) logits x, and with `with_grad` the
    gradient of (SUMS · weights) / normalizer with respect to x, made in place of x (which is ours).

    Every term reads x only at a few ids S (the target and the teacher's top-k) and through
    log-sum-exps: with z = x/τ, log q_S = z_S − lse(z), the bucket's tail log Σ_{v∉top-k} q_v =
    lse_out(z) − lse(z), and a policy gradient's log q_raw(y) = x_y − lse(x). Autograd runs on those
    (n, k+1) values alone; the gradient with respect to x then follows from ∂lse(z)/∂z = softmax(z):

        ∂/∂z = q ⊙ (g_lse + g_out · e^{lse − lse_out}) − [top-k] q · g_out · e^{lse − lse_out} + [S] g_S,

    divided by τ, plus g_raw · softmax(x) when τ ≠ 1. So a chunk holds x and one (n, V) temporary, where
    the log-softmax's own autograd would hold several.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tau = objective.temperature
    z = x if tau == 1.0 else x / tau
    top = topk_ids.long() if topk_ids is not None else targets.new_zeros((len(targets), 0))
    support = torch.cat([targets.unsqueeze(-1), top], -1)
    bucket = objective.divergence != "none" and objective.tail_policy == "bucket"
    policy = advantages is not None
    with torch.no_grad():
        leaves = {"z_support": z.gather(-1, support), "lse": torch.logsumexp(z, -1)}
        if bucket:
            leaves["lse_out"] = torch.logsumexp(z.scatter(-1, top, float("-inf")), -1)
        if policy and tau != 1.0:
            leaves["lse_raw"] = torch.logsumexp(x, -1)
        if policy:
            lse_raw = leaves.get("lse_raw", leaves["lse"])
            entropy = lse_raw - (torch.softmax(x, -1) * x).sum(-1)
    with torch.enable_grad():
        leaves = {name: value.detach().requires_grad_(with_grad) for name, value in leaves.items()}
        log_q = leaves["z_support"] - leaves["lse"].unsqueeze(-1)  # log q at [target, top-k]
        nll_sum = -log_q[:, 0].sum()
        divergence_sum = torch.zeros_like(nll_sum)
        if objective.divergence != "none":
            log_q_tail = leaves["lse_out"] - leaves["lse"] if bucket else None
            log_q_top = log_q[:, 1:] if aligned is None else torch.where(teacher_logprobs <= UNMAPPED / 2, UNMAPPED, log_q[:, 1:])
            log_p, log_q_support = support_logprobs(teacher_logprobs, tail_mass, log_q_top, log_q_tail, objective.tail_policy)
            per_position = divergence(objective.divergence, log_p, log_q_support, objective.beta, objective.alpha)
            divergence_sum = per_position.sum() if aligned is None else (
                (per_position * aligned).sum() + group_divergence_sum(log_q[:, 0], aligned, group, group_logprob, objective))
        sums = torch.stack([divergence_sum, nll_sum])
        if policy:
            raw = log_q[:, 0] if tau == 1.0 else leaves["z_support"][:, 0] * tau - leaves["lse_raw"]  # the policy sampled at T = 1
            sums = torch.cat([sums, policy_gradient_sums(raw, entropy, sampled_logprobs, advantages, objective.clip_ratio)])
        else:
            sums = torch.cat([sums, sums.new_zeros(4)])
        if not with_grad:
            return sums.detach(), None
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad((sums * weights).sum() / normalizer, [leaves[n] for n in names],
                                                    allow_unused=True, materialize_grads=True)))
    with torch.no_grad():
        raw_term = torch.softmax(x, -1).mul_(grads["lse_raw"].unsqueeze(-1)) if "lse_raw" in grads else None
        lse = leaves["lse"].detach().unsqueeze(-1)
        q_support = (leaves["z_support"].detach() - lse).exp()
        grad = z.sub_(lse).exp_()  # q, in place of z
        if bucket:
            outside = ((lse.squeeze(-1) - leaves["lse_out"].detach()).exp() * grads["lse_out"]).unsqueeze(-1)  # g_out e^{lse − lse_out}
            inside = -q_support[:, 1:] * outside
            if aligned is not None:  # an UNMAPPED entry repeats an id of the support: counted once
                inside = inside * (teacher_logprobs > UNMAPPED / 2)
            grad.mul_(grads["lse"].unsqueeze(-1) + outside).scatter_add_(-1, top, inside)
        else:
            grad.mul_(grads["lse"].unsqueeze(-1))
        grad.scatter_add_(-1, support, grads["z_support"])
        if tau != 1.0:
            grad.div_(tau)
        if raw_term is not None:
            grad.add_(raw_term)
    return sums.detach(), grad


def _add_head_gradient(grad_head, grad_logits, hidden, dtype):
    """grad_head += grad_logitsᵀ · hidden. On CUDA the product runs in `dtype` (bf16 under autocast, on
    the tensor cores) and accumulates into the fp32 gradient (out_dtype); elsewhere in the gradient's dtype."""
    if grad_head.is_cuda and dtype != grad_head.dtype:
        torch.addmm(grad_head, grad_logits.T.to(dtype), hidden.to(dtype), out_dtype=grad_head.dtype, out=grad_head)
    else:
        grad_head.addmm_(grad_logits.T.to(grad_head.dtype), hidden.to(grad_head.dtype))


def chunk_bounds(n: int, chunk: int, group: torch.Tensor | None) -> list[tuple[int, int]]:
    """(start, end) of the chunks of about `chunk` positions; with alignment groups, each end moved on to
    where a group begins, so that no group is split between chunks."""
    if group is None:
        return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    group_starts = (torch.nonzero(group[1:] != group[:-1]).flatten() + 1).tolist() + [n]
    bounds, start = [], 0
    while start < n:
        end = group_starts[bisect.bisect_left(group_starts, start + chunk)] if start + chunk < n else n
        bounds.append((start, end))
        start = end
    return bounds


class _ChunkedSparseLoss(torch.autograd.Function):
    """loss = (w_div · Σ D + w_nll · Σ NLL + w_pg · Σ PG) / normalizer over N positions, chunk by chunk.

    `states` are the (B, L, V) logits, or with a `head` (V, H) the (B, L, H) hidden states whose
    logits z = h · headᵀ are made per chunk, in `product_dtype`. The gradient of each chunk is computed
    in the forward pass (as fused-loss kernels do) and added into buffers shaped like the inputs: with
    ∂loss/∂z = g,

        ∂loss/∂h = g · head,   ∂loss/∂head = Σ_chunks gᵀ · h,

    so only one chunk's (chunk, V) temporaries are ever alive, and with a head the (B, L, V) logits
    and their gradient never exist. Outputs (loss, the mean of each of `SUMS` over these N); only the
    loss is differentiable.
    """

    @staticmethod
    def forward(ctx, states, head, product_dtype, rows, positions, targets, per_token, objective, weights, normalizer):
        n = rows.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // (states.shape[-1] if head is None else head.shape[0]))
        grad_states = torch.zeros_like(states) if ctx.needs_input_grad[0] else None
        grad_head = torch.zeros_like(head) if ctx.needs_input_grad[1] else None
        device, dtype = states.device.type, product_dtype
        product_head = None if head is None else head.to(dtype)  # the cast autocast makes for the model's own head
        sums = torch.zeros(len(SUMS), device=states.device)
        with torch.autocast(device, enabled=False):
            for start, end in chunk_bounds(n, chunk, per_token[-2]):  # per_token[-2]: the alignment groups (sparse_kd_loss)
                piece = slice(start, end)
                at = (rows[piece], positions[piece])
                selected = states[at]  # a copy: the chunk's logits are made in it, then its gradient
                logits = selected if head is None else selected.to(dtype) @ product_head.T
                chunk_sums, grad_logits = _chunk_sums(logits, targets[piece], *[t[piece] if t is not None else None for t in per_token],
                                                      objective, weights, normalizer, grad_states is not None or grad_head is not None)
                if grad_states is not None:
                    grad_selected = grad_logits if head is None else grad_logits.to(dtype) @ product_head
                    grad_states.index_put_(at, grad_selected.to(grad_states.dtype), accumulate=True)
                if grad_head is not None:
                    _add_head_gradient(grad_head, grad_logits, selected, dtype)
                sums += chunk_sums.to(sums.dtype)
        means = sums / max(1, n)
        ctx.save_for_backward(grad_states, grad_head)
        ctx.mark_non_differentiable(means)
        return (sums * weights).sum() / normalizer, means

    @staticmethod
    def backward(ctx, grad_loss, grad_means):
        grads = [grad.mul_(grad_loss) if grad is not None else None for grad in ctx.saved_tensors]
        return *grads, None, None, None, None, None, None, None, None


def sparse_kd_loss(student: torch.Tensor | HiddenStates, batch: SparseBatch, objective: LossSettings, stored_temperature: float,
                   normalizer: int | None = None, advantages: torch.Tensor | None = None):
    """Σ over completion tokens of D(p‖q) on the stored top-k signal (+ weighted NLL, + the policy
    gradient of the per-token `advantages` when given), divided by `normalizer`: the global batch's
    completion tokens (default: this batch's, i.e. the mean).

    The stored teacher log-probs are at `stored_temperature`; at loss temperature τ they are
    rescaled, log p_τ = log p_T · T/τ, which is exact on the renormalized top-k support.
    `student` is its (B, L, V) logits, or its `HiddenStates`, from which the logits are made a chunk at
    a time. Memory: besides the logits and their gradient (none with `HiddenStates`), one chunk of
    (positions, V); see `_ChunkedSparseLoss`.
    Returns (loss, {"divergence": …, "nll": …, and with advantages "policy_gradient", "clip_fraction",
    "entropy", "kl_to_sampler"}).
    """
    teacher_logprobs = batch.topk_logprobs
    if objective.divergence != "none" and teacher_logprobs is None:
        raise ValueError(f"divergence {objective.divergence!r} needs the teacher's signal, and these rows have none")
    if objective.divergence != "none" and teacher_logprobs.shape[-1] == 0:
        raise ValueError(f"divergence {objective.divergence!r} needs the teacher's top-k, and these rows store k = 0 (each "
                         "token's logprob only): train them with objective kl_advantage, or score them again with k ≥ 1")
    if advantages is not None and batch.sampled_logprobs is None:
        raise ValueError("a policy gradient needs the logprob each token was sampled with (student_token_logprob): "
                         "train on the student's own samples (teacher_feedback, online rounds)")
    if objective.divergence != "none" and objective.temperature != stored_temperature:
        if batch.aligned is not None:
            raise ValueError(f"a teacher with another tokenizer is compared on whole groups of tokens, whose stored logprob "
                             f"cannot be rescaled: set the loss temperature ({objective.temperature}) to the stored signal's "
                             f"({stored_temperature})")
        if objective.tail_policy == "bucket":
            raise ValueError(
                f"the bucket tail policy needs the loss temperature ({objective.temperature}) to equal the "
                f"stored signal's ({stored_temperature}): the tail mass cannot be rescaled"
            )
        teacher_logprobs = teacher_logprobs * (stored_temperature / objective.temperature)
    weights = torch.tensor([0.0 if objective.divergence == "none" else 1.0, objective.nll_weight,
                            0.0 if advantages is None else 1.0, 0.0, 0.0, 0.0], device=student.device)
    per_token = (batch.topk_ids, teacher_logprobs, batch.tail_mass, batch.sampled_logprobs, advantages, batch.aligned, batch.group,
                 batch.group_logprob)
    fused = isinstance(student, HiddenStates)
    states, head, dtype = (student.hidden, student.head, student.product_dtype) if fused else (student, None, student.dtype)
    loss, means = _ChunkedSparseLoss.apply(states, head, dtype, batch.rows, batch.positions, batch.targets, per_token, objective,
                                           weights, normalizer or max(1, batch.rows.shape[0]))
    shown = ["nll"] + (["divergence"] if objective.divergence != "none" else []) + (SUMS[2:] if advantages is not None else [])
    values = means.tolist()
    return loss, {name: values[SUMS.index(name)] for name in shown}


def dense_kd_loss(student_logits, teacher_logits, rows, positions, targets, objective: LossSettings):
    """The same objective with the teacher's full logits in the loop (no top-k, no tail)."""
    log_q = student_logprobs_at(student_logits, rows, positions, objective.temperature)
    parts = {"nll": nll(log_q, targets).mean()}
    if objective.divergence != "none":
        log_p = student_logprobs_at(teacher_logits, rows, positions, objective.temperature)
        parts["divergence"] = divergence(objective.divergence, log_p, log_q, objective.beta, objective.alpha).mean()
    loss = parts.get("divergence", 0.0) + objective.nll_weight * parts["nll"]
    return loss, {name: value.item() for name, value in parts.items()}

"""Token-level divergences between the teacher p and the student q.

Every function takes log-probabilities over one support (the last dimension) and returns the
divergence per position (the support dimension reduced). The support is the whole vocabulary
(dense teacher logits) or what the stored sparse signal keeps (see `sparse_supports`).
Entries with p = 0 contribute 0 to Σ p log(p/·), as in the limit.
"""

import math

import torch


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a (log a − log b), with 0·log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1−w)·q), computed with logsumexp."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q): mode covering; supervised KD's classic objective."""
    return _kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) = Σ q (log q − log p): mode seeking."""
    return _kl(log_q, log_p)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_β(p‖q) = β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q  (GKD, Agarwal et al. 2024).

    The expression vanishes at β = 0 and β = 1, so there it is the exact forward KL(p‖q) (β = 0)
    and reverse KL(q‖p) (β = 1), the divergences it interpolates between.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"β must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(log_p, log_q)
    if beta == 1.0:
        return reverse_kl(log_p, log_q)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = ½ Σ |p − q|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """SKL_α(p‖q) = KL(p ‖ αp + (1−α)q)  (DistiLLM, Ko et al. 2024)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"α must be in (0, 1), got {alpha}")
    return _kl(log_p, _log_mixture(log_p, log_q, alpha))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """SRKL_α(p‖q) = KL(q ‖ (1−α)p + αq)  (DistiLLM, Ko et al. 2024)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"α must be in (0, 1), got {alpha}")
    return _kl(log_q, _log_mixture(log_p, log_q, 1.0 - alpha))


DIVERGENCES = {
    "forward_kl": lambda log_p, log_q, beta, alpha: forward_kl(log_p, log_q),
    "reverse_kl": lambda log_p, log_q, beta, alpha: reverse_kl(log_p, log_q),
    "jsd": lambda log_p, log_q, beta, alpha: generalized_jsd(log_p, log_q, beta),
    "tv": lambda log_p, log_q, beta, alpha: total_variation(log_p, log_q),
    "skew_kl": lambda log_p, log_q, beta, alpha: skew_kl(log_p, log_q, alpha),
    "skew_reverse_kl": lambda log_p, log_q, beta, alpha: skew_reverse_kl(log_p, log_q, alpha),
}


def divergence(name: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5, alpha: float = 0.1):
    """The divergence `name` per position; β is JSD's mixture weight, α the skew of the skew KLs."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}: choose one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name](log_p, log_q, beta, alpha)


def sparse_supports(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    student_logprobs: torch.Tensor,
    tail_policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the support the sparse signal defines, per position, from
    the student's whole (N, V) log-softmax (`support_logprobs` from what it needs of them)."""
    log_q_top = student_logprobs.gather(-1, topk_ids.long())
    log_q_tail = torch.logsumexp(student_logprobs.scatter(-1, topk_ids.long(), float("-inf")), -1) if tail_policy == "bucket" else None
    return support_logprobs(topk_logprobs, tail_mass, log_q_top, log_q_tail, tail_policy)


def support_logprobs(
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    log_q_top: torch.Tensor,
    log_q_tail: torch.Tensor | None,
    tail_policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the support the sparse signal defines, per position.

    topk_logprobs (N, k) and tail_mass (N,): the teacher's; log_q_top (N, k): the student's at the
    teacher's top-k ids; log_q_tail (N,): log Σ_{v ∉ top-k} q_v (bucket only, exact: not log(1 − Σ q)).
    - renormalize: both restricted to the teacher's top-k ids and renormalized there:
      p̃_i = p_i / Σ_top-k p,  q̃_i = q_i / Σ_top-k q.
    - bucket: the top-k ids plus a (k+1)-th bin for everything else:
      p = (p_1 … p_k, tail_mass),  q = (q_1 … q_k, 1 − Σ_top-k q).
    Never builds a (N, V) tensor.
    """
    log_p_top = topk_logprobs.to(log_q_top.dtype)
    if tail_policy == "renormalize":
        return (
            log_p_top - torch.logsumexp(log_p_top, -1, keepdim=True),
            log_q_top - torch.logsumexp(log_q_top, -1, keepdim=True),
        )
    if tail_policy == "bucket":
        log_tiny = math.log(torch.finfo(torch.float32).tiny)  # an empty tail: finite, so 0·log 0 stays 0
        log_p_tail = tail_mass.to(log_q_top.dtype).log().clamp_min(log_tiny).unsqueeze(-1)
        return torch.cat([log_p_top, log_p_tail], -1), torch.cat([log_q_top, log_q_tail.clamp_min(log_tiny).unsqueeze(-1)], -1)
    raise ValueError(f"unknown tail policy {tail_policy!r}: use 'renormalize' or 'bucket'")

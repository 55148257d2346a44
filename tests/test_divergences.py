import math

import pytest
import torch

from training.schema.signal import topk_signal
from training.trainer.divergences import (
    DIVERGENCES,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_supports,
    total_variation,
)
from training.trainer.losses import LossSettings, SparseBatch, sparse_kd_loss

torch.manual_seed(0)


def logs(*probabilities):
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_closed_form_values():
    p, q = logs(0.5, 0.5), logs(0.9, 0.1)
    assert forward_kl(p, q).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert reverse_kl(p, q).item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert total_variation(p, q).item() == pytest.approx(0.4)
    m = [0.7, 0.3]  # β = 0.5
    jsd = 0.5 * sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], m)) + 0.5 * sum(
        a * math.log(a / b) for a, b in zip([0.9, 0.1], m)
    )
    assert generalized_jsd(p, q, 0.5).item() == pytest.approx(jsd)
    mixture = [0.1 * 0.5 + 0.9 * 0.9, 0.1 * 0.5 + 0.9 * 0.1]  # α = 0.1
    assert skew_kl(p, q, 0.1).item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], mixture)))
    mixture = [0.9 * 0.5 + 0.1 * 0.9, 0.9 * 0.5 + 0.1 * 0.1]
    assert skew_reverse_kl(p, q, 0.1).item() == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip([0.9, 0.1], mixture))
    )


def test_jsd_ends_are_forward_and_reverse_kl():
    p, q = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    assert torch.equal(generalized_jsd(p, q, 0.0), forward_kl(p, q))
    assert torch.equal(generalized_jsd(p, q, 1.0), reverse_kl(p, q))
    assert torch.all(generalized_jsd(p, q, 0.5) <= math.log(2) + 1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_nonnegative_and_zero_at_equality(name):
    p, q = torch.randn(16, 11).log_softmax(-1), torch.randn(16, 11).log_softmax(-1)
    assert torch.all(divergence(name, p, q) >= -1e-7)
    assert torch.allclose(divergence(name, p, p), torch.zeros(16), atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradcheck(name):
    p = torch.randn(3, 5, dtype=torch.float64).log_softmax(-1)
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: divergence(name, p, x.log_softmax(-1), 0.3, 0.2), (logits,))


@pytest.mark.parametrize("bad", [dict(beta=1.5), dict(beta=-0.1), dict(alpha=0.0), dict(alpha=1.0)])
def test_out_of_range_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        LossSettings(**bad)


@pytest.mark.parametrize("tail_policy", ["renormalize", "bucket"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_sparse_with_full_vocabulary_equals_dense(name, tail_policy):
    """In float64, so that the float32 rounding of a tail mass of 0 (~1e-7) does not count."""
    vocab, n = 13, 10
    generator = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    student_logits = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    ids, topk_logprobs, _, tail = topk_signal(teacher_logits, targets, k=vocab)
    log_q = student_logits.log_softmax(-1)
    log_p_sparse, log_q_sparse = sparse_supports(ids, topk_logprobs, tail, log_q, tail_policy)
    sparse = divergence(name, log_p_sparse, log_q_sparse)
    dense = divergence(name, teacher_logits.log_softmax(-1), log_q)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_sparse_loss_never_needs_teacher_vocabulary_and_temperature_rescales():
    vocab, n, k = 50, 6, 5
    student_logits = torch.randn(1, n + 1, vocab)
    teacher = torch.randn(n, vocab)
    targets = torch.randint(0, vocab, (n,))
    ids, topk_logprobs, _, tail = topk_signal(teacher, targets, k)
    batch = SparseBatch(
        input_ids=torch.zeros(1, n + 1, dtype=torch.long), attention_mask=torch.ones(1, n + 1, dtype=torch.long),
        rows=torch.zeros(n, dtype=torch.long), positions=torch.arange(n), targets=targets,
        topk_ids=ids.long(), topk_logprobs=topk_logprobs, tail_mass=tail,
    )
    loss, parts = sparse_kd_loss(student_logits, batch, LossSettings(divergence="forward_kl", nll_weight=0.5), 1.0)
    assert loss.item() == pytest.approx(parts["divergence"] + 0.5 * parts["nll"], rel=1e-5)
    # at τ = 2 the renormalized teacher top-k equals the top-k of log_softmax(logits / 2)
    hot, _ = sparse_kd_loss(student_logits, batch, LossSettings(divergence="forward_kl", temperature=2.0), 1.0)
    _, hot_logprobs, _, _ = topk_signal(teacher, targets, k, temperature=2.0)
    log_q = (student_logits[0, :n] / 2).log_softmax(-1)
    log_p, log_q_support = sparse_supports(ids, hot_logprobs, tail, log_q, "renormalize")
    assert hot.item() == pytest.approx(forward_kl(log_p, log_q_support).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="bucket tail policy needs the loss temperature"):
        sparse_kd_loss(student_logits, batch, LossSettings(divergence="forward_kl", tail_policy="bucket", temperature=2.0), 1.0)


def test_chunked_sparse_loss_matches_the_plain_expression(monkeypatch):
    """The fused, chunked loss and its gradient equal the unchunked autograd computation."""
    import training.trainer.losses as kd

    vocab, n, k = 40, 12, 6
    teacher = torch.randn(n, vocab)
    targets = torch.randint(0, vocab, (n,))
    ids, topk_logprobs, _, tail = topk_signal(teacher, targets, k)
    batch = SparseBatch(None, None, torch.zeros(n, dtype=torch.long), torch.arange(n), targets, ids.long(), topk_logprobs, tail)
    objective = LossSettings(divergence="jsd", beta=0.3, tail_policy="bucket", nll_weight=0.7)
    logits = torch.randn(1, n + 1, vocab, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(kd, "CHUNK_ELEMENTS", 5 * vocab)  # 3 chunks of ≤ 5 positions
    loss, parts = sparse_kd_loss(logits, batch, objective, 1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    log_q = logits[0, :n].log_softmax(-1)
    log_p, log_q_support = sparse_supports(ids, topk_logprobs, tail, log_q, "bucket")
    expected = generalized_jsd(log_p.double(), log_q_support, 0.3).mean() - 0.7 * log_q.gather(-1, targets[:, None]).mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)


def policy_batch(logits: torch.Tensor, k: int, stale: torch.Tensor):
    """A batch of one sequence of the student's own samples: the tokens, a teacher's top-k and its
    logprob of each token, and the logprob each was sampled with (the current one, minus `stale`)."""
    n, vocab = logits.shape[1] - 1, logits.shape[-1]
    teacher = torch.randn(n, vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,))
    ids, topk_logprobs, token_logprob, tail = topk_signal(teacher, targets, k)
    sampled = logits[0, :n].detach().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1) - stale
    return SparseBatch(None, None, torch.zeros(n, dtype=torch.long), torch.arange(n), targets, ids.long(), topk_logprobs, tail,
                       sampled_logprobs=sampled, teacher_token_logprobs=token_logprob, advantages=torch.randn(n, dtype=torch.float64))


def test_policy_gradient_objectives_match_their_expressions(monkeypatch):
    """kl_advantage: −(1/N) Σ min(ρA, clip(ρ, 1±ε)A) with A = log p(y) − log q_old(y) + w·(r − b), and
    its gradient; REINFORCE on fresh samples (ρ = 1, nothing clipped, k3 = 0); on stale ones the
    clipped tokens are counted and pass no gradient. gkd_rl is the divergence plus w · that surrogate."""
    import training.trainer.losses as kd
    from training.trainer.objectives import OBJECTIVES

    monkeypatch.setattr(kd, "CHUNK_ELEMENTS", 4 * 30)  # chunks of 4 positions
    n, vocab = 10, 30
    logits = torch.randn(1, n + 1, vocab, dtype=torch.float64, requires_grad=True)
    settings = LossSettings(divergence="jsd", reward_weight=0.5, clip_ratio=0.2)
    counts = {"completion_tokens": n}
    for stale in (torch.zeros(n, dtype=torch.float64), torch.tensor([0.5, -0.5] * 5, dtype=torch.float64)):
        batch = policy_batch(logits, 5, stale)
        loss, parts = OBJECTIVES["kl_advantage"].loss(logits, batch, settings, 1.0, counts)
        (grad,) = torch.autograd.grad(loss, logits)
        advantage = batch.teacher_token_logprobs - batch.sampled_logprobs + 0.5 * batch.advantages
        log_q = logits[0, :n].log_softmax(-1)
        ratio = (log_q.gather(-1, batch.targets[:, None]).squeeze(-1) - batch.sampled_logprobs).exp()
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
        (expected_grad,) = torch.autograd.grad(-surrogate.mean(), logits)
        assert loss.item() == pytest.approx(-surrogate.mean().item(), rel=1e-6)
        torch.testing.assert_close(grad, expected_grad)
        clipped = (ratio.clamp(0.8, 1.2) * advantage < ratio * advantage).double().mean().item()
        assert parts["clip_fraction"] == pytest.approx(clipped) and parts["kl_to_sampler"] >= 0
        assert parts["entropy"] == pytest.approx(-(log_q.exp() * log_q).sum(-1).mean().item(), rel=1e-6)
        if not stale.any():
            assert parts["clip_fraction"] == 0 and parts["kl_to_sampler"] == pytest.approx(0, abs=1e-12)
        else:
            assert 0 < parts["clip_fraction"] < 1 and parts["kl_to_sampler"] > 0
        gkd_rl, gkd_parts = OBJECTIVES["gkd_rl"].loss(logits, batch, settings, 1.0, counts)
        reward_only = torch.minimum(ratio * batch.advantages, ratio.clamp(0.8, 1.2) * batch.advantages)
        assert gkd_rl.item() == pytest.approx(gkd_parts["divergence"] - 0.5 * reward_only.mean().item(), rel=1e-6)

    zero_k = policy_batch(logits, 0, torch.zeros(n, dtype=torch.float64))
    assert zero_k.topk_ids.shape == (n, 0)
    loss, _ = OBJECTIVES["kl_advantage"].loss(logits, zero_k, settings, 1.0, counts)  # the token's logprob is all it needs
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="these rows store k = 0 .* objective kl_advantage"):
        OBJECTIVES["gkd_rl"].loss(logits, zero_k, settings, 1.0, counts)
    with pytest.raises(ValueError, match="teacher's signal is stored at temperature 2.0: score the rollouts with signal_temperature 1"):
        OBJECTIVES["kl_advantage"].loss(logits, zero_k, settings, 2.0, counts)

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

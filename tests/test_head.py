"""The fused head (training/trainer/head.py): the token losses from the student's hidden states and
output head equal the losses from its logits, in value and in every parameter's gradient; where the
logits are not hidden · headᵀ the loss takes the logits, by name."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import training.trainer.losses as kd
from training.schema.signal import topk_signal
from training.trainer.head import fuses, student_forward, unfused_reason
from training.trainer.lora import LoraSettings, with_lora
from training.trainer.losses import LossSettings, SparseBatch
from training.trainer.objectives import OBJECTIVES

VOCAB, LENGTH, PROMPT = 300, 14, 4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))]


def tiny_llama(tied: bool, **extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, **extra)
    return LlamaForCausalLM(config).double()


def own_samples(model, batch_size: int = 3) -> SparseBatch:
    """Sequences of PROMPT prompt tokens and LENGTH − PROMPT completion tokens, with a teacher's top-8
    and the logprob each token was sampled with (the model's own, shifted), as on-policy rows carry."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (batch_size, LENGTH))
    rows = torch.arange(batch_size).repeat_interleave(LENGTH - PROMPT)
    positions = torch.arange(PROMPT - 1, LENGTH - 1).repeat(batch_size)
    targets = input_ids[rows, positions + 1]
    ids, topk_logprobs, token_logprob, tail = topk_signal(torch.randn(len(rows), VOCAB, dtype=torch.float64) * 3, targets, 8)
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(model.device)).logits.cpu()
    sampled = logits[rows, positions].log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return SparseBatch(input_ids, torch.ones_like(input_ids), rows, positions, targets, ids.long(), topk_logprobs, tail,
                       sampled_logprobs=sampled - 0.3 * torch.randn(len(rows), dtype=torch.float64),
                       teacher_token_logprobs=token_logprob, advantages=torch.randn(len(rows), dtype=torch.float64)).to(model.device)


def loss_and_gradients(model, batch, objective: str, settings: LossSettings, fused: bool, bf16: bool = False):
    """As the loop trains: the forward under autocast (with `bf16`), the loss after it."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        student = student_forward(model, batch.input_ids, batch.attention_mask, fused)
    assert not fused or student.product_dtype == (torch.bfloat16 if bf16 else torch.float64 if model.dtype == torch.float64
                                                  else torch.float32)
    loss, parts = OBJECTIVES[objective].loss(student, batch, settings, 1.0, {"completion_tokens": len(batch.rows)})
    loss.backward()
    return loss.item(), parts, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("objective, settings", [
    ("supervised_kd", LossSettings(divergence="jsd", beta=0.3, nll_weight=0.5, temperature=2.0)),
    ("supervised_kd", LossSettings(divergence="skew_kl", tail_policy="bucket")),
    ("gkd_rl", LossSettings(divergence="reverse_kl", reward_weight=0.5)),
    ("kl_advantage", LossSettings(reward_weight=0.2)),
])
def test_fused_head_equals_the_loss_on_logits(monkeypatch, device, tied, objective, settings):
    """Loss, parts and the gradient of every parameter (the tied embedding and head too) agree within
    1e-5, over chunks of 7 positions, none of them built from the (B, L, V) logits."""
    monkeypatch.setattr(kd, "CHUNK_ELEMENTS", 7 * VOCAB)
    model = tiny_llama(tied).to(device)
    batch = own_samples(model)
    assert unfused_reason(model) is None and fuses("auto", model, OBJECTIVES[objective].takes_hidden)
    loss, parts, grads = loss_and_gradients(model, batch, objective, settings, fused=False)
    fused_loss, fused_parts, fused_grads = loss_and_gradients(model, batch, objective, settings, fused=True)
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_parts == pytest.approx(parts, rel=1e-5, abs=1e-9)
    assert grads.keys() == fused_grads.keys() and "lm_head.weight" in grads or tied
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)
    assert grads["model.embed_tokens.weight"].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_fused_head_follows_the_logits_loss(device):
    """Under the forward's bf16 autocast the head's product runs in bf16, as the model's own head does,
    though the loss runs after the autocast ends (as in the loop): the loss agrees to bf16's precision
    and the head's gradient stays fp32, like its weight."""
    model = tiny_llama(tied=False).float().to(device)
    batch = own_samples(model)
    batch = SparseBatch(**{name: t.float() if t is not None and t.is_floating_point() else t for name, t in batch.__dict__.items()})
    settings = LossSettings(divergence="jsd")
    loss, _, grads = loss_and_gradients(model, batch, "supervised_kd", settings, fused=False, bf16=True)
    fused_loss, _, fused_grads = loss_and_gradients(model, batch, "supervised_kd", settings, fused=True, bf16=True)
    assert fused_loss == pytest.approx(loss, rel=2e-2)
    assert fused_grads["lm_head.weight"].dtype == torch.float32
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grads[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_where_the_logits_are_not_hidden_times_head_the_loss_takes_the_logits():
    """A LoRA adapter on the head, a bias or logit soft-capping: 'auto' says why and takes the logits,
    'fused' refuses before training; the ranking objectives always take the logits."""
    capped = tiny_llama(tied=False)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping = 30.0" in unfused_reason(capped)
    adapted = with_lora(tiny_llama(tied=False), LoraSettings(r=2, target_modules=["lm_head", "q_proj"]), seed=0)
    assert "peft.tuners.lora.layer.Linear, not a plain torch Linear (LoRA on the head?)" in unfused_reason(adapted)
    with pytest.warns(UserWarning, match="the loss builds the student's logits: its output head is a peft"):
        assert not fuses("auto", adapted, takes_hidden=True)
    with pytest.raises(ValueError, match="loss_head 'fused' needs the logits to be hidden · headᵀ.*set loss_head 'auto'"):
        fuses("fused", capped, takes_hidden=True)
    with pytest.raises(ValueError, match="the ranking objectives take the logits"):
        fuses("fused", tiny_llama(tied=True), takes_hidden=False)
    frozen_head = with_lora(tiny_llama(tied=True), LoraSettings(r=2), seed=0)  # all-linear: every linear layer but the head
    assert unfused_reason(frozen_head) is None and not fuses("logits", frozen_head, takes_hidden=True)

"""Supervised fine-tuning on (prompt, completion) pairs, used to train the embedded teacher.

loss = −(1/|C|) Σ_{t∈C} log q(y_t | x, y_<t), C the completion tokens of the batch.
"""

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from training.optim import adamw, cosine_lr
from training.sequences import encode_completions


@dataclass
class SFTConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_length: int = 128
    seed: int = 0


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens; logits at t predict token t+1."""
    target = input_ids[:, 1:]
    mask = completion_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum()


def train_sft(
    model,
    tokenizer,
    next_batch: Callable[[int], tuple[list[str], list[str]]],
    config: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[dict]:
    """Trains `model` in place; `next_batch(step)` returns (prompts, completions). Returns the curve."""
    torch.manual_seed(config.seed)
    optimizer = adamw(model, config.lr, config.weight_decay)
    model.train()
    curve, started = [], time.perf_counter()
    for step in range(config.steps):
        lr = cosine_lr(step, config.steps, config.lr, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        prompts, completions = next_batch(step)
        input_ids, attention_mask, completion_mask = encode_completions(
            tokenizer, prompts, completions, config.max_length
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = completion_nll(logits, input_ids, completion_mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {step}; lower lr (now {lr:.2e})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append({"step": step, "loss": loss.item(), "lr": lr, "seconds": time.perf_counter() - started})
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return curve

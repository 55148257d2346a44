"""AdamW with linear warm-up and cosine decay."""

import math

import torch


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """lr(t) = peak·t/warmup during warm-up, then min + (peak − min)·½(1 + cos(π·progress))."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    min_lr = peak_lr * min_ratio
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw(model, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

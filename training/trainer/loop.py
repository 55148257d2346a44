"""The training loop: one loop for SFT, supervised KD, on-policy distillation (GKD, Algorithm 1) and the
ranking objectives (DPO, RRHF).

Each step draws its batch from the student's own samples, scored by the teacher, with probability
λ = `mix`, else from the fixed data (`Batches`, training/trainer/sources.py); λ = 0 is supervised KD,
λ = 1 fully on-policy. The batch trains its objective's loss (training/trainer/objectives.py):

    loss = (1/N) Σ ℓ,  N the batch's completion tokens (its pairs for DPO, its prompts for RRHF),
                       whatever its split into micro-batches or processes (training/trainer/parallel.py)

Each on-policy step records its staleness: the optimizer updates between the policy that sampled the
batch and the one it trains. With a state directory and `checkpoint_every`, the whole state is saved
every that many steps and a training of the same fingerprint resumes from it (training/trainer/resume.py).
How the training is started and where it reports is the launch's (training/launch/).
"""

import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.trainer import parallel
from training.trainer.head import fuses, student_forward
from training.trainer.objectives import BATCH_KINDS, OBJECTIVES, batch_kind
from training.trainer.optim import adamw, cosine_lr
from training.trainer.resume import load_state, save_state
from training.trainer.settings import TrainingSettings
from training.trainer.sources import Batches


class Reporter(Protocol):
    def progress(self, record: dict, steps: int) -> None:
        """Called after every step with its curve record (step, loss, parts, lr, source, ...)."""


def training_device(name: str) -> torch.device:
    """The device `name` stands for; CUDA requested where there is none is an error before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device here: set device 'auto' or 'cpu'")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA under 'auto' (or anywhere under 'bf16'); a no-op context for fp32."""
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_student(model, tokenizer, batches: Batches, settings: TrainingSettings, reporter: Reporter | None = None,
                  strategy: str = "ddp", state_dir: Path | None = None, fingerprint: str = "") -> list[dict]:
    """Trains `model` in place for `settings.steps` steps (DDP or FSDP2 under torchrun, `strategy`);
    returns the curve. A non-finite loss stops with an error before anything is saved."""
    device = parallel.local_device(training_device(settings.device))
    if settings.batch_size < parallel.world()[1]:
        raise ValueError(f"batch_size {settings.batch_size} is smaller than the {parallel.world()[1]} processes: "
                         "each needs rows of every batch")
    if settings.mix > 0 and batches.on_policy is None:
        raise ValueError(f"mix λ={settings.mix} needs on-policy batches (rollouts, or online sampling)")
    model.to(device)
    use_cache = getattr(model.config, "use_cache", None)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # a cache is for generation; with checkpointing it is refused anyway
    fused = fuses(settings.loss_head, model, OBJECTIVES[settings.objective].takes_hidden)
    trained = parallel.wrap(model, strategy)
    torch.manual_seed(settings.seed)
    sources = {"fixed": batches.fixed, **({"on_policy": batches.on_policy} if batches.on_policy is not None else {})}
    coin = torch.Generator().manual_seed(settings.seed + len(sources))
    optimizer = adamw(model, settings.learning_rate, settings.weight_decay)
    resumed = load_state(state_dir, fingerprint, model, optimizer, coin, sources)
    first_step, curve = (resumed[0] + 1, resumed[1]) if resumed else (0, [])
    for source in sources.values():
        source.resumed_at(first_step)
    started = time.perf_counter() - (curve[-1]["seconds"] if curve else 0.0)
    for step in range(first_step, settings.steps):
        on_policy = settings.mix > 0 and torch.rand(1, generator=coin).item() < settings.mix
        source = "on_policy" if on_policy else "fixed"
        rows = sources[source](step)  # a fresh batch is sampled here, with the model in eval mode
        model.train()
        lr = cosine_lr(step, settings.steps, settings.learning_rate, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, parts, tokens = accumulate_gradients(trained, rows, tokenizer.pad_token_id, settings, source, batches.temperature,
                                                   device, fused)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} ({parts}); lower learning_rate (now {lr:.2e}). "
                                     "No checkpoint was written.")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append({"step": step, "loss": loss, **parts, "lr": lr, "source": source, "completion_tokens": tokens,
                      "seconds": time.perf_counter() - started, **({"staleness": step - policy_step(rows)} if on_policy else {})})
        if reporter is not None:
            reporter.progress(curve[-1], settings.steps)
        every = settings.checkpoint_every
        if state_dir is not None and every and (step + 1) % every == 0 and step + 1 < settings.steps:
            save_state(state_dir, fingerprint, step, model, optimizer, coin, sources, curve)
    if settings.gradient_checkpointing:  # the saved checkpoint generates with its cache, as it came
        model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
    model.eval()
    return curve


def accumulate_gradients(model, rows: pa.Table, pad_token_id: int, settings: TrainingSettings, source: str,
                         temperature: float, device: torch.device, fused: bool = False) -> tuple[float, dict, int]:
    """Forward and backward over this process's share of `rows` (the global batch; all of it in one
    process) in micro-batches of `micro_batch_size` rows of similar length (sorted: less padding,
    ~30% less time for the embedded teacher; a pair or a prompt's responses stay together), each loss
    divided by the global batch's count N (completion tokens, pairs or prompts: its kind's unit,
    training/trainer/objectives.py), so the accumulated gradient is that of loss = (1/N) Σ ℓ whatever
    the split into micro-batches or processes (`training/trainer/parallel.py`). Returns (loss, mean
    parts, completion tokens), summed over the processes. With `fused` the loss takes the student's
    hidden states and head instead of its logits (training/trainer/head.py)."""
    kind = BATCH_KINDS[batch_kind(rows)]
    counts = kind.counts(rows)
    mine = rows.slice(*parallel.rank_slice(rows.num_rows))
    if settings.micro_batch_size:
        mine = mine.take(np.argsort(kind.lengths(mine), kind="stable"))
    processes = parallel.world()[1]
    objective, loss_settings = OBJECTIVES[settings.objective], settings.loss(source)
    micro = settings.micro_batch_size or max(1, mine.num_rows)
    starts = range(0, mine.num_rows, micro)
    loss, sums = 0.0, {}
    for index, start in enumerate(starts):
        piece = mine.slice(start, micro)
        batch = kind.batch(piece, pad_token_id, settings.k).to(device)
        with parallel.no_sync(model, last=index == len(starts) - 1):
            with autocast(device, settings.precision):
                student = student_forward(model, batch.input_ids, batch.attention_mask, fused)
            part_loss, parts = objective.loss(student, batch, loss_settings, temperature, counts)
            (part_loss * processes).backward()  # DDP averages over processes; the sum is wanted
        loss += part_loss.item()
        units = kind.counts(piece)[kind.unit]
        for name, mean in parts.items():
            sums[name] = sums.get(name, 0.0) + mean * units
    loss, *totals = parallel.summed([loss, *sums.values()])
    return loss, {name: total / max(1, counts[kind.unit]) for name, total in zip(sums, totals)}, counts["completion_tokens"]


def policy_step(rows: pa.Table) -> int:
    """The optimizer step of the policy that sampled an on-policy batch: its `policy_step` column
    (online rounds), else 0 (a stored round's rollouts, sampled by the parent before step 0)."""
    return pc.min(rows["policy_step"]).as_py() if "policy_step" in rows.column_names else 0


def rollout_reuse(curve: list[dict], batch_size: int, stored_rollouts: int) -> float:
    """How many times a stored round drew each rollout on average: on-policy steps × batch / rollouts.
    GKD samples every on-policy batch fresh (reuse 1); far above it, training is only loosely on-policy."""
    on_policy_steps = sum(c["source"] == "on_policy" for c in curve)
    return round(on_policy_steps * batch_size / max(1, stored_rollouts), 2)

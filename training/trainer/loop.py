"""Offline distillation of a student on a stored teacher-signal dataset; also a plain command:

    python -m training.trainer.loop --config run.json
    torchrun --nproc-per-node N -m training.trainer.loop --config run.json     (data parallel, see parallel.py)

run.json holds the `DistillConfig` fields. The command writes an HF checkpoint (safetensors) and
curve.json to `output`, so a launcher (torchrun, Ray Train with `launcher: ray`, Slurm, Kubernetes)
can run it anywhere; launched by a Dagster asset, rank 0 reports to the run through Dagster Pipes.

Objectives: `sft` trains on the teacher's tokens as hard targets (SeqKD); `supervised_kd` minimizes
a divergence to the stored top-k signal, optionally mixed with NLL (see `training/trainer/losses.py`).

On-policy mix (GKD, Algorithm 1): each step draws its batch from the student's own samples, scored by
the teacher, with probability λ = `mix`, else from the fixed `data`. λ = 0 is supervised KD, λ = 1
fully on-policy. The samples are either stored `rollouts` (a round's `teacher_feedback`, sampled by
the parent before step 0), or, with `online`, sampled fresh at every on-policy step by the student as
it is and appended to `online.batches` (`training/rounds/online.py`). Each on-policy step records its
staleness: the optimizer updates between the policy that sampled the batch and the one it trains.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
from pydantic import Field, model_validator

from training.trainer import parallel
from training.models.batches import list_lengths
from training.models.chat import prompt_ids_for
from training.trainer.divergences import DIVERGENCES
from training.trainer.losses import LossSettings, sparse_batch, sparse_kd_loss
from training.trainer.lora import LoraSettings, save_lora, with_lora
from training.models.checkpoints import load_model, save_model, weights_hash
from training.rounds.online import OnlineRollouts, OnlineSettings
from training.trainer.optim import adamw, cosine_lr
from training.trainer.resume import load_state, save_state
from training.trainer.shuffle import ShuffledBatches, blocks_of


REPORT_EVERY = 50  # steps between progress lines


class TrainingSettings(LossSettings):
    """The loss (inherited: divergence, β, α, tail policy, τ, NLL weight), the objective and the
    optimizer: shared by offline_student, student_checkpoint, the embedded models and the command."""

    objective: Literal["sft", "supervised_kd"] = Field(
        "supervised_kd", description="'sft': the sequence's tokens as hard targets (SeqKD on teacher data); "
        "'supervised_kd': the divergence to the stored top-k"
    )
    k: Optional[int] = Field(None, ge=1, description="train on the first k of the stored top-k; empty: all")
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    mix: float = Field(0.0, ge=0, le=1, description="λ: the share of steps whose batch is sampled by the student "
                       "(rollouts); 0 is supervised KD, 1 fully on-policy. Only rounds have rollouts")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 on the CPU; weights and optimizer stay fp32 either way"
    )
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="sequences per forward/backward, the batch sorted by length first (less padding); "
        "gradients accumulate to batch_size (empty: batch_size)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more time")
    launcher: Literal["process", "torchrun", "ray"] = Field(
        "process", description="how the assets launch the training command: 'process', one process; 'torchrun', "
        "`torchrun --standalone --nproc-per-node <processes>` on this node; 'ray', <processes> Ray Train workers on a Ray "
        "cluster (training/launch/ray_train.py)"
    )
    processes: int = Field(1, ge=1, description="training processes (launcher torchrun or ray): one per GPU, or gloo "
                           "processes on CPUs; each takes its share of every batch (DDP or FSDP, see `strategy`)")
    ray_address: str = Field("", description="launcher ray: the cluster to join ('auto', 'ray://host:10001'); empty: "
                             "$RAY_ADDRESS, else a local cluster")
    shuffle_window: int = Field(
        16384, ge=1, description="rows in memory while training on stored data: their row groups are shuffled, then the "
        "rows within each window of this many (see training/trainer/shuffle.py); all rows fit: one shuffle over all"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with processes > 1: 'ddp', a whole model per process; 'fsdp' (FSDP2), parameters, gradients "
        "and optimizer state sharded over the processes, for students that do not fit one device"
    )
    lora: Optional[LoraSettings] = Field(None, description="train LoRA adapters instead of all weights (training/trainer/lora.py); "
                                         "empty: all weights")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="steps between resumable checkpoints (weights, optimizer, RNG, data position); empty: none"
    )
    on_policy_divergence: Literal[("same", *DIVERGENCES)] = Field(
        "same", description="the divergence of on-policy batches ('same': `divergence`). DistiLLM-2: skew_kl on the fixed "
        "(teacher) data, skew_reverse_kl on the student's samples"
    )

    @model_validator(mode="after")
    def _launcher_for_processes(self):
        if self.processes > 1 and self.launcher == "process":
            raise ValueError(f"processes={self.processes} needs a launcher that starts them: set launcher 'torchrun' "
                             "(this node) or 'ray' (a Ray cluster), or processes 1")
        if self.lora is not None and self.strategy == "fsdp":
            raise ValueError("LoRA trains with strategy 'ddp' (its trainable weights are small); 'fsdp' with LoRA is not supported")
        return self

    def loss(self, source: str = "fixed") -> LossSettings:
        """The loss a batch from `source` ('fixed' or 'on_policy') is trained with: the divergence
        settings (`on_policy_divergence` for on-policy batches, when set), or NLL alone for `sft`."""
        if self.objective == "sft":
            return LossSettings(divergence="none", nll_weight=1.0)
        settings = self.model_dump(include=set(LossSettings.model_fields))
        if source == "on_policy" and self.on_policy_divergence != "same":
            settings["divergence"] = self.on_policy_divergence
        return LossSettings(**settings)


class DistillConfig(TrainingSettings):
    """The plain command's run.json: the training settings, and what to train on and where to write."""

    student: str  # checkpoint directory or hub id
    data: list[str]  # Parquet files with the sparse teacher signal
    output: str  # where the trained checkpoint and curve.json go
    teacher_vocab_size: Optional[int] = None
    rollouts: list[str] = []  # Parquet files of teacher-scored student samples
    online: Optional[OnlineSettings] = None  # sample every on-policy batch fresh instead (training/rounds/online.py)
    state_dir: Optional[str] = None  # resumable checkpoints (with checkpoint_every); empty: <output>.state

    @model_validator(mode="after")
    def _rollouts_for_mix(self):
        if self.mix > 0 and not self.rollouts and self.online is None:
            raise ValueError(f"mix λ={self.mix} draws batches from rollouts, but none are given: pass `rollouts` "
                             "or `online`, or set mix 0")
        if self.online is not None and self.rollouts:
            raise ValueError("give either stored `rollouts` or `online` sampling, not both")
        if self.online is not None and self.processes > 1:
            raise ValueError(f"online sampling runs in one training process, not {self.processes}: set processes 1, "
                             "or use stored rounds (online: false) with data-parallel training")
        return self


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


def check_compatible(table: pa.Table, student_vocab_size: int, teacher_vocab_size: int | None, k: int | None) -> None:
    """Fails before training: vocab mismatch, stored ids the student does not have, k > stored."""
    if teacher_vocab_size is not None and teacher_vocab_size != student_vocab_size:
        raise ValueError(
            f"teacher vocab {teacher_vocab_size} ≠ student vocab {student_vocab_size}: pick models that share a tokenizer"
        )
    stored_k = pc.min(table["k"]).as_py()
    if k is not None and k > stored_k:
        raise ValueError(f"k={k} is larger than the stored top-{stored_k}: lower k or relabel with a larger k")
    per_token = pc.list_flatten(table["topk_ids"])
    ids = pc.list_flatten(per_token).to_numpy()
    beyond = ids >= student_vocab_size
    if beyond.any():
        first = int(beyond.argmax())
        token = pc.list_parent_indices(per_token).to_numpy()[first]
        row = int(pc.list_parent_indices(table["topk_ids"]).to_numpy()[token])
        raise ValueError(
            f"sample {table['sample_id'][row].as_py()} stores token id {ids[first]}, beyond the student's "
            f"vocabulary of {student_vocab_size}: pick a student that shares the teacher's tokenizer"
        )


def train_student(model, tokenizer, data: pa.Table | list[str] | Iterator[pa.Table], settings: TrainingSettings, on_step=None,
                  rollouts: pa.Table | list[str] | Iterator[pa.Table] | OnlineRollouts | None = None, teacher_vocab_size: int | None = None,
                  state_dir: Path | None = None, fingerprint: str = "") -> list[dict]:
    """Trains `model` in place: each step a batch of `data`, or with probability λ = settings.mix a
    batch of `rollouts`; returns the curve. One loop for SFT (`objective: sft`, rows without a
    signal are fine) and KD. A non-finite loss stops with an error.

    `data` and `rollouts` are each either stored rows, a table or Parquet files, drawn in shuffled
    batches streamed a window at a time (`training/trainer/shuffle.py`: a curated dataset, a round's
    `teacher_feedback`), or an iterator that yields one batch each time a step asks for it (the
    embedded models' fresh problems); `rollouts` may also be an `OnlineRollouts`, called with the
    step: GKD's online form, where an on-policy batch is sampled from the student as it is at that
    step. Stored rows are checked a window at a time as they are loaded, other batches as they
    come; prompts rendered with another chat template than the student's are rendered anew with
    its own. On-policy steps record their `staleness`: step − the batch's `policy_step` (stored
    rollouts have none: the parent sampled them before step 0).

    With `state_dir` and `settings.checkpoint_every`, the training state is saved every that many
    steps, and a training of the same `fingerprint` (settings and inputs) resumes from the last one
    (`training/trainer/resume.py`); fresh batches are sampled anew after a resume."""
    objective = settings.loss()
    vocab_size = model.config.vocab_size
    device = parallel.local_device(training_device(settings.device))
    processes = parallel.world()[1]
    if settings.batch_size < processes:
        raise ValueError(f"batch_size {settings.batch_size} is smaller than the {processes} processes: each needs rows of every batch")
    model.to(device)
    use_cache = getattr(model.config, "use_cache", None)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # a cache is for generation; with checkpointing it is refused anyway
    trained = parallel.wrap(model, settings.strategy)  # DDP or FSDP2 under torchrun (see training/trainer/parallel.py)

    def checked(rows: pa.Table, kind: str) -> pa.Table:
        rows = rows.set_column(rows.schema.get_field_index("prompt_token_ids"), "prompt_token_ids", prompt_ids_for(tokenizer, rows))
        if "topk_ids" in rows.column_names:
            check_compatible(rows, vocab_size, teacher_vocab_size, settings.k)
            if (found := float(rows["temperature"][0].as_py())) != temperature:
                raise ValueError(f"{kind} rows store the teacher at temperature {found}, the fixed data at {temperature}: score them alike")
        return rows

    def stream(rows: pa.Table | list[str] | Iterator[pa.Table] | OnlineRollouts, kind: str, seed: int):
        if isinstance(rows, (pa.Table, list)):
            return ShuffledBatches(blocks_of(rows), settings.batch_size, seed, settings.shuffle_window, lambda window: checked(window, kind))
        if isinstance(rows, OnlineRollouts):
            return lambda step: checked(rows(step), kind)
        return (checked(batch, kind) for batch in rows)

    if settings.mix > 0 and rollouts is None:
        raise ValueError(f"mix λ={settings.mix} needs rollouts")
    torch.manual_seed(settings.seed)
    streams = {"fixed": stream(data, "fixed", settings.seed)}
    first = streams["fixed"].blocks[0] if isinstance(streams["fixed"], ShuffledBatches) else None
    temperature = (float(first.read(["temperature"])["temperature"][0].as_py()) if first is not None and "temperature" in first.column_names()
                   else objective.temperature)
    if rollouts is not None:
        streams["on_policy"] = stream(rollouts, "on-policy", settings.seed + 1)
    coin = torch.Generator().manual_seed(settings.seed + len(streams))
    optimizer = adamw(model, settings.learning_rate, settings.weight_decay)
    resumed = load_state(state_dir, fingerprint, model, optimizer, coin, streams)
    first_step, curve = (resumed[0] + 1, resumed[1]) if resumed else (0, [])
    if isinstance(rollouts, OnlineRollouts):
        rollouts.forget_from(first_step)
    started = time.perf_counter() - (curve[-1]["seconds"] if curve else 0.0)
    for step in range(first_step, settings.steps):
        on_policy = settings.mix > 0 and torch.rand(1, generator=coin).item() < settings.mix
        source = "on_policy" if on_policy else "fixed"
        draw = streams[source]
        rows = draw(step) if callable(draw) else next(draw)  # a fresh batch is sampled here, with the model in eval mode
        model.train()
        lr = cosine_lr(step, settings.steps, settings.learning_rate, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, parts, tokens = accumulate_gradients(trained, rows, tokenizer.pad_token_id, settings, settings.loss(source), temperature,
                                                   device)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {step} ({parts}); lower learning_rate (now {lr:.2e}). No checkpoint was written."
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append({
            "step": step, "loss": loss, **parts, "lr": lr, "source": source,
            "completion_tokens": tokens, "seconds": time.perf_counter() - started,
            **({"staleness": step - policy_step(rows)} if on_policy else {}),
        })
        if on_step is not None:
            on_step(step, loss)
        if (state_dir is not None and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
                and step + 1 < settings.steps):
            save_state(state_dir, fingerprint, step, model, optimizer, coin, streams, curve)
    if settings.gradient_checkpointing:  # the saved checkpoint generates with its cache, as it came
        model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache
    model.eval()
    return curve


def accumulate_gradients(model, rows: pa.Table, pad_token_id: int, settings: TrainingSettings, objective: LossSettings,
                         temperature: float, device: torch.device) -> tuple[float, dict, int]:
    """Forward and backward over this process's share of `rows` (the global batch; all of it in one
    process) in micro-batches of `micro_batch_size` sequences of similar length (sorted: less
    padding, ~30% less time for the embedded teacher), each loss divided by the global
    batch's completion tokens N, so the accumulated gradient is that of loss = (1/N) Σ_tokens ℓ
    whatever the split into micro-batches or processes (`training/trainer/parallel.py`). Returns (loss,
    mean parts, N), summed over the processes."""
    tokens = int(list_lengths(rows["completion_token_ids"]).sum())
    mine = rows.slice(*parallel.rank_slice(rows.num_rows))
    if settings.micro_batch_size:
        lengths = list_lengths(mine["prompt_token_ids"]) + list_lengths(mine["completion_token_ids"])
        mine = mine.take(np.argsort(lengths, kind="stable"))
    processes = parallel.world()[1]
    micro = settings.micro_batch_size or max(1, mine.num_rows)
    starts = range(0, mine.num_rows, micro)
    loss, sums = 0.0, {}
    for index, start in enumerate(starts):
        batch = sparse_batch(mine.slice(start, micro), pad_token_id, settings.k).to(device)
        with parallel.no_sync(model, last=index == len(starts) - 1):
            with autocast(device, settings.precision):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            part_loss, parts = sparse_kd_loss(logits, batch, objective, temperature, normalizer=tokens)
            (part_loss * processes).backward()  # DDP averages over processes; the sum is wanted
        loss += part_loss.item()
        for name, mean in parts.items():
            sums[name] = sums.get(name, 0.0) + mean * batch.targets.numel()
    loss, *totals = parallel.summed([loss, *sums.values()])
    return loss, {name: total / max(1, tokens) for name, total in zip(sums, totals)}, tokens


def policy_step(rows: pa.Table) -> int:
    """The optimizer step of the policy that sampled an on-policy batch: its `policy_step` column
    (online rounds), else 0 (a stored round's rollouts, sampled by the parent before step 0)."""
    return pc.min(rows["policy_step"]).as_py() if "policy_step" in rows.column_names else 0


def rollout_reuse(curve: list[dict], batch_size: int, stored_rollouts: int) -> float:
    """How many times a stored round drew each rollout on average: on-policy steps × batch / rollouts.
    GKD samples every on-policy batch fresh (reuse 1); far above it, training is only loosely on-policy."""
    on_policy_steps = sum(c["source"] == "on_policy" for c in curve)
    return round(on_policy_steps * batch_size / max(1, stored_rollouts), 2)


def run_fingerprint(config: DistillConfig) -> str:
    """What makes a training resumable by another launch: the same settings (but where it writes and
    how often it checkpoints) and the same student and data files (path, size, modification time)."""
    def identity(path: str) -> list:
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        return [path, [(f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]]

    settings = config.model_dump(exclude={"output", "state_dir", "checkpoint_every"})
    inputs = [identity(p) for p in [config.student, *config.data, *config.rollouts]]
    return hashlib.sha256(json.dumps([settings, inputs], sort_keys=True).encode()).hexdigest()[:16]


def run(config: DistillConfig, pipes=None) -> list[dict]:
    """Trains and writes the checkpoint, curve.json and distill_config.json to `output`; with
    `checkpoint_every`, a killed run launched again resumes from its last checkpoint. Rank 0 reports
    progress every REPORT_EVERY steps, and at the end the checkpoint's weights hash: to the Dagster
    run through `pipes` (launched by an asset, see `pipes_on_rank0`), else to stdout."""
    parallel.start_process_group(config.device)
    model, tokenizer = load_model(config.student)
    if config.lora is not None:
        model = with_lora(model, config.lora, config.seed, config.gradient_checkpointing)
    rollouts = config.rollouts or None
    if config.online is not None:
        device = training_device(config.device)
        rollouts = OnlineRollouts(model.to(device), tokenizer, config.online.teacher_engine(device), config.online, config.batch_size)
    report = pipes.log.info if pipes is not None else (lambda line: print(line, flush=True))

    def log_progress(step: int, loss: float) -> None:
        if (step % REPORT_EVERY == 0 or step + 1 == config.steps) and parallel.is_writer():
            report(f"step {step}/{config.steps} loss {loss:.4f}")

    state_dir = Path(config.state_dir or f"{config.output}.state")
    curve = train_student(model, tokenizer, config.data, config, log_progress, rollouts, config.teacher_vocab_size,
                          state_dir, run_fingerprint(config))
    weights = parallel.gathered_weights(model)
    if parallel.is_writer():
        output = Path(config.output)
        if config.lora is not None:
            model = save_lora(model, tokenizer, output, config.lora.merge)
        else:
            save_model(model, tokenizer, output, weights)
        (output / "curve.json").write_text(json.dumps(curve))
        (output / "distill_config.json").write_text(config.model_dump_json(indent=2))
        shutil.rmtree(state_dir, ignore_errors=True)  # trained: nothing left to resume
        trained = weights_hash(weights if weights is not None else model)
        report(f"trained {config.steps} steps, final loss {curve[-1]['loss']:.4f}, weights {trained}")
        if pipes is not None:
            pipes.report_custom_message({"weights_hash": trained, "final_loss": curve[-1]["loss"]})
    parallel.barrier()
    return curve


@contextmanager
def pipes_on_rank0():
    """A Dagster Pipes connection when an asset launched this process and it is rank 0 (torchrun and
    Ray Train set RANK), else None: one writer per session."""
    if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ and int(os.environ.get("RANK", "0")) == 0:
        with open_dagster_pipes() as pipes:
            yield pipes
    else:
        yield None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON file with DistillConfig fields")
    args = parser.parse_args()
    config = DistillConfig.model_validate_json(Path(args.config).read_text())
    if config.launcher == "ray":
        from training.launch.ray_train import train_on_ray

        train_on_ray(config)
        return
    with pipes_on_rank0() as pipes:
        run(config, pipes)


if __name__ == "__main__":
    main()

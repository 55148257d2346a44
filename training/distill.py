"""Offline distillation of a student on a stored teacher-signal dataset; also a plain command:

    python -m training.distill --config run.json

run.json holds the `DistillConfig` fields. The command writes an HF checkpoint (safetensors) and
curve.json to `output`, so a launcher (torchrun, accelerate, Dagster Pipes) can run it anywhere.

Objectives: `sft` trains on the teacher's tokens as hard targets (SeqKD); `supervised_kd` minimizes
a divergence to the stored top-k signal, optionally mixed with NLL (see `training/kd.py`).

On-policy mix (GKD, Algorithm 1): with `rollouts` (the student's own samples, scored by the teacher:
`teacher_feedback`), each step draws its batch from the rollouts with probability λ = `mix`, else
from the fixed `data`. λ = 0 is supervised KD, λ = 1 fully on-policy.
"""

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from training.kd import Objective, sparse_batch, sparse_kd_loss
from training.models import load_model, save_model
from training.optim import adamw, cosine_lr


@dataclass
class DistillConfig:
    student: str  # checkpoint directory or hub id
    data: list[str]  # Parquet files with the sparse teacher signal
    output: str  # where the trained checkpoint and curve.json go
    objective: str = "supervised_kd"  # sft | supervised_kd
    divergence: str = "jsd"
    beta: float = 0.5
    alpha: float = 0.1
    tail_policy: str = "renormalize"
    temperature: float = 1.0
    nll_weight: float = 0.0
    k: int | None = None  # use the first k of the stored top-k; None: all
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    teacher_vocab_size: int | None = None
    rollouts: list[str] = field(default_factory=list)  # Parquet files of teacher-scored student samples
    mix: float = 0.0  # λ: probability that a step's batch comes from `rollouts`
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix λ must be in [0, 1], got {self.mix}")
        if self.mix > 0 and not self.rollouts:
            raise ValueError(f"mix λ={self.mix} draws batches from rollouts, but none are given: pass `rollouts` or set mix 0")

    def loss_objective(self) -> Objective:
        if self.objective == "sft":
            return Objective(divergence="none", nll_weight=1.0)
        if self.objective == "supervised_kd":
            return Objective(self.divergence, self.beta, self.alpha, self.tail_policy, self.temperature, self.nll_weight)
        raise ValueError(f"unknown objective {self.objective!r}: use 'sft' or 'supervised_kd'")


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


def batches(table: pa.Table, batch_size: int, generator: torch.Generator):
    """Batches of `table`'s rows in a shuffled order, reshuffled after every pass, forever."""
    while True:
        order = torch.randperm(table.num_rows, generator=generator)
        for start in range(0, max(1, len(order) - batch_size + 1), batch_size):
            yield table.take(pa.array(order[start : start + batch_size].numpy()))


def train_student(model, tokenizer, table: pa.Table, config: DistillConfig, on_step=None,
                  rollouts: pa.Table | Iterator[pa.Table] | None = None) -> list[dict]:
    """Trains `model` in place on `table`, and with probability config.mix per step on a batch of
    `rollouts`; returns the curve. A non-finite loss stops with an error.

    `rollouts` is either a table of stored, teacher-scored student samples (a round's
    `teacher_feedback`, drawn like `table`), or an iterator that yields one fresh scored batch each
    time an on-policy step asks for it: GKD's online form, where the batch is sampled from the student
    as it is at that step. Stored tables are checked before training, fresh batches as they come."""
    objective = config.loss_objective()
    check_compatible(table, model.config.vocab_size, config.teacher_vocab_size, config.k)
    temperature = float(table["temperature"][0].as_py())

    def checked(rows: pa.Table, kind: str) -> pa.Table:
        check_compatible(rows, model.config.vocab_size, config.teacher_vocab_size, config.k)
        if (found := float(rows["temperature"][0].as_py())) != temperature:
            raise ValueError(f"{kind} rollouts store the teacher at temperature {found}, fixed data at {temperature}: score them alike")
        return rows

    if config.mix > 0 and rollouts is None:
        raise ValueError(f"mix λ={config.mix} needs rollouts")
    torch.manual_seed(config.seed)
    streams = {"fixed": batches(table, config.batch_size, torch.Generator().manual_seed(config.seed))}
    if isinstance(rollouts, pa.Table):
        streams["on_policy"] = batches(checked(rollouts, "stored"), config.batch_size, torch.Generator().manual_seed(config.seed + 1))
    elif rollouts is not None:
        streams["on_policy"] = (checked(rows, "fresh") for rows in rollouts)
    coin = torch.Generator().manual_seed(config.seed + len(streams))
    optimizer = adamw(model, config.lr, config.weight_decay)
    curve, started = [], time.perf_counter()
    for step in range(config.steps):
        on_policy = config.mix > 0 and torch.rand(1, generator=coin).item() < config.mix
        source = "on_policy" if on_policy else "fixed"
        rows = next(streams[source])  # a fresh batch is sampled here, with the model in eval mode
        model.train()
        batch = sparse_batch(rows, tokenizer.pad_token_id, config.k)
        lr = cosine_lr(step, config.steps, config.lr, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, parts = sparse_kd_loss(logits, batch, objective, temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step} ({parts}); lower lr (now {lr:.2e}). No checkpoint was written."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append({
            "step": step, "loss": loss.item(), **parts, "lr": lr, "source": source,
            "completion_tokens": int(batch.targets.numel()), "seconds": time.perf_counter() - started,
        })
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    return curve


def run(config: DistillConfig) -> list[dict]:
    model, tokenizer = load_model(config.student)
    table = pa.concat_tables([pq.read_table(path) for path in config.data])
    rollouts = pa.concat_tables([pq.read_table(path) for path in config.rollouts]) if config.rollouts else None

    def log_progress(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"step {step}/{config.steps} loss {loss:.4f}", flush=True)

    curve = train_student(model, tokenizer, table, config, log_progress, rollouts)
    output = Path(config.output)
    save_model(model, tokenizer, output)
    (output / "curve.json").write_text(json.dumps(curve))
    (output / "distill_config.json").write_text(json.dumps(asdict(config), indent=2))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON file with DistillConfig fields")
    args = parser.parse_args()
    run(DistillConfig(**json.loads(Path(args.config).read_text())))


if __name__ == "__main__":
    main()

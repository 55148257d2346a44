"""The training as a plain command, which any launcher can start anywhere:

    python -m training.launch --config run.json
    torchrun --nproc-per-node N -m training.launch --config run.json     (data parallel: training/trainer/parallel.py)

run.json holds the `DistillCommand` fields. The command writes an HF checkpoint (safetensors), its
card.json (the model card, with the hash of the weights it saved), curve.json and distill_config.json
to `output`. `launch: {launcher: ray}` makes the command a Ray driver that starts Ray Train workers
(training/launch/ray_train.py); `command_line` is what an asset runs for the other launchers.

The on-policy batches (drawn with probability λ = `mix`) are stored `rollouts` (a round's
teacher_feedback, sampled by the parent before step 0), or, with `online`, sampled fresh at every
on-policy step by the student as it is (training/rounds/online.py).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from pydantic import model_validator

from training.data.rollouts import check_rewards
from training.launch.report import Reporter
from training.launch.settings import LaunchSettings
from training.models.checkpoints import load_model, model_card, save_model
from training.rounds.online import OnlineRollouts, OnlineSettings
from training.trainer import parallel
from training.trainer.loop import train_student, training_device
from training.trainer.lora import save_lora, with_lora
from training.trainer.objectives import POLICY_GRADIENT
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for


class DistillCommand(TrainingSettings):
    """run.json: the training settings, how it is launched, what it trains on and where it writes."""

    student: str  # checkpoint directory or hub id
    data: list[str]  # Parquet files with the sparse teacher signal
    output: str  # where the trained checkpoint, card.json and curve.json go
    teacher: Optional[str] = None  # whose token ids `data` stores: its checkpoint, or its stored token table (token_texts,
    # a .parquet file); aligned to the student's tokens when its tokenizer differs (training/models/alignment.py)
    rollouts: list[str] = []  # Parquet files of teacher-scored student samples
    online: Optional[OnlineSettings] = None  # sample every on-policy batch fresh instead (training/rounds/online.py)
    state_dir: Optional[str] = None  # resumable checkpoints (with checkpoint_every); empty: <output>.state
    launch: LaunchSettings = LaunchSettings()

    @model_validator(mode="after")
    def _consistent(self):
        if self.mix > 0 and not self.rollouts and self.online is None:
            raise ValueError(f"mix λ={self.mix} draws batches from rollouts, but none are given: pass `rollouts` "
                             "or `online`, or set mix 0")
        if self.online is not None and self.rollouts:
            raise ValueError("give either stored `rollouts` or `online` sampling, not both")
        if self.online is not None and self.launch.processes > 1:
            raise ValueError(f"online sampling runs in one training process, not {self.launch.processes}: set processes 1, "
                             "or use stored rounds (online: false) with data-parallel training")
        if self.objective in POLICY_GRADIENT and self.reward_weight > 0:  # a reward needs a verifier and n ≥ 2 per prompt
            online = self.online
            if online is not None and (online.task == "none" or online.sampling.n < 2):
                raise ValueError(f"reward_weight {self.reward_weight} weighs the task reward against the mean reward of a prompt's "
                                 f"samples: online sampling needs a task that verifies answers (task is {online.task!r}) and "
                                 f"n ≥ 2 samples per prompt (n is {online.sampling.n}); or set reward_weight 0")
            if self.rollouts:
                check_rewards(self.rollouts)
        if self.lora is not None and self.launch.strategy == "fsdp":
            raise ValueError("LoRA trains with strategy 'ddp' (its trainable weights are small); 'fsdp' with LoRA is not supported")
        return self


def run_fingerprint(config: DistillCommand) -> str:
    """What makes a training resumable by another launch: the same settings (but where it writes and
    how often it checkpoints) and the same student and data files (path, size, modification time)."""
    def identity(path: str) -> list:
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        return [path, [(f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]]

    settings = config.model_dump(exclude={"output", "state_dir", "checkpoint_every"})
    inputs = [identity(p) for p in [config.student, *config.data, *config.rollouts]]
    return hashlib.sha256(json.dumps([settings, inputs], sort_keys=True).encode()).hexdigest()[:16]


def run(config: DistillCommand, reporter: Reporter) -> list[dict]:
    """Trains and writes the checkpoint, card.json, curve.json and distill_config.json to `output`;
    with `checkpoint_every`, a killed run launched again resumes from its last checkpoint."""
    parallel.start_process_group(config.device)
    model, tokenizer = load_model(config.student)
    if config.lora is not None:
        model = with_lora(model, config.lora, config.seed, config.gradient_checkpointing)
    on_policy, on_resume = config.rollouts or None, None
    if config.online is not None:
        device = training_device(config.device)
        online = OnlineRollouts(model.to(device), tokenizer, config.online.teacher_engine(device), config.online, config.batch_size)
        on_policy, on_resume = online, online.forget_from
    batches = batches_for(model, tokenizer, config, config.data, on_policy, config.teacher, on_resume)
    state_dir = Path(config.state_dir or f"{config.output}.state")
    curve = train_student(model, tokenizer, batches, config, reporter, config.launch.strategy, state_dir, run_fingerprint(config))
    weights = parallel.gathered_weights(model)
    if parallel.is_writer():
        output = Path(config.output)
        if config.lora is not None:
            model = save_lora(model, tokenizer, output, config.lora.merge)
        else:
            save_model(model, tokenizer, output, weights)
        card = model_card("", model, tokenizer, weights=weights)
        if batches.cross is not None:  # a teacher with another tokenizer (training/models/alignment.py)
            card = card.extended(alignment=batches.cross.coverage())
        (output / "card.json").write_text(json.dumps(card.as_dict()))
        (output / "curve.json").write_text(json.dumps(curve))
        (output / "distill_config.json").write_text(config.model_dump_json(indent=2))
        shutil.rmtree(state_dir, ignore_errors=True)  # trained: nothing left to resume
        reporter.result(config.steps, curve[-1]["loss"], card.weights_hash)
    parallel.barrier()
    return curve


def command_line(config: DistillCommand, config_path: Path) -> list[str]:
    """The command that trains `config` (written to `config_path`) with its launcher: one process,
    torchrun on this node, or a Ray driver (which starts the workers itself)."""
    launcher = [sys.executable]
    if config.launch.launcher == "torchrun":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(config.launch.processes)]
    return [*launcher, "-m", "training.launch", "--config", str(config_path)]

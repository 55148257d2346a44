"""The training settings: the loss (inherited: divergence, β, α, tail policy, τ, NLL weight), the
objective and the optimizer, and how one process trains (device, precision, micro-batches). Shared
by offline_student, student_checkpoint, the embedded models and the plain command. How many
processes train and how they are started are the launch's settings (`training/launch/settings.py`)."""

from typing import Literal, Optional

from pydantic import Field, model_validator

from training.trainer.divergences import DIVERGENCES
from training.trainer.lora import LoraSettings
from training.trainer.losses import LossSettings
from training.trainer.objectives import OBJECTIVES, POLICY_GRADIENT


class TrainingSettings(LossSettings):
    objective: Literal[tuple(OBJECTIVES)] = Field(
        "supervised_kd", description="'sft': the sequence's tokens as hard targets (SeqKD on teacher data); "
        "'supervised_kd': the divergence to the stored top-k; 'dpo': preference pairs (preference_beta, kd_weight); "
        "'rrhf': each prompt's ranked responses; 'gkd_rl': the divergence plus the reward's policy gradient (reward_weight); "
        "'kl_advantage': a policy gradient with advantage log p_T(y) − log q(y) per sampled token (training/trainer/objectives.py)"
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
    loss_head: Literal["auto", "fused", "logits"] = Field(
        "auto", description="'fused': the token losses take the student's last hidden states and output head and make "
        "the logits a chunk of positions at a time, never (batch, length, vocab) (training/trainer/head.py); 'logits': "
        "from the model's logits; 'auto': fused where the head allows it (a plain linear head), else the logits, saying why"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more time")
    shuffle_window: int = Field(
        16384, ge=1, description="rows in memory while training on stored data: their row groups are shuffled, then the "
        "rows within each window of this many (see training/trainer/shuffle.py); all rows fit: one shuffle over all"
    )
    lora: Optional[LoraSettings] = Field(None, description="train LoRA adapters instead of all weights (training/trainer/lora.py); "
                                         "empty: all weights")
    teachers: list[str] = Field([], description="train on the fixed rows these teachers scored (their teacher_id; 'mixture': "
                                "the stored mixture of several, teacher_labeled's `mixture`); empty: every row, each with its "
                                "own teacher's signal")
    checkpoint_every: Optional[int] = Field(
        None, ge=1, description="steps between resumable checkpoints (weights, optimizer, RNG, data position); empty: none"
    )
    on_policy_divergence: Literal[("same", *DIVERGENCES)] = Field(
        "same", description="the divergence of on-policy batches ('same': `divergence`). DistiLLM-2: skew_kl on the fixed "
        "(teacher) data, skew_reverse_kl on the student's samples"
    )

    @model_validator(mode="after")
    def _weights_have_their_objective(self):
        if self.objective == "rrhf" and self.kd_weight > 0:
            raise ValueError(f"objective 'rrhf' takes no kd_weight (it is {self.kd_weight}): RRHF ranks the responses "
                             "without the teacher's divergence; set kd_weight 0, or use objective 'dpo' on pairs")
        if self.reward_weight > 0 and self.objective not in POLICY_GRADIENT:
            raise ValueError(f"reward_weight {self.reward_weight} weighs a policy gradient, and objective {self.objective!r} has "
                             f"none: use objective {' or '.join(sorted(POLICY_GRADIENT))}, or set reward_weight 0")
        if self.objective == "gkd_rl" and self.reward_weight == 0:
            raise ValueError("objective 'gkd_rl' with reward_weight 0 is supervised KD: set reward_weight > 0 (e.g. 1), "
                             "or use objective 'supervised_kd'")
        return self

    def loss(self, source: str = "fixed") -> LossSettings:
        """The loss a batch from `source` ('fixed' or 'on_policy') trains with, as its objective says."""
        return OBJECTIVES[self.objective].settings(self, source)

"""Run configuration of the assets, as Dagster `Config`: editable in the UI launchpad.

A setting that `training/` also uses is declared there once (labeling, signal, curation, loss and
optimizer) and inherited here, so the launchpad and the plain commands share its defaults and
checks. Every field has a default, so the embedded demo needs no configuration. Out-of-range values
fail when the run starts, before any model is loaded.
"""

from typing import Literal, Optional

import dagster as dg
from pydantic import BaseModel, Field, model_validator

from training.data.curation import CurationSettings
from training.data.labeling import MIXTURE_ID, TEACHER_ID, LabelingSettings, TeacherPanel
from training.data.prompt_sources import PromptSource
from training.engines.sampling import Sampling
from training.evals.harness import HarnessSettings
from training.feedback.judge import JudgeSettings
from training.feedback.judgments import CorrectionSettings, JudgmentSettings
from training.feedback.pairs import PairPolicy
from training.launch.settings import LaunchSettings
from training.rounds.online import OnlineSettings
from training.schema.signal import SignalSettings
from training.trainer.divergences import DIVERGENCES
from training.trainer.lora import LoraSettings
from training.trainer.objectives import OBJECTIVES, RANKING_KINDS
from training.trainer.settings import TrainingSettings

EMBEDDED = "embedded"
TRAINING_DATA = ("curated", "teacher_labeled")  # what a student trains on, and rounds draw prompts from


class SamplingConfig(Sampling, dg.Config):
    """`Sampling` as Dagster config: a nested config field must be a `dg.Config`."""


def config_field(settings: type[BaseModel], name: str = "sampling"):
    """The `name` field of a training setting as a SamplingConfig field, with that setting's own default
    and description, so that the launchpad and the plain commands share them."""
    field = settings.model_fields[name]
    return Field(SamplingConfig(**field.default.model_dump()), description=field.description)


class ModelConfig(dg.Config):
    """A model: the embedded one (trained here with SFT on the task), or a configured one (recorded)."""

    model: str = Field(
        EMBEDDED,
        description="'embedded' builds the tiny arithmetic model; anything else is a hub id or a local "
        "directory, loaded with from_pretrained and recorded, not trained",
    )
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) of `model`")
    trust_remote_code: bool = Field(False, description="let from_pretrained run code shipped with the model")
    seed: int = 0
    task: Literal["arithmetic", "arithmetic_chain"] = Field(
        "arithmetic", description="embedded: the task it learns (set seed_prompts' and eval_set's `task` with it); "
        "arithmetic_chain's models have 320 positions")
    hidden_size: Optional[int] = Field(None, ge=32, multiple_of=32, description="embedded: width, in attention heads of 32 "
                                       "(default: teacher 128, student 64)")
    num_hidden_layers: Optional[int] = Field(None, ge=1, description="embedded: depth (default: teacher 3, student 2)")
    learning_rate: float = Field(3e-3, gt=0, description="embedded: SFT learning rate")
    eval_problems: int = Field(500, ge=1, description="embedded: eval-split problems for the exact-match figure")


class OtherTeacherConfig(ModelConfig):
    """One more teacher: a configured model, or the embedded teacher trained again (teacher_model's
    embedded settings, this `seed` and `learning_rate`)."""

    teacher_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="how rows, routing and mixtures name it")


class TeacherModelConfig(ModelConfig):
    teacher_id: str = Field(TEACHER_ID, pattern=r"^[A-Za-z0-9_.-]+$", description="how rows, routing and mixtures name "
                            "this teacher")
    others: list[OtherTeacherConfig] = Field([], description="more teachers (teacher_labeled's routing, scoring and mixture say "
                                             "how they share the labeling); each is recorded or trained like this one")
    train_steps: int = Field(900, ge=1, description="embedded: SFT steps")
    batch_size: int = Field(80, ge=1)
    micro_batch_size: Optional[int] = Field(40, ge=1, description="embedded: sequences per forward/backward, sorted by length "
                                            "(less padding)")
    instruction_share: float = Field(
        0.2, ge=0, lt=1, description="embedded: share of each batch in the instruction language (writing new problems)"
    )
    correction_share: float = Field(
        0.25, ge=0, lt=1, description="embedded: share of the solutions that continue truly after a wrong step "
        "(so the teacher has an opinion on a student's mistakes)"
    )
    varied_steps: bool = Field(False, description="embedded: write each step short or long at random (more than one valid way); "
                               "off by default: the small student then spends its capacity on the style (bench/quality.py)")

    @model_validator(mode="after")
    def _distinct_ids(self):
        ids = [self.teacher_id, *(other.teacher_id for other in self.others)]
        if len(set(ids)) < len(ids) or MIXTURE_ID in ids:
            raise ValueError(f"teacher ids must be distinct and not {MIXTURE_ID!r}: {ids}")
        return self

    @model_validator(mode="after")
    def _instructions_of_the_task(self):
        if self.task == "arithmetic_chain" and self.instruction_share > 0:
            raise ValueError("arithmetic_chain has no instruction language: set teacher_model's instruction_share to 0 (and "
                             "leave expanded and synthesized out of the run)")
        return self


class StudentModelConfig(ModelConfig):
    train_steps: int = Field(550, ge=1, description="embedded: SFT warm-start steps, landing the student well under its teacher "
                             "(0.27–0.72 exact match over seeds 0–2 and two CPUs)")
    batch_size: int = Field(64, ge=1)
    micro_batch_size: Optional[int] = Field(32, ge=1, description="embedded: sequences per forward/backward, sorted by length "
                                            "(less padding)")
    instruction_share: float = Field(0.0, ge=0, lt=1, description="embedded: the student only solves")
    correction_share: float = Field(0.0, ge=0, lt=1, description="embedded: the warm start sees reference solutions only")
    varied_steps: bool = Field(False, description="embedded: the warm start sees both ways of writing a step (set it "
                               "with the teacher's, so that the student starts in its teacher's style)")


class PromptSourceConfig(PromptSource, dg.Config):
    """Where prompts come from (training/data/prompt_sources.py), as Dagster config."""


class SeedPromptsConfig(PromptSourceConfig):
    """The inputs the teacher labels; embedded: the arithmetic train split."""

    num_prompts: int = Field(2048, ge=1, description="prompts to generate (embedded) or the most to keep")


class EvalSetConfig(PromptSourceConfig):
    """Held-out problems; embedded: the arithmetic eval split, disjoint from train by construction."""

    num_prompts: int = Field(500, ge=1, description="problems to generate (embedded) or the most to keep")
    split: str = "test"


class LabelingConfig(LabelingSettings, dg.Config):
    sampling: SamplingConfig = config_field(LabelingSettings)


class TeacherLabeledConfig(TeacherPanel, LabelingConfig):
    """The teacher answers every seed prompt (n responses each) and its top-k signal is stored; with
    several teachers, `routing`, `scoring` and `mixture` say how they share the work."""


class WritingConfig(LabelingConfig):
    """How the teacher writes new inputs; they are then labeled like seed prompts."""

    templates: Literal["task", "self_instruct"] = Field(
        "task",
        description="'task': the task's own instruction templates (for the embedded task, the tiny teacher's "
        "instruction language); 'self_instruct': Self-Instruct, Evol-Instruct and UltraChat-style prompts for "
        "instruction-following teachers",
    )
    writing: SamplingConfig = Field(SamplingConfig(temperature=1.0, max_new_tokens=24), description="how the teacher writes "
                                    "the inputs, one per instruction (n = 1); its seed also draws the instructions")

    @model_validator(mode="after")
    def _one_input_per_instruction(self):
        if self.writing.n != 1:
            raise ValueError(f"writing.n={self.writing.n}: the teacher writes one input per instruction; ask for more of them")
        return self


class ExpandedConfig(WritingConfig):
    num_expanded: int = Field(512, ge=0, description="Self-Instruct requests, each with `demonstrations` seeds")
    demonstrations: int = Field(3, ge=1)
    num_evolved: int = Field(256, ge=0, description="seeds rewritten into a harder variant (Evol-Instruct)")
    expand_template: Optional[str] = Field(None, description="overrides the preset; has {demonstrations} and {next_index}")
    demonstration_template: Optional[str] = Field(None, description="overrides the preset; has {index} and {prompt}")
    evolve_template: Optional[str] = Field(None, description="overrides the preset; has {seed}")


class SynthesizedConfig(WritingConfig):
    num_synthesized: int = Field(512, ge=1, description="inputs to write from topics")
    topics: dict[str, float] = Field({}, description="topic or skill → weight; empty: the task's own topics (the embedded task: "
                                     "every (op, digits, carries) equally)")
    synthesize_template: Optional[str] = Field(None, description="overrides the preset; has {topic}")

    @model_validator(mode="after")
    def _weights_positive(self):
        bad = {t: w for t, w in self.topics.items() if not w > 0}
        if bad:
            raise ValueError(f"topic weights must be > 0: {bad}")
        return self


class CuratedConfig(CurationSettings, dg.Config):
    """Filters over labeled, expanded, evolved and synthesized rows, then a selection (see training/data/curation.py)."""

    memory_limit: str = Field("2GB", description="DuckDB's memory for curation (e.g. '2GB', '64GB'); past it, it spills to the "
                                                 "run's work directory, so more memory is faster, never required")


class LoraConfig(LoraSettings, dg.Config):
    """LoRA adapters instead of all weights (training/trainer/lora.py); the assets need `merge`."""


class LaunchConfig(LaunchSettings, dg.Config):
    """How the training command is started (training/launch/settings.py)."""


class TrainingConfig(TrainingSettings, dg.Config):
    """The training settings of offline_student and student_checkpoint, as Dagster config, and how
    the training command is launched."""

    lora: Optional[LoraConfig] = Field(None, description="train LoRA adapters instead of all weights; empty: all weights")
    launch: LaunchConfig = Field(LaunchConfig(), description="one process, torchrun on this node, or Ray Train workers")
    train_on: Literal[TRAINING_DATA] = Field(
        "curated", description="the fixed data: 'curated' (the filtered, selected union) or 'teacher_labeled' (every labeled "
        "seed prompt, without curation)"
    )


class OfflineStudentConfig(TrainingConfig):
    """Offline distillation on the stored teacher signal (SeqKD or supervised KD); `mix` stays 0.
    Its defaults are the demo's measured best (docs/benchmarks.md#the-demo): skew KL (α = 0.1) for
    1200 steps took the embedded student to 0.85–0.90 at seeds 0–2 (0.78 at seed 2 in 800 steps),
    where JSD for 400 reached 0.71–0.87."""

    divergence: Literal[(*DIVERGENCES, "none")] = Field("skew_kl", description="the divergence to the teacher's top-k "
                                                        "(skew KL: DistiLLM's KL(p ‖ αp + (1−α)q), α = `alpha`)")
    steps: int = Field(1200, ge=1)

    @model_validator(mode="after")
    def _no_rollouts_offline(self):
        if self.mix:
            raise ValueError(f"offline_student has no rollouts to mix in (mix={self.mix}): leave mix at 0; "
                             "rounds mix on-policy batches in (student_checkpoint's mix)")
        return self


class HarnessConfig(HarnessSettings, dg.Config):
    pass


class EvalsConfig(dg.Config):
    seed: int = Field(0, description="seed of the sampled exact match, the student samples and the harness")
    harness: HarnessConfig = Field(HarnessConfig(), description="lm-evaluation-harness tasks on each checkpoint (none by default)")


class StudentRolloutsConfig(dg.Config):
    """The current student's own samples on prompts drawn from the training data, seeded by round."""

    num_prompts: int = Field(768, ge=1, description="distinct prompts drawn per round; with n, enough that student_checkpoint "
                             "draws each rollout about 1.5 times (rollout_reuse)")
    prompts_from: Literal[TRAINING_DATA] = Field("curated", description="the dataset the round's prompts are drawn from")
    sampling: SamplingConfig = Field(SamplingConfig(n=2, temperature=1.0, max_new_tokens=96), description="how the student "
                                     "samples (GKD: T = 1); its seed, with the round number, draws the round's prompts and "
                                     "seeds its samples (derived_seed)")


class TeacherFeedbackConfig(SignalSettings, dg.Config):
    """What of the teacher's distribution is stored on every rollout token, and who the teacher is."""

    teacher: str = Field("teacher_model", description="who scores the round's samples: 'teacher_model'; one of its teachers, "
                         "'teacher_model[<teacher id>]'; 'round_robin', each prompt's samples by one of its teachers (by prompt_id, "
                         "as teacher_labeled's routing); 'mixture', the mixture of the `mixture` teachers; 'parent', the round's "
                         "parent itself (self-distillation); or an earlier checkpoint, 'offline_student' or "
                         "'student_checkpoint[r001]'. The rows and the lineage name it")
    mixture: dict[str, float] = Field({}, description="teacher 'mixture': teacher_model's teachers (id → weight) that each score "
                                      "every sample; the rows store the mixture of their distributions over the union of their top-k")

    @model_validator(mode="after")
    def _mixture_with_its_teacher(self):
        if bool(self.mixture) != (self.teacher == "mixture"):
            raise ValueError("teacher 'mixture' takes its teachers and weights from `mixture`, and only it does: set both or neither")
        TeacherPanel(scoring="every", mixture=self.mixture)  # its weights' checks
        return self


class OnlineRolloutsConfig(StudentRolloutsConfig, SignalSettings):
    """An online round's sampling (as student_rollouts') and the teacher's signal on it (as teacher_feedback's)."""

    sampling: SamplingConfig = config_field(OnlineSettings)
    pipelined: bool = Field(False, description="sample and score the next batch while the current one trains (staleness 1; "
                            "a second copy of the student's weights)")


class StudentCheckpointConfig(TrainingConfig):
    """GKD from the parent checkpoint: a share λ (`mix`) of the batches from this round's scored
    rollouts. A round trains shorter and gentler than offline_student, so these defaults differ."""

    mix: float = Field(0.5, ge=0, le=1, description="λ: share of batches from this round's rollouts; the rest from curated")
    steps: int = Field(150, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="gentle: at 1e-3 the demo's rounds lost up to 0.01 of exact match "
                                 "from a distilled student, at 3e-4 they held or gained")
    warmup_steps: int = Field(10, ge=0)
    online: bool = Field(
        False, description="GKD's Algorithm 1 inside the round: every on-policy step samples a fresh batch from the student "
        "as it is, the teacher scores it, and the batch is appended to online_feedback[r] with its policy_step and staleness "
        "(student_rollouts and teacher_feedback are then not needed). false: train on the stored teacher_feedback[r]"
    )
    online_rollouts: OnlineRolloutsConfig = Field(OnlineRolloutsConfig(),
                                                  description="online: how the student samples and what of the teacher is kept")
    keep: Literal["all", "rewarded", "judged"] = Field(
        "all", description="which of the round's scored samples it trains on: 'all'; 'rewarded', those the task's verifier "
        "accepted (reward ≥ min_reward): rejection-sampling fine-tuning with objective sft (the self round); 'judged', those "
        "the round's judgments score ≥ min_score (materialize round_judgments first)")
    min_reward: float = Field(1.0, description="keep 'rewarded': the least reward a sample needs to be kept")
    min_score: float = Field(0.5, description="keep 'judged': the least judged score (the default judgments, verifier 1 and "
                             "likelihood 0.1, score a right answer near 1 and a wrong one near 0)")

    @model_validator(mode="after")
    def _ranking_rounds_train_on_their_pairs(self):
        if OBJECTIVES[self.objective].takes & RANKING_KINDS and (self.mix or self.online):
            raise ValueError(f"objective {self.objective!r} makes a preference round, which trains on the round's pairs only: set "
                             "mix 0 and online false (kd_weight adds the teacher's divergence on the pairs' tokens)")
        if self.keep != "all" and (self.online or not self.mix):
            raise ValueError(f"keep {self.keep!r} filters the round's stored samples, and this round trains on none "
                             f"(online {self.online}, mix {self.mix}): set online false and mix > 0, or keep 'all'")
        return self


class JudgeConfig(JudgeSettings, dg.Config):
    """The teacher as an LLM judge (training/feedback/judge.py), as Dagster config."""

    sampling: SamplingConfig = config_field(JudgeSettings)


class CorrectionConfig(CorrectionSettings, dg.Config):
    """How the teacher corrects a rejected response (training/feedback/judgments.py), as Dagster config."""

    sampling: SamplingConfig = config_field(CorrectionSettings)


class RoundJudgmentsConfig(JudgmentSettings, dg.Config):
    """Which judges assess each candidate and how their scores combine (training/feedback/judgments.py)."""

    judged_by: str = Field("teacher_model", description="which teacher judges: 'teacher_model', or one of its teachers, "
                           "'teacher_model[<teacher id>]' (the likelihood judge reads the stored signal of whoever scored it)")
    judge: JudgeConfig = Field(JudgeConfig(), description="the LLM judge's rubric, mode and sampling")
    correction: CorrectionConfig = Field(CorrectionConfig(), description="how corrections are cut and written")


class JudgmentsConfig(RoundJudgmentsConfig):
    teacher_responses_from: Literal[(*TRAINING_DATA, "none")] = Field(
        "curated", description="the teacher's own responses judged beside student_samples, for the same prompts; 'none': students only")


class PairsConfig(PairPolicy, dg.Config):
    """How judged candidates become chosen/rejected pairs (training/feedback/pairs.py)."""


class PreferenceStudentConfig(TrainingConfig):
    """offline_student trained on the teacher's preferences: DPO on preference_pairs (dDPO), or RRHF on
    teacher_judgments' ranked lists. Gentle and short, as a round."""

    objective: Literal[tuple(name for name, o in OBJECTIVES.items() if o.takes & RANKING_KINDS)] = Field(
        "dpo", description="'dpo' on preference_pairs, or 'rrhf' on teacher_judgments' ranked lists")
    steps: int = Field(60, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-5, gt=0, description="DPO moves whole-sequence log-probs: small rates (the embedded "
                                 "student loses 0.49 exact match at 2e-4, keeps it at 1e-5: docs/benchmarks.md)")
    warmup_steps: int = Field(5, ge=0)

"""Run configuration of the assets, as Dagster `Config`: editable in the UI launchpad.

Every field has a default, so the embedded demo needs no configuration. Out-of-range values fail
when the run starts, before any model is loaded.
"""

import os
from typing import Literal, Optional

import dagster as dg
from pydantic import Field, model_validator

EMBEDDED = "embedded"
STUDENT_WARM_START_STEPS = 550  # lands the embedded student between 20% and 60% exact match


class ModelConfig(dg.Config):
    model: str = Field(
        EMBEDDED,
        description="'embedded' builds the tiny arithmetic model; anything else is a hub id or a local "
        "directory, loaded with from_pretrained and recorded, not trained",
    )
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) of `model`")
    trust_remote_code: bool = Field(False, description="let from_pretrained run code shipped with the model")
    seed: int = 0


class TeacherModelConfig(ModelConfig):
    train_steps: int = Field(700, ge=1, description="SFT steps for the embedded teacher")
    batch_size: int = Field(80, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    eval_problems: int = Field(500, ge=1, description="eval-split problems for the exact-match figure")
    instruction_share: float = Field(
        0.2, ge=0, lt=1, description="share of each batch in the instruction language (writing new problems)"
    )


class StudentModelConfig(TeacherModelConfig):
    train_steps: int = Field(STUDENT_WARM_START_STEPS, ge=1, description="SFT warm-start steps for the embedded student")
    batch_size: int = Field(64, ge=1)
    instruction_share: float = Field(0.0, ge=0, lt=1, description="the student only solves")


class PromptSourceConfig(dg.Config):
    source: Literal["embedded", "files", "datasets"] = Field(
        "embedded",
        description="'embedded': the arithmetic generator; 'files': local jsonl/json/parquet/csv `files`; "
        "'datasets': datasets.load_dataset(`dataset`, `subset`, split=`split`)",
    )
    num_prompts: int = Field(512, ge=1, description="prompts to generate (embedded) or the most to keep")
    seed: int = 0
    files: list[str] = Field([], description="local files for source 'files' (one format)")
    dataset: Optional[str] = Field(None, description="dataset path or hub id for source 'datasets'")
    subset: Optional[str] = Field(None, description="dataset configuration name")
    split: str = "train"
    prompt_column: str = "prompt"
    answer_column: Optional[str] = Field(None, description="column with the reference answer, if any")

    @model_validator(mode="after")
    def _source_has_input(self):
        if self.source == "files" and not self.files:
            raise ValueError("source 'files' needs `files`: a list of local .jsonl/.json/.parquet/.csv paths")
        if self.source == "datasets" and not self.dataset:
            raise ValueError("source 'datasets' needs `dataset`: a path or hub id for datasets.load_dataset")
        return self


class SeedPromptsConfig(PromptSourceConfig):
    """The inputs the teacher labels; embedded: the arithmetic train split."""

    num_prompts: int = Field(2048, ge=1, description="prompts to generate (embedded) or the most to keep")


class EvalSetConfig(PromptSourceConfig):
    """Held-out problems; embedded: the arithmetic eval split, disjoint from train by construction."""

    num_prompts: int = Field(500, ge=1, description="problems to generate (embedded) or the most to keep")
    split: str = "test"


class LabelingConfig(dg.Config):
    """How the teacher answers prompts and what of its distribution is stored."""

    n: int = Field(1, ge=1, description="responses per prompt")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of the responses; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1, description="the longest embedded solution is ~75 tokens")
    seed: int = 0
    k: int = Field(20, ge=1, description="top-k teacher logprobs stored per response token")
    signal_temperature: float = Field(
        1.0, gt=0, description="temperature of the stored distribution, log_softmax(logits / T); 1 is raw"
    )
    logprob_dtype: Literal["float32", "float16"] = "float32"
    overlong_prompts: Literal["drop", "truncate"] = Field(
        "drop", description="prompts that leave no room for max_new_tokens: drop them, or keep their last tokens"
    )

    @model_validator(mode="after")
    def _samples_differ(self):
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} greedy responses would all be the same: set temperature > 0 or n = 1")
        return self


class TeacherLabeledConfig(LabelingConfig):
    """The teacher answers every seed prompt."""


class WritingConfig(LabelingConfig):
    """How the teacher writes new inputs; they are then labeled like seed prompts."""

    templates: Literal["embedded", "self_instruct"] = Field(
        "embedded",
        description="'embedded': the tiny teacher's instruction language; 'self_instruct': Self-Instruct, "
        "Evol-Instruct and UltraChat-style prompts for instruction-following teachers",
    )
    write_temperature: float = Field(1.0, ge=0, description="sampling temperature of the written inputs")
    write_max_new_tokens: int = Field(24, ge=1, description="the longest input the teacher may write")


class ExpandedConfig(WritingConfig):
    num_expanded: int = Field(512, ge=0, description="Self-Instruct requests, each with `demonstrations` seeds")
    demonstrations: int = Field(3, ge=1)
    num_evolved: int = Field(256, ge=0, description="seeds rewritten into a harder variant (Evol-Instruct)")
    expand_template: Optional[str] = Field(None, description="overrides the preset; has {demonstrations} and {next_index}")
    demonstration_template: Optional[str] = Field(None, description="overrides the preset; has {index} and {prompt}")
    evolve_template: Optional[str] = Field(None, description="overrides the preset; has {seed}")


class SynthesizedConfig(WritingConfig):
    num_synthesized: int = Field(512, ge=1, description="inputs to write from topics")
    topics: dict[str, float] = Field(
        {}, description="topic or skill → weight; empty: for the embedded task, every (op, digits, carries) equally"
    )
    synthesize_template: Optional[str] = Field(None, description="overrides the preset; has {topic}")

    @model_validator(mode="after")
    def _weights_positive(self):
        bad = {t: w for t, w in self.topics.items() if not w > 0}
        if bad:
            raise ValueError(f"topic weights must be > 0: {bad}")
        return self


class CuratedConfig(dg.Config):
    """Filters over labeled, expanded, evolved and synthesized rows, then a selection (see training/curation.py)."""

    min_prompt_chars: int = Field(1, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)
    min_response_tokens: int = Field(1, ge=0)
    max_response_tokens: int = Field(4096, ge=1)
    drop_unfinished: bool = Field(True, description="drop responses that hit max_new_tokens before <eos>")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=0.98, description="MinHash Jaccard on character shingles")
    shingle_chars: int = Field(5, ge=1)
    decontamination_ngram: int = Field(8, ge=1, description="word n-gram shared with the eval split")
    use_verifier: bool = Field(True, description="drop teacher answers the task verifier rejects")
    min_mean_logprob: float = Field(-1.0, le=0, description="teacher confidence: mean token logprob of the response")
    max_mean_entropy: float = Field(1.5, ge=0, description="teacher uncertainty: mean top-k entropy, nats")
    target_size: Optional[int] = Field(None, ge=1, description="select this many rows by quality score; empty: keep all")
    selection_similarity: float = Field(0.9, gt=0, le=0.98, description="a candidate this similar to a selected prompt is skipped")


class TrainingConfig(dg.Config):
    """The divergence to the stored teacher signal and the optimizer, shared by offline and round training."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_reverse_kl"] = "jsd"
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight: 0 is forward KL, 1 reverse KL")
    alpha: float = Field(0.1, gt=0, lt=1, description="skew of the skew KLs")
    tail_policy: Literal["renormalize", "bucket"] = "renormalize"
    temperature: float = Field(1.0, gt=0, description="loss temperature τ for teacher and student")
    nll_weight: float = Field(0.0, ge=0, description="weight of NLL on the teacher's tokens, added to the divergence")
    k: Optional[int] = Field(None, ge=1, description="train on the first k of the stored top-k; empty: all")
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    seed: int = 0

    def distill_settings(self) -> dict:
        """These settings as `DistillConfig` fields (`learning_rate` is its `lr`)."""
        return {**self.model_dump(exclude={"learning_rate"}), "lr": self.learning_rate}


class OfflineStudentConfig(TrainingConfig):
    objective: Literal["sft", "supervised_kd"] = Field(
        "supervised_kd", description="'sft': teacher tokens as hard targets (SeqKD); 'supervised_kd': a divergence to the stored top-k"
    )


class EvalsConfig(dg.Config):
    seed: int = Field(0, description="seed of the sampled exact match and the student samples")


class StudentRolloutsConfig(dg.Config):
    """The current student's own samples on prompts drawn from the training data, seeded by round."""

    num_prompts: int = Field(768, ge=1, description="distinct prompts drawn from curated (else teacher_labeled) per round; with n, enough that student_checkpoint draws each rollout about 1.5 times (rollout_reuse)")
    n: int = Field(2, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; GKD samples at 1")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    seed: int = Field(0, description="combined with the round number: each round draws other prompts and samples")


class TeacherFeedbackConfig(dg.Config):
    k: int = Field(20, ge=1, description="top-k teacher logprobs stored per rollout token")
    signal_temperature: float = Field(1.0, gt=0, description="temperature of the stored distributions; 1 is raw")
    logprob_dtype: Literal["float32", "float16"] = "float32"


class StudentCheckpointConfig(TrainingConfig):
    """GKD from the parent checkpoint: a share λ of the batches from this round's scored rollouts."""

    mix: float = Field(0.5, ge=0, le=1, description="λ: share of batches from this round's rollouts; the rest from curated")
    steps: int = Field(150, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)


class RoundPolicy(dg.Config):
    """When the sensor (or the schedule) opens the next round. Read from the environment at every
    evaluation: DISTILL_MAX_ROUNDS, DISTILL_MIN_IMPROVEMENT, DISTILL_ROUNDS_CRON (the schedule's cron,
    read when the code location loads)."""

    max_rounds: int = Field(5, ge=1, description="no round beyond this many")
    min_improvement: float = Field(
        0.0, description="stop when the last round's greedy exact-match gain over its parent is below this"
    )
    cron: str = Field("0 */6 * * *", description="the round schedule's cron (the schedule is off by default)")

    @classmethod
    def from_environment(cls) -> "RoundPolicy":
        values = {"max_rounds": "DISTILL_MAX_ROUNDS", "min_improvement": "DISTILL_MIN_IMPROVEMENT", "cron": "DISTILL_ROUNDS_CRON"}
        try:
            return cls(**{field: os.environ[name] for field, name in values.items() if os.environ.get(name)})
        except ValueError as error:
            raise ValueError(f"bad round policy in the environment ({', '.join(values.values())}): {error}") from None

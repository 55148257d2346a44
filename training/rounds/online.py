"""Online rounds, GKD's Algorithm 1 inside one training: every on-policy step samples a fresh batch
from the student as it is at that step (T = 1, no gradient through sampling), the teacher scores it,
and the scored batch is appended to the round's dataset before the step trains on it, so that every
token the student trained on stays queryable with the policy that sampled it:

    policy_step      optimizer updates the student had had when it sampled the batch
    trained_at_step  the step that trained on it
    staleness        trained_at_step − policy_step   (0, or 1 when pipelined; a stored round's rollouts
                     are sampled by the parent before step 0, so their staleness is the step that draws them)

Pipelined (`pipelined: true`), the next batch is sampled and scored in a background thread by a copy
of the student (the sampler) while the current step trains: the sampler takes the student's weights
at every on-policy step, so a batch trained at step s was sampled by the policy of the previous
on-policy step (staleness 1 at λ = 1). It costs a second copy of the student's weights.

The student's logprobs of its tokens come from sampling (no second student pass); the teacher is
in this process (transformers, on the training device) or behind OpenAI-compatible servers (vLLM's
api_server), as `OnlineSettings.teacher_base_urls` says.
"""

import copy
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from training.data.rollouts import feedback_table, sample_rollouts, to_teacher_tokens
from training.engines.base import Engine
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.models.checkpoints import end_of_turn_ids
from training.schema.cards import ModelCard
from training.schema.signal import SignalSettings
from training.schema.tables import with_constants
from training.tasks import get_task


class OnlineSettings(SignalSettings):
    """What an online round needs besides the training settings: the prompts to sample on, where the
    scored batches go, the teacher, and how the student samples (GKD: T = 1)."""

    prompts: str = Field(description="Parquet file of the round's prompts (prompt_id, prompt, messages, system_prompt, answer)")
    batches: str = Field(description="directory the scored batches are written to, one Parquet file per on-policy step")
    teacher: str = Field(description="the teacher's checkpoint directory or hub id")
    teacher_card: ModelCard = Field(description="the teacher's model card: its name and weights_hash are stamped on every row")
    task: str = Field("none", description="the task that verifies rewards (training/tasks)")
    sampling: Sampling = Field(Sampling(n=1, temperature=1.0, max_new_tokens=96),
                               description="how the student samples (GKD: T = 1); each step with the seed "
                               "derived_seed(seed, round_number, step)")
    round_number: int = Field(0, ge=0, description="the round's number, in every step's seed")
    identity: dict = Field(description="stamped on every row: student, student_weights_hash (part of sample_id), round, run")
    teacher_base_urls: list[str] = Field([], description="empty: the teacher runs here with transformers; else "
                                         "OpenAI-compatible servers that serve it (e.g. vLLM's api_server)")
    teacher_served_model_name: str = Field("", description="the name the servers serve the teacher under; empty: `teacher`")
    teacher_api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="the environment variable with the servers' API key")
    pipelined: bool = Field(False, description="sample and score the next batch while the current one trains "
                            "(a copy of the student samples it: staleness 1, twice the student's weights in memory)")
    revision: Optional[str] = None
    trust_remote_code: bool = False

    def teacher_engine(self, device) -> Engine:
        if not self.teacher_base_urls:
            return HFEngine.load(self.teacher, self.revision, self.trust_remote_code, device=str(device))
        from training.engines.openai import OpenAIEngine

        api_key = os.environ.get(self.teacher_api_key_env) if self.teacher_api_key_env else None
        return OpenAIEngine.for_checkpoint(self.teacher, self.teacher_base_urls, self.teacher_served_model_name, api_key,
                                           self.revision, self.trust_remote_code)


class OnlineRollouts:
    """Called with the step, returns that step's on-policy batch: `batch_size` fresh samples of the
    live `model` (or, pipelined, of its copy one on-policy step behind) on the next prompts (in the
    round's order, cycling), scored by `teacher` and written to <batches>/step-<step>.parquet (whole
    or not at all; a resumed training writes its steps again)."""

    def __init__(self, model, tokenizer, teacher: Engine, settings: OnlineSettings, batch_size: int):
        self.model, self.tokenizer, self.teacher, self.settings = model, tokenizer, teacher, settings
        self.sampler = copy.deepcopy(model).eval() if settings.pipelined else None
        self.background = ThreadPoolExecutor(max_workers=1) if settings.pipelined else None
        self.next_batch: Future | None = None
        self.prompts = pq.read_table(settings.prompts)
        if self.prompts.num_rows == 0:
            raise ValueError(f"the online round has no prompts to sample on ({settings.prompts} is empty)")
        self.batch_size = batch_size
        self.per_batch = math.ceil(batch_size / settings.sampling.n)
        self.task = get_task(settings.task)
        self.directory = Path(settings.batches)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.to_teacher = to_teacher_tokens(tokenizer, end_of_turn_ids(model.generation_config, tokenizer), teacher)  # None: one tokenizer

    def forget_from(self, step: int) -> None:
        """Removes the batches of `step` and later: a killed training's, sampled again when it resumes at `step`."""
        for path in self.directory.glob("step-*.parquet"):
            if int(path.stem.removeprefix("step-")) >= step:
                path.unlink()

    def scored_batch(self, model, slot: int, policy_step: int) -> pa.Table:
        """`model`'s samples on the prompts and seed of `slot`, scored by the teacher, stamped with `policy_step`."""
        positions = pa.array([(slot * self.per_batch + i) % self.prompts.num_rows for i in range(self.per_batch)])
        student = HFEngine(model, self.tokenizer, batch_size=self.per_batch)  # eval mode; generate takes no gradient
        identity = {**self.settings.identity, "policy_step": pa.scalar(policy_step, pa.int32())}
        sampling = self.settings.sampling.derived(self.settings.round_number, slot)
        rollouts, _ = sample_rollouts(student, self.prompts.take(positions), sampling, identity)
        batch = rollouts.slice(0, self.batch_size)
        return feedback_table(self.teacher, None, batch, self.settings, self.settings.teacher_card, self.task, self.to_teacher)[0]

    def __call__(self, step: int) -> pa.Table:
        if self.sampler is None:
            scored = self.scored_batch(self.model, step, step)  # the student as it is now
        else:
            scored = self.next_batch.result() if self.next_batch is not None else self.scored_batch(self.model, step, step)
            self.sampler.load_state_dict(self.model.state_dict())  # the policy of this step, before its update
            self.next_batch = self.background.submit(self.scored_batch, self.sampler, step + 1, step)
        staleness = step - pc.min(scored["policy_step"]).as_py()
        scored = with_constants(scored, trained_at_step=pa.scalar(step, pa.int32()), staleness=pa.scalar(staleness, pa.int32()))
        partial = self.directory / f".step-{step:06d}.parquet.partial"
        pq.write_table(scored, partial, compression="zstd")
        os.replace(partial, self.directory / f"step-{step:06d}.parquet")
        return scored

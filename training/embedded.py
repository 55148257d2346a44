"""Training the embedded models from scratch on the arithmetic task's train split: the teacher to
the target, and the student's short SFT warm start (GKD's students all start from SFT)."""

import random
import time

import pyarrow as pa

from training.distill import TrainingSettings, train_student
from training.evaluate import exact_match
from training.models import Architecture, build_embedded
from training.tasks.arithmetic import ArithmeticConfig, problems
from training.tasks.arithmetic_instructions import instruction_examples
from training.tasks.arithmetic_task import ArithmeticTask

TARGET_EXACT_MATCH = 0.95  # greedy exact match the embedded teacher must reach on the eval split


def token_rows(tokenizer, prompts: list[str], completions: list[str]) -> pa.Table:
    """prompt_token_ids (with <bos>) and completion_token_ids (ending in <eos>) of text pairs."""
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    completion_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    return pa.table({
        "prompt_token_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
        "completion_token_ids": pa.array(completion_ids, pa.list_(pa.int32())),
    })


def train_embedded(
    architecture: Architecture,
    settings: TrainingSettings,
    eval_problems: int = 500,
    task: ArithmeticConfig = ArithmeticConfig(),
    instruction_share: float = 0.0,
    on_step=None,
):
    """A fresh model trained with SFT (`settings.objective` must be 'sft') on `steps × batch_size`
    train examples drawn i.i.d.: worked solutions, and an `instruction_share` of every batch in the
    instruction language (the teacher writes new problems for expansion and synthesis; see
    `arithmetic_instructions`).

    Returns (model, tokenizer, curve, eval exact match, seconds).
    """
    if settings.objective != "sft":
        raise ValueError("the embedded models are trained from scratch on solutions: use objective 'sft'")
    started = time.perf_counter()
    model, tokenizer = build_embedded(architecture, settings.seed)
    per_batch = round(settings.batch_size * instruction_share)
    solving = settings.batch_size - per_batch
    train = problems("train", settings.steps * solving, settings.seed, task, distinct=False)
    instructions = instruction_examples(random.Random(f"instructions/{settings.seed}"), settings.steps * per_batch, task)

    def batch(step: int) -> pa.Table:
        solved = train[step * solving : (step + 1) * solving]
        written = instructions[step * per_batch : (step + 1) * per_batch]
        return token_rows(tokenizer, [p.prompt for p in solved] + [i for i, _ in written], [p.solution for p in solved] + [w for _, w in written])

    curve = train_student(model, tokenizer, map(batch, range(settings.steps)), settings, on_step)
    arithmetic = ArithmeticTask(task)
    accuracy = exact_match(model, tokenizer, arithmetic.prompts("eval", eval_problems, settings.seed), arithmetic)
    return model, tokenizer, curve, accuracy, time.perf_counter() - started

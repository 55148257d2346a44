"""Training the embedded models from scratch on the arithmetic task's train split: the teacher to
the target, and the student's short SFT warm start (GKD's students all start from SFT)."""

import dataclasses
import random
import time

import pyarrow as pa

from training.evals.evaluate import exact_match
from training.models.checkpoints import Architecture, build_embedded
from training.tasks.arithmetic import ArithmeticConfig, problems
from training.tasks.arithmetic_instructions import instruction_examples
from training.tasks.arithmetic_task import ArithmeticTask
from training.trainer.loop import Reporter, train_student
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for

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
    correction_share: float = 0.0,
    varied_steps: bool = False,
    reporter: Reporter | None = None,
    tokenizer=None,
):
    """A fresh model trained with SFT (`settings.objective` must be 'sft') on `steps × batch_size`
    train examples drawn i.i.d. Every batch holds:
      - worked solutions: the reference ones, or with `varied_steps` each step written short or long
        at random (`Problem.written`), so the model's distribution is not one-hot where a step begins;
      - a `correction_share` of corrected solutions: a prefix with one wrong step (a student's
        mistake, in the prompt: no loss on it) and the true continuation (`Problem.corrected`), so
        that the model, as a teacher, has something to say about a student's wrong prefix;
      - an `instruction_share` in the instruction language (the teacher writes new problems for
        expansion and synthesis; see `arithmetic_instructions`).

    `tokenizer`: another than the character tokenizer (a student of another tokenizer than its teacher's).
    Returns (model, tokenizer, curve, eval exact match, seconds).
    """
    if settings.objective != "sft":
        raise ValueError("the embedded models are trained from scratch on solutions: use objective 'sft'")
    started = time.perf_counter()
    architecture = dataclasses.replace(architecture, max_position_embeddings=task.context_length)
    model, tokenizer = build_embedded(architecture, settings.seed, tokenizer)
    per_batch = round(settings.batch_size * instruction_share)
    solving = settings.batch_size - per_batch
    train = problems("train", settings.steps * solving, settings.seed, task, distinct=False)
    instructions = instruction_examples(random.Random(f"instructions/{settings.seed}"), settings.steps * per_batch, task)
    writing = random.Random(f"solutions/{settings.seed}")
    pairs = [
        problem.corrected(writing) if writing.random() < correction_share
        else ("", problem.written(writing) if varied_steps else problem.solution)
        for problem in train
    ]

    def batch(step: int) -> pa.Table:
        solved = range(step * solving, (step + 1) * solving)
        written = instructions[step * per_batch : (step + 1) * per_batch]
        return token_rows(tokenizer, [train[i].prompt + pairs[i][0] for i in solved] + [i for i, _ in written],
                          [pairs[i][1] for i in solved] + [w for _, w in written])

    curve = train_student(model, tokenizer, batches_for(model, tokenizer, settings, batch), settings, reporter)
    arithmetic = ArithmeticTask(task)
    accuracy = exact_match(model, tokenizer, arithmetic.prompts("eval", eval_problems, settings.seed), arithmetic)
    return model, tokenizer, curve, accuracy, time.perf_counter() - started

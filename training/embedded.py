"""Training the embedded models from scratch on the arithmetic task's train split: the teacher to
the target, and the student's short SFT warm start (GKD's students all start from SFT)."""

import random
import time

from training.evaluate import exact_match
from training.models import Architecture, build_embedded
from training.sft import SFTConfig, train_sft
from training.tasks.arithmetic import ArithmeticConfig, problems
from training.tasks.arithmetic_instructions import instruction_examples

TARGET_EXACT_MATCH = 0.95  # greedy exact match the embedded teacher must reach on the eval split


def train_embedded(
    architecture: Architecture,
    sft: SFTConfig,
    eval_problems: int = 500,
    task: ArithmeticConfig = ArithmeticConfig(),
    instruction_share: float = 0.0,
    on_step=None,
):
    """A fresh model trained on `sft.steps × sft.batch_size` train examples drawn i.i.d.: worked
    solutions, and an `instruction_share` of every batch in the instruction language (the teacher
    writes new problems for expansion and synthesis; see `arithmetic_instructions`).

    Returns (model, tokenizer, curve, eval exact match, seconds).
    """
    started = time.perf_counter()
    model, tokenizer = build_embedded(architecture, sft.seed)
    per_batch = round(sft.batch_size * instruction_share)
    solving = sft.batch_size - per_batch
    train = problems("train", sft.steps * solving, sft.seed, task, distinct=False)
    instructions = instruction_examples(random.Random(f"instructions/{sft.seed}"), sft.steps * per_batch, task)

    def next_batch(step: int):
        batch = train[step * solving : (step + 1) * solving]
        written = instructions[step * per_batch : (step + 1) * per_batch]
        return [p.prompt for p in batch] + [i for i, _ in written], [p.solution for p in batch] + [w for _, w in written]

    curve = train_sft(model, tokenizer, next_batch, sft, on_step)
    accuracy = exact_match(model, tokenizer, problems("eval", eval_problems, sft.seed, task))
    return model, tokenizer, curve, accuracy, time.perf_counter() - started

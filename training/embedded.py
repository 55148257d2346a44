"""Training the embedded models from scratch on the arithmetic task's train split: the teacher to
the target, and the student's short SFT warm start (GKD's students all start from SFT)."""

import time

from training.evaluate import exact_match
from training.models import Architecture, build_embedded
from training.sft import SFTConfig, train_sft
from training.tasks.arithmetic import ArithmeticConfig, problems

TARGET_EXACT_MATCH = 0.95  # greedy exact match the embedded teacher must reach on the eval split


def train_embedded(
    architecture: Architecture,
    sft: SFTConfig,
    eval_problems: int = 500,
    task: ArithmeticConfig = ArithmeticConfig(),
    on_step=None,
):
    """A fresh model trained on `sft.steps × sft.batch_size` train problems drawn i.i.d.

    Returns (model, tokenizer, curve, eval exact match, seconds).
    """
    started = time.perf_counter()
    model, tokenizer = build_embedded(architecture, sft.seed)
    train = problems("train", sft.steps * sft.batch_size, sft.seed, task, distinct=False)

    def next_batch(step: int):
        batch = train[step * sft.batch_size : (step + 1) * sft.batch_size]
        return [p.prompt for p in batch], [p.solution for p in batch]

    curve = train_sft(model, tokenizer, next_batch, sft, on_step)
    accuracy = exact_match(model, tokenizer, problems("eval", eval_problems, sft.seed, task))
    return model, tokenizer, curve, accuracy, time.perf_counter() - started

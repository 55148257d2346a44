"""The embedded teacher as `teacher_model` trains it (corrections after a wrong step, reference-style
steps), against reference solutions only and against corrections with varied steps (the previous
default): what each has to teach a student. Prints, per recipe, over eval problems:

  greedy exact match                 the share of eval problems solved (target ≥ 0.95)
  corrected-prefix exact match       greedy continuation after a prefix with one wrong step (a
                                     student's mistake): does the teacher recover the true answer?
  entropy, tail mass, off-argmax     on the teacher's own samples (T = 1): mean token entropy (nats,
                                     full distribution), mass beyond the top-20, 1 − p(argmax)

    .venv/bin/python bench/teacher.py [--steps 900] [--correction-share 0.25] [--eval-problems 500] [--recipes default]
"""

import argparse
import random

import pyarrow as pa
import torch

from assets.config import TeacherModelConfig
from assets.models import EMBEDDED_WARMUP_STEPS
from training.embedded.pair import train_embedded
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.evals.evaluate import completion_logprobs
from training.models.checkpoints import TEACHER_ARCHITECTURE
from training.schema.signal import tail_mass
from training.tasks.arithmetic import problems
from training.tasks.arithmetic_task import ArithmeticTask
from training.trainer.settings import TrainingSettings

TASK = ArithmeticTask()


def corrected_prefix_exact_match(engine: HFEngine, n: int, task: ArithmeticTask = TASK) -> float:
    """Greedy continuations of eval problems after a prefix with one wrong step; the share whose answer is true."""
    rng = random.Random("bench/corrected")
    chosen = problems("eval", n, 0, task.config)
    prompts = [p.prompt + p.corrected(rng)[0] for p in chosen]
    ids = engine.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    generations = engine.generate(ids, Sampling(temperature=0.0, max_new_tokens=task.completion_tokens))
    correct = task.verify(pa.array([g.text for g in generations]), pa.array([str(p.answer) for p in chosen]))
    return sum(correct.to_pylist()) / n


@torch.no_grad()
def distribution_figures(engine: HFEngine, prompt_ids: list[list[int]], samples: list[list[int]], k: int = 20) -> dict[str, float]:
    """Means over the completion tokens of `samples` (of `prompt_ids`) of the teacher's entropy, its
    tail mass beyond the top-k, 1 − p(argmax), and the share of sampled tokens that are not its argmax."""
    logprobs, targets = completion_logprobs(engine.model, prompt_ids, samples, engine.tokenizer.pad_token_id)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return {
        "entropy": entropy.mean().item(),
        "tail_mass": tail_mass(logprobs.topk(k, dim=-1).values).mean().item(),
        "off_argmax": (1 - logprobs.max(-1).values.exp()).mean().item(),
        "not_argmax": (logprobs.argmax(-1) != targets).float().mean().item(),
    }


def main() -> None:
    config = TeacherModelConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=config.train_steps)
    parser.add_argument("--correction-share", type=float, default=config.correction_share)
    parser.add_argument("--eval-problems", type=int, default=500)
    parser.add_argument("--recipes", default="", help="comma-separated substrings of recipe names to run (default: all)")
    args = parser.parse_args()
    settings = TrainingSettings(objective="sft", steps=args.steps, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                                learning_rate=config.learning_rate, warmup_steps=EMBEDDED_WARMUP_STEPS, seed=config.seed)
    recipes = {
        "reference solutions": {"correction_share": 0.0, "varied_steps": False},
        f"corrections {args.correction_share}, varied steps (the previous default)": {"correction_share": args.correction_share,
                                                                                      "varied_steps": True},
        f"corrections {args.correction_share} (the default)": {"correction_share": args.correction_share, "varied_steps": False},
    }
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps of {config.batch_size}, {args.eval_problems} eval problems\n")
    print("| recipe | train s | greedy EM | corrected-prefix EM | entropy (nats) | tail mass (top-20) | 1 − p(argmax) |")
    print("|---|---|---|---|---|---|---|")
    for name, recipe in recipes.items():
        if args.recipes and not any(part in name for part in args.recipes.split(",")):
            continue
        model, tokenizer, _, accuracy, seconds = train_embedded(
            TEACHER_ARCHITECTURE, settings, args.eval_problems, instruction_share=config.instruction_share, **recipe
        )
        engine = HFEngine(model, tokenizer, batch_size=256)
        corrected = corrected_prefix_exact_match(engine, args.eval_problems)
        prompts = TASK.prompts("eval", args.eval_problems, 0)["prompt"].to_pylist()
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        own = [g.completion_ids for g in engine.generate(ids, Sampling(temperature=1.0, max_new_tokens=96, seed=0))]
        figures = distribution_figures(engine, ids, own)
        print(f"| {name} | {seconds:.0f} | {accuracy:.3f} | {corrected:.3f} | {figures['entropy']:.4f} | "
              f"{figures['tail_mass']:.1e} | {figures['off_argmax']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

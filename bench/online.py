"""Online on-policy training speed: serial (sample, score, then train, in turn) against pipelined (the
next batch sampled and scored in a background thread by a copy of the student while the current one
trains: staleness 1), on the demo's models.

    .venv/bin/python bench/online.py [--steps 60] [--repeats 2] [--start offline_student]

λ = 1, JSD(0.5), batch 32, learning rate 1e-3, every batch fresh (GKD's Algorithm 1, as an online
round trains: training/rounds/online.py). The arms alternate, each from the same start. Prints completion
tokens/s, seconds per step, the staleness recorded, and greedy exact match after training. Needs
`make demo`'s teacher and students first.
"""

import argparse
import statistics
import tempfile

import torch
from quality import BATCH, TASK, K, online_rollouts

from storage.store import Store
from training.engines.hf import HFEngine
from training.evals.evaluate import evaluate
from training.models.checkpoints import load_model
from training.trainer.loop import train_student
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for


def run_arm(pipelined: bool, start: str, teacher: HFEngine, fixed, steps: int, seed: int, eval_problems, k: int = K,
            **settings) -> dict:
    """One on-policy training from `start`: the teacher's top-`k` per sampled token; `settings` override the
    training settings' defaults (e.g. tail_policy)."""
    student, tokenizer = load_model(start)
    config = TrainingSettings(divergence="jsd", beta=0.5, steps=steps, batch_size=BATCH,
                              learning_rate=1e-3, warmup_steps=10, seed=seed, mix=1.0, **settings)
    with tempfile.TemporaryDirectory() as directory:
        sampler = online_rollouts(student, tokenizer, teacher, seed, steps, directory, pipelined, k=k)
        curve = train_student(student, tokenizer, batches_for(student, tokenizer, config, fixed, sampler), config)
    tokens, seconds = sum(c["completion_tokens"] for c in curve), curve[-1]["seconds"]
    return {"tokens_per_second": tokens / seconds, "seconds_per_step": seconds / steps,
            "staleness": statistics.mean(c["staleness"] for c in curve),
            "greedy": evaluate(student, tokenizer, eval_problems, TASK, seed=seed)["greedy_exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating (seed = repeat)")
    parser.add_argument("--start", default="offline_student", help="the model card both arms start from")
    parser.add_argument("--eval-problems", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = Store()
    try:
        start, teacher = store.read_card(args.start).path, HFEngine.load(store.read_card("teacher").path, batch_size=128)
        fixed = store.read_dataset("teacher_labeled")
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: the benchmark starts from its teacher and students.")
    eval_problems = TASK.prompts("eval", args.eval_problems, 0)
    runs = {"serial": [], "pipelined": []}
    for repeat in range(args.repeats):
        for arm in runs:
            runs[arm].append(run_arm(arm == "pipelined", start, teacher, fixed, args.steps, repeat, eval_problems))
            print(arm, {k: round(v, 3) for k, v in runs[arm][-1].items()}, flush=True)
    print(f"\n{args.steps} steps × {BATCH}, λ = 1, JSD(0.5), from {args.start}, {args.repeats} run(s) per arm, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| arm | completion tokens/s | s/step | staleness | greedy EM |\n|---|---|---|---|---|")
    for arm, results in runs.items():
        mean = {key: statistics.mean(r[key] for r in results) for key in results[0]}
        print(f"| {arm} | {mean['tokens_per_second']:,.0f} | {mean['seconds_per_step']:.3f} | {mean['staleness']:.2f} "
              f"| {mean['greedy']:.3f} |")


if __name__ == "__main__":
    main()

"""Our on-policy GKD against TRL's GKDTrainer (TRL 1.16.0, `trl.experimental.gkd`) on the demo's models:

    .venv/bin/python bench/versus_trl.py [--steps 60] [--repeats 2] [--start offline_student] [--eval-problems 500]

Three arms from the same start, alternating (seed = repeat): trl (bench/trl_gkd_arm.py, run in
bench/.venv-trl, which this script makes or updates: trl==1.16.0, accelerate, datasets, and this
venv's torch and transformers), ours serial and ours pipelined (bench/online.py's `run_arm`). Shared:
λ = 1 (every batch sampled from the student, T = 1, top-k 0, top-p 1, at most 96 new tokens), JSD(0.5),
batch 32 with no accumulation, `--steps` optimizer steps, AdamW (β2 0.98, weight decay 0.01 on
matrices only), gradient clip 1, lr 1e-3 with 10 warm-up steps and cosine decay to 1e-4, CPU, fp32, 2
torch threads, and the same train prompts in the same order (quality.py's `train_prompts`, each
once). What differs: TRL's loss takes the teacher's full distribution, ours its stored top-20 and the
tail mass; TRL's warm-up starts at lr 0 (lr_t = peak·t/10, ours peak·(t+1)/10); TRL divides each
batch's summed loss by the token count of the dataset's completions (num_items_in_batch, counted
before the on-policy batch replaces them; the reference solutions are given there, about as long as
the samples), ours by the sampled tokens.

Measured: completion tokens/s and seconds per step over the training wall time only (TRL:
trainer.train(); ours: train_student's loop; both include sampling and the teacher's pass, neither
loading nor evaluation), and greedy exact match of each trained checkpoint on `--eval-problems` eval
problems (training.evals.evaluate). Completion tokens are the sampled tokens up to and including the first
<eos> (or all 96), the tokens each loss is taken over: TRL's on-policy labels ≠ -100, our batches'
completion_token_ids. The table gives each arm's tokens/s over all its runs (their tokens over their
seconds), and the means over runs of s/step and greedy EM. Needs `make demo`'s teacher and students first.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from online import run_arm
from quality import BATCH, TASK, train_prompts

from storage.store import Store
from training.engines.hf import HFEngine
from training.evals.evaluate import evaluate
from training.models.checkpoints import load_model
from training.tasks.arithmetic import parse_prompt

BENCH = Path(__file__).resolve().parent
TRL_PYTHON = BENCH / ".venv-trl" / "bin" / "python"


def trl_venv() -> None:
    """bench/.venv-trl with trl 1.16.0 and this venv's torch and transformers (pip is quick when they are there)."""
    if not TRL_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", BENCH / ".venv-trl"], check=True)
    subprocess.run([TRL_PYTHON, "-m", "pip", "install", "-qq", f"torch=={version('torch')}",
                    f"transformers=={version('transformers')}", "trl==1.16.0", "accelerate", "datasets"], check=True)


def trl_arm(start: str, teacher: str, steps: int, seed: int, eval_problems) -> dict:
    """TRL's GKDTrainer on the prompts our arm of this seed trains on; each user turn's answer is its
    reference solution (on-policy batches replace it; TRL only counts its tokens, see the docstring)."""
    with tempfile.TemporaryDirectory() as directory:
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": parse_prompt(p).solution}]}
                for p in train_prompts(steps * BATCH, seed)["prompt"].to_pylist()]
        Path(directory, "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = {"student": start, "teacher": teacher, "prompts": f"{directory}/prompts.jsonl", "output": f"{directory}/student",
                  "steps": steps, "batch_size": BATCH, "learning_rate": 1e-3, "warmup_steps": 10, "beta": 0.5,
                  "max_new_tokens": 96, "seed": seed}
        Path(directory, "config.json").write_text(json.dumps(config))
        subprocess.run([TRL_PYTHON, BENCH / "trl_gkd_arm.py", f"{directory}/config.json"], check=True,
                       env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        result = json.loads(Path(directory, "student", "result.json").read_text())
        student, tokenizer = load_model(f"{directory}/student")
    return {"tokens_per_second": result["completion_tokens"] / result["seconds"], "seconds_per_step": result["seconds"] / result["steps"],
            "greedy": evaluate(student, tokenizer, eval_problems, TASK, seed=0)["greedy_exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating (seed = repeat)")
    parser.add_argument("--start", default="offline_student", help="the model card every arm starts from")
    parser.add_argument("--eval-problems", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    trl_venv()
    store = Store()
    try:
        start, teacher_path = store.read_card(args.start).path, store.read_card("teacher").path
        fixed = store.read_dataset("teacher_labeled")  # run_arm's fixed data: never drawn at λ = 1
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: the benchmark starts from its teacher and students.")
    teacher = HFEngine.load(teacher_path, batch_size=128)
    eval_problems = TASK.prompts("eval", args.eval_problems, 0)
    runs = {"trl": [], "ours serial": [], "ours pipelined": []}
    for repeat in range(args.repeats):
        for arm in runs:
            if arm == "trl":
                runs[arm].append(trl_arm(start, teacher_path, args.steps, repeat, eval_problems))
            else:
                runs[arm].append(run_arm(arm == "ours pipelined", start, teacher, fixed, args.steps, repeat, eval_problems))
            print(arm, {k: round(v, 3) for k, v in runs[arm][-1].items()}, flush=True)
    print(f"\n{args.steps} steps × {BATCH}, λ = 1, JSD(0.5), from {args.start}, {args.repeats} run(s) per arm, "
          f"{args.eval_problems} eval problems, torch threads {torch.get_num_threads()}\n")
    print("| arm | completion tokens/s | s/step | greedy EM | tokens/s vs TRL |\n|---|---|---|---|---|")
    means = {arm: {"tokens_per_second": sum(r["tokens_per_second"] * r["seconds_per_step"] for r in results)
                   / sum(r["seconds_per_step"] for r in results),  # all its runs' tokens over all their seconds
                   "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in results),
                   "greedy": statistics.mean(r["greedy"] for r in results)} for arm, results in runs.items()}
    for arm, mean in means.items():
        print(f"| {arm} | {mean['tokens_per_second']:,.0f} | {mean['seconds_per_step']:.3f} | {mean['greedy']:.3f} | "
              f"{mean['tokens_per_second'] / means['trl']['tokens_per_second']:.2f}× |")


if __name__ == "__main__":
    main()

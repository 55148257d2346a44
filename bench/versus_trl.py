"""Our on-policy GKD against TRL 1.16.0's on-policy trainers on the demo's models, with an ablation of
what our loss keeps of the teacher and a profile of our step:

    .venv/bin/python bench/versus_trl.py [--arms A,B,...] [--steps 60] [--repeats 5] [--start student]
                                         [--eval-problems 1000] [--profile]

Arms, from the same start, alternating (seed = repeat):
  TRL DistillationTrainer  trl.DistillationTrainer, the maintained one (bench/trl_onpolicy_arm.py, run in
                           bench/.venv-trl, which this script makes or updates: trl==1.16.0, accelerate,
                           datasets and this venv's torch and transformers)
  TRL GKDTrainer           trl.experimental.gkd.GKDTrainer, which TRL says DistillationTrainer covers
  ours serial              bench/online.py's `run_arm`: sample, score, train, in turn
  ours pipelined           the next batch sampled and scored in a background thread (staleness 1)
  ours tail bucket         the ablation: the mass outside the teacher's top-20 as a (k+1)-th bucket
  ours k = vocabulary      the ablation: the teacher's whole distribution (k = its vocabulary), TRL's loss
Shared: λ = 1 (every batch sampled from the student, T = 1, top-k 0, top-p 1, at most 96 new tokens),
JSD(0.5) at τ = 1, batch 32 with no accumulation, `--steps` optimizer steps, AdamW (β2 0.98, weight decay
0.01), gradient clip 1, lr 1e-3 with 10 warm-up steps and cosine decay to 1e-4, CPU, fp32, 2 torch
threads, and the same train prompts in the same order (quality.py's `train_prompts`, each once). What
differs: TRL's losses take the teacher's full distribution, ours its top-20 and the tail (`renormalize`
unless the arm says otherwise); TRL's warm-up starts at lr 0 (lr_t = peak·t/10, ours peak·(t+1)/10);
GKDTrainer divides each batch's summed loss by the token count of the dataset's completions (the reference
solutions, counted before the on-policy batch replaces them), DistillationTrainer and ours by the sampled
tokens.

Measured: completion tokens/s and seconds per step over the training wall time only (TRL:
trainer.train(); ours: train_student's loop; both include sampling and the teacher's pass, neither
loading nor evaluation), and greedy exact match of each trained checkpoint on `--eval-problems` eval
problems (training.evals.evaluate). Completion tokens are the sampled tokens up to and including the
first <eos> (or all 96), the tokens each loss is taken over. The table gives each arm's tokens/s over all
its runs (their tokens over their seconds), the mean s/step, and greedy EM as mean ± standard error over
runs. --profile runs `ours serial` once more under cProfile and prints where its step's time goes.
Needs `make demo`'s teacher and students first.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
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
ARMS = {  # name: the TRL trainer, or run_arm's options ("vocabulary": the teacher's vocabulary size)
    "TRL DistillationTrainer": {"trainer": "distillation"},
    "TRL GKDTrainer": {"trainer": "gkd"},
    "ours serial": {},
    "ours pipelined": {"pipelined": True},
    "ours tail bucket": {"tail_policy": "bucket"},
    "ours k = vocabulary": {"k": "vocabulary"},
}
DEFAULT_ARMS = "TRL DistillationTrainer,TRL GKDTrainer,ours serial,ours pipelined"
PHASES = {  # the profile's phases: (file suffix, function) whose cumulative time is the phase's
    "student sampling (generate)": [("engines/hf.py", "generate")],
    "teacher pass (top-20 of each sampled token)": [("engines/hf.py", "score")],
    "rollout tables and their Parquet (Arrow)": [("rounds/online.py", "__call__")],  # less the two above
    "batch tensors from Arrow": [("trainer/losses.py", "sparse_batch")],
    "student forward": [("trainer/head.py", "student_forward")],
    "loss and its chunked gradient": [("trainer/losses.py", "sparse_kd_loss")],
    "backward": [("torch/_tensor.py", "backward")],
    "clip and AdamW": [("nn/utils/clip_grad.py", "clip_grad_norm_"), ("optim/adamw.py", "step")],
}


def trl_venv() -> None:
    """bench/.venv-trl with trl 1.16.0 and this venv's torch and transformers, made or updated unless it has them."""
    wanted = {"torch": version("torch"), "transformers": version("transformers"), "trl": "1.16.0"}
    if TRL_PYTHON.exists():
        found = subprocess.run([TRL_PYTHON, "-c", "import json; from importlib.metadata import version as v; "
                                f"print(json.dumps({{n: v(n) for n in {sorted(wanted)}}}))"], capture_output=True, text=True)
        if found.returncode == 0 and json.loads(found.stdout) == wanted:
            return
    else:
        subprocess.run([sys.executable, "-m", "venv", BENCH / ".venv-trl"], check=True)
    subprocess.run([TRL_PYTHON, "-m", "pip", "install", "-qq", *(f"{name}=={v}" for name, v in wanted.items()), "accelerate", "datasets"],
                   check=True)


def trl_arm(trainer: str, start: str, teacher: str, steps: int, seed: int, eval_problems) -> dict:
    """TRL's `trainer` on the prompts our arm of this seed trains on (GKDTrainer's user turns come with their
    reference solutions, which on-policy batches replace; it only counts their tokens, see the docstring)."""
    with tempfile.TemporaryDirectory() as directory:
        rows = [{"prompt": p, "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": parse_prompt(p).solution}]}
                for p in train_prompts(steps * BATCH, seed)["prompt"].to_pylist()]
        Path(directory, "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = {"trainer": trainer, "student": start, "teacher": teacher, "prompts": f"{directory}/prompts.jsonl",
                  "output": f"{directory}/student", "steps": steps, "batch_size": BATCH, "learning_rate": 1e-3,
                  "warmup_steps": 10, "beta": 0.5, "max_new_tokens": 96, "seed": seed}
        Path(directory, "config.json").write_text(json.dumps(config))
        subprocess.run([TRL_PYTHON, BENCH / "trl_onpolicy_arm.py", f"{directory}/config.json"], check=True,
                       env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        result = json.loads(Path(directory, "student", "result.json").read_text())
        student, tokenizer = load_model(f"{directory}/student")
    return {"tokens_per_second": result["completion_tokens"] / result["seconds"], "seconds_per_step": result["seconds"] / result["steps"],
            "greedy": evaluate(student, tokenizer, eval_problems, TASK, seed=0)["greedy_exact_match"]}


def profile_ours(start: str, teacher: HFEngine, fixed, steps: int, eval_problems) -> None:
    """`ours serial` once more under cProfile: each phase's cumulative seconds, per step and as a share of the loop."""
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.runcall(run_arm, False, start, teacher, fixed, steps, 0, eval_problems[:1])
    whole = time.perf_counter() - began
    cumulative = {}
    for (path, _, function), (_, _, _, seconds, _) in pstats.Stats(profiler).stats.items():
        key = (path.replace("\\", "/"), function)
        cumulative[key] = cumulative.get(key, 0.0) + seconds
    def phase(parts):
        return sum(s for (path, function), s in cumulative.items() for suffix, name in parts if path.endswith(suffix) and function == name)
    loop = phase([("trainer/loop.py", "train_student")])
    seconds = {name: phase(parts) for name, parts in PHASES.items()}
    seconds["rollout tables and their Parquet (Arrow)"] -= seconds["student sampling (generate)"] + seconds[
        "teacher pass (top-20 of each sampled token)"]
    seconds["the rest of the loop"] = loop - sum(seconds.values())
    print(f"\nours serial under cProfile, {steps} steps: training loop {loop:.1f} s ({loop / steps:.3f} s/step; "
          f"{whole:.1f} s with loading and one eval problem)\n")
    print("| phase | s/step | share |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value / steps:.3f} | {value / loop:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5, help="runs per arm, alternating (seed = repeat)")
    parser.add_argument("--start", default="student", help="the model card every arm starts from")
    parser.add_argument("--eval-problems", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="then profile one more run of `ours serial`")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}: choose among {list(ARMS)}")
    torch.set_num_threads(2)
    if any("trainer" in ARMS[arm] for arm in arms):
        trl_venv()
    store = Store()
    try:
        start, teacher_path = store.read_card(args.start).path, store.read_card("teacher").path
        fixed = store.read_dataset("teacher_labeled")  # run_arm's fixed data: never drawn at λ = 1
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: the benchmark starts from its teacher and students.")
    teacher = HFEngine.load(teacher_path, batch_size=128)
    vocabulary = len(teacher.tokenizer)
    eval_problems = TASK.prompts("eval", args.eval_problems, 0)
    began, runs = time.perf_counter(), {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms:
            options = {key: vocabulary if value == "vocabulary" else value for key, value in ARMS[arm].items()}
            if "trainer" in options:
                runs[arm].append(trl_arm(options["trainer"], start, teacher_path, args.steps, repeat, eval_problems))
            else:
                runs[arm].append(run_arm(options.pop("pipelined", False), start, teacher, fixed, args.steps, repeat,
                                         eval_problems, **options))
            print(arm, {key: round(value, 3) for key, value in runs[arm][-1].items()}, flush=True)
    start_em = evaluate(*load_model(start), eval_problems, TASK, seed=0)["greedy_exact_match"]
    print(f"\n{args.steps} steps × {BATCH}, λ = 1, JSD(0.5), from {args.start} (greedy EM {start_em:.3f}), {args.repeats} "
          f"run(s) per arm, {args.eval_problems} eval problems, torch threads {torch.get_num_threads()}, "
          f"{(time.perf_counter() - began) / 60:.1f} min\n")
    reference = next((arm for arm in arms if "trainer" in ARMS[arm]), arms[0])
    print(f"| arm | completion tokens/s | s/step | greedy EM (± s.e.) | EM per run | tokens/s vs {reference} |\n"
          "|---|---|---|---|---|---|")
    pooled = {arm: sum(r["tokens_per_second"] * r["seconds_per_step"] for r in results) / sum(r["seconds_per_step"] for r in results)
              for arm, results in runs.items()}  # all its runs' tokens over all their seconds
    for arm, results in runs.items():
        greedy = [r["greedy"] for r in results]
        error = statistics.stdev(greedy) / len(greedy) ** 0.5 if len(greedy) > 1 else float("nan")
        print(f"| {arm} | {pooled[arm]:,.0f} | {statistics.mean(r['seconds_per_step'] for r in results):.3f} | "
              f"{statistics.mean(greedy):.3f} ± {error:.3f} | {' / '.join(f'{g:.3f}' for g in greedy)} | "
              f"{pooled[arm] / pooled[reference]:.2f}× |")
    if args.profile:
        profile_ours(start, teacher, fixed, args.steps, eval_problems)


if __name__ == "__main__":
    main()

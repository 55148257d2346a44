"""A student with another tokenizer than its teacher's learns from the teacher's stored signal:

    .venv/bin/python bench/cross_tokenizer.py [--seeds 3] [--steps 300] [--eval-problems 500]

The demo's teacher (character tokenizer) labeled `teacher_labeled` and stored its tokens (`token_texts`).
The student here has the embedded student's architecture on a byte-level BPE of 512 ids
(`build_byte_level_bpe`, trained on arithmetic text) and the embedded student's warm start (550 SFT
steps on reference solutions, as `student_model`), so it has not seen the teacher. From that start,
each arm trains `--steps` steps × 32 on teacher_labeled (training/models/alignment.py aligns it):
  seqkd, re-tokenized   SFT on the teacher's responses as the student tokenizes them
  supervised KD, aligned  JSD(0.5) on the teacher's top-20 mapped onto the student's tokens, and on the
                          groups' likelihoods where the tokens do not meet one to one, the tail as a bucket
                          (`renormalize` is refused across tokenizers: it made this student worse, 0.083 → 0.043)
and, for reference, the demo's character-level `student` (the teacher's tokenizer) with supervised KD.
Prints greedy exact match before and after (mean ± std over seeds) and the alignment's coverage.
Needs `make demo` first (a store whose teacher_labeled run wrote token_texts).
"""

import argparse
import copy
import statistics
import time

import torch

from storage.store import Store
from training.embedded.pair import train_embedded
from training.evals.evaluate import evaluate
from training.models.checkpoints import STUDENT_ARCHITECTURE, load_model
from training.models.tokenizer import build_byte_level_bpe
from training.tasks.arithmetic import problems
from training.tasks.arithmetic_task import ArithmeticTask
from training.trainer.loop import train_student
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for

TASK = ArithmeticTask()
ARMS = {  # name: (objective, tail policy)
    "seqkd, re-tokenized": ("sft", "renormalize"),
    "supervised KD, aligned": ("supervised_kd", "bucket"),
}


def bpe_start(seed: int, eval_problems: int):
    """The embedded student's warm start (student_model's settings), on a byte-level BPE of 512 ids."""
    tokenizer = build_byte_level_bpe([p.prompt + p.solution for p in problems("train", 3000, 7)], vocab_size=512)
    settings = TrainingSettings(objective="sft", steps=550, batch_size=64, micro_batch_size=32, learning_rate=3e-3, warmup_steps=50,
                                seed=seed)
    model, tokenizer, _, accuracy, _ = train_embedded(STUDENT_ARCHITECTURE, settings, eval_problems, tokenizer=tokenizer)
    return model, tokenizer, accuracy


def distilled(model, tokenizer, objective: str, tail_policy: str, steps: int, seed: int, store: Store, teacher: str,
              eval_rows) -> tuple[float, dict]:
    settings = TrainingSettings(objective=objective, tail_policy=tail_policy, steps=steps, batch_size=32, seed=seed)
    batches = batches_for(model, tokenizer, settings, store.read_dataset("teacher_labeled"), teacher=teacher)
    train_student(model, tokenizer, batches, settings)
    coverage = batches.cross.coverage() if batches.cross is not None else {}
    return evaluate(model, tokenizer, eval_rows, TASK, seed=seed)["greedy_exact_match"], coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-problems", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = Store()
    try:
        card = store.read_card("teacher")
        tokens = store.token_texts_path(card.tokenizer_hash)
        start_card = store.read_card("student")
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: the benchmark distills its teacher's teacher_labeled.")
    if not tokens.exists():
        raise SystemExit(f"{tokens} is missing: materialize teacher_labeled again (it stores the teacher's tokens)")
    eval_rows = TASK.prompts("eval", args.eval_problems, 0)
    results = {"start (BPE)": [], **{arm: [] for arm in ARMS}, "same tokenizer, supervised KD": []}
    began, coverage = time.perf_counter(), {}
    for seed in range(args.seeds):
        start_model, tokenizer, start = bpe_start(seed, args.eval_problems)
        results["start (BPE)"].append(start)
        for arm, (objective, tail_policy) in ARMS.items():
            model = copy.deepcopy(start_model)
            exact, coverage = distilled(model, tokenizer, objective, tail_policy, args.steps, seed, store, str(tokens), eval_rows)
            results[arm].append(exact)
            print(arm, seed, round(start, 3), "→", round(exact, 3), coverage, flush=True)
        model, tokenizer = load_model(start_card.path)
        results["same tokenizer, supervised KD"].append(
            distilled(model, tokenizer, "supervised_kd", "renormalize", args.steps, seed, store, str(tokens), eval_rows)[0])
    print(f"\n{args.steps} steps × 32 on teacher_labeled, {args.seeds} seed(s), {args.eval_problems} eval problems, "
          f"{(time.perf_counter() - began) / 60:.1f} min; teacher {card.eval_exact_match}, the character student starts at "
          f"{start_card.eval_exact_match}\n")
    print("| arm | greedy EM (mean ± std) | per seed |\n|---|---|---|")
    for arm, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(values):.3f} ± {spread:.3f} | {' / '.join(f'{v:.3f}' for v in values)} |")
    print(f"\nalignment coverage (last run): {coverage}")


if __name__ == "__main__":
    main()

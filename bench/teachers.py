"""Two teachers: does a student learn more from their mixture, or from each response's own teacher,
than from one teacher, at equal training tokens?

    .venv/bin/python bench/teachers.py [--home DIR] [--seeds 3] [--steps 300] [--eval-problems 500]

Materializes, through Dagster (a fresh temporary store by default; `--home` reuses one):
  teacher_model   the embedded teacher (seed 0) and a second one, `second` (the same recipe, seed 1)
  student_model   the embedded student's warm start
  teacher_labeled every teacher answers every seed prompt (routing 'every', greedy), every teacher
                  scores every response (scoring 'every'), and the 1:1 mixture is stored too
then trains the same start `--steps` × 32 with supervised KD, JSD(0.5), on the stored top-20, on:
  one teacher          the first teacher's responses with its own signal (the single-teacher recipe)
  second teacher       the second's responses with its own signal
  each its own         both teachers' responses, each with its author's signal (twice the responses)
  mixture              both teachers' responses with the 1:1 mixture over the union of their top-k
                       (offline_student's `teachers: [mixture]`)
Prints greedy exact match before and after (mean ± std over seeds), each teacher's, and the seconds.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import torch

LABELING = {"routing": "every", "scoring": "every", "mixture": {"teacher": 1.0, "second": 1.0}}
RUN_CONFIG = {"ops": {
    "teacher_model": {"config": {"others": [{"teacher_id": "second", "seed": 1}]}},
    "teacher_labeled": {"config": LABELING},
}}
ARMS = {  # name: (the teachers whose signal it trains on, the authors of the responses)
    "one teacher": (["teacher"], ["teacher"]),
    "second teacher": (["second"], ["second"]),
    "each its own": (["teacher", "second"], "own"),
    "mixture": (["mixture"], None),  # every mixture row: both teachers' responses
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="the store and Dagster home (default: a fresh temporary one)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-problems", type=int, default=500)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="teachers_"))
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    os.environ["DISTILL_HOME"], os.environ["DAGSTER_HOME"] = str(home / "distill"), str(home / "dagster")
    torch.set_num_threads(2)

    from assets.datasets import seed_prompts, teacher_labeled
    from assets.models import student_model, teacher_model
    from pipelines.definitions import defs
    from storage.catalog import query
    from storage.store import Store
    from training.evals.evaluate import evaluate
    from training.models.checkpoints import load_model
    from training.tasks.arithmetic_task import ArithmeticTask
    from training.trainer.loop import train_student
    from training.trainer.settings import TrainingSettings
    from training.trainer.sources import batches_for

    began, store = time.perf_counter(), Store()
    if not store.has_dataset("teacher_labeled"):
        with dg.DagsterInstance.get() as instance:
            selection = [teacher_model, student_model, seed_prompts, teacher_labeled]
            if not dg.materialize(selection, instance=instance, resources=defs.resources, run_config=RUN_CONFIG,
                                  raise_on_error=False).success:
                raise SystemExit(f"materializing the two teachers' data failed; the run is in {home / 'dagster'}")
    built = time.perf_counter() - began
    _, counts = query(store, "SELECT written_by, teacher_id, count(*), round(avg(num_tokens), 1), round(avg(correct::int), 3) "
                             "FROM teacher_labeled GROUP BY ALL ORDER BY ALL")
    teachers = {"teacher": store.read_card("teacher"), "second": store.read_card("teachers/second")}
    rows, task = store.read_dataset("teacher_labeled"), ArithmeticTask()
    eval_rows, start = task.prompts("eval", args.eval_problems, 0), store.read_card("student")

    def arm_rows(scorers, authors):
        own = pc.equal(rows["teacher_id"], rows["written_by"])
        chosen = own if authors == "own" else pc.is_in(rows["written_by"], value_set=pc.cast(authors, rows["written_by"].type))
        return rows.filter(pc.and_(chosen, pc.is_in(rows["teacher_id"], value_set=pc.cast(scorers, rows["teacher_id"].type))))

    results = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm, (scorers, authors) in ARMS.items():
            model, tokenizer = load_model(start.path)
            mixture = authors is None  # chosen by the training's own `teachers` filter, as offline_student's config does
            settings = TrainingSettings(objective="supervised_kd", divergence="jsd", beta=0.5, steps=args.steps, batch_size=32,
                                        seed=seed, teachers=scorers if mixture else [])
            data = rows if mixture else arm_rows(scorers, authors)
            train_student(model, tokenizer, batches_for(model, tokenizer, settings, data), settings)
            results[arm].append(evaluate(model, tokenizer, eval_rows, task, seed=seed)["greedy_exact_match"])
            print(arm, seed, results[arm][-1], flush=True)

    print(f"\n{args.steps} steps × 32, supervised KD JSD(0.5) on the top-20, {args.seeds} seed(s), {args.eval_problems} eval "
          f"problems; data built in {built / 60:.1f} min, all in {(time.perf_counter() - began) / 60:.1f} min")
    print(f"teachers' greedy exact match: {', '.join(f'{t} {c.eval_exact_match}' for t, c in teachers.items())}; "
          f"the student starts at {start.eval_exact_match}\n")
    print("rows (written_by, teacher_id, rows, mean tokens, accuracy):", counts, "\n")
    print("| arm | greedy EM (mean ± std) | per seed |\n|---|---|---|")
    for arm, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(values):.3f} ± {spread:.3f} | {' / '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()

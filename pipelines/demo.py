"""`make demo`: materialize the offline graph on the embedded default, run two on-policy rounds
(r001, r002), then show the data and the per-round table.

    python -m pipelines.demo [--seed N]   # N seeds every model, dataset and training (default 0);
                                          # the eval split stays the same, so figures compare
"""

import argparse
import os
import time

# Before transformers loads (the imports below load it): no "Loading weights" bars from from_pretrained, in this process
# or in the training commands it launches, which inherit the variable. Dagster's own progress stays.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import dagster as dg

from assets.partitions import round_key, rounds
from pipelines.cli import format_table, list_datasets
from pipelines.definitions import defs
from pipelines.instance import prepare_dagster_home
from storage.catalog import catalog_path, query
from storage.store import Store

DEMO_QUERY = """
SELECT teacher, count(*) AS responses, round(avg(num_tokens), 1) AS mean_tokens,
       round(avg(correct::INT), 3) AS teacher_accuracy,
       round(avg(list_avg(token_logprob)), 4) AS mean_token_logprob,
       round(avg(list_avg(tail_mass)), 5) AS mean_tail_mass
FROM teacher_labeled GROUP BY teacher
"""


FUNNEL_QUERY = "SELECT filter, setting, rows_in, dropped, rows_out FROM curation_report"
ORIGIN_QUERY = "select origin, count(*) from curated group by 1 order by 2 desc"

EVALS_QUERY = """
SELECT model, checkpoint,
       round(max(value) FILTER (metric = 'greedy_exact_match'), 3) AS greedy_em,
       round(max(value) FILTER (metric = 'sampled_exact_match'), 3) AS sampled_em,
       round(max(value) FILTER (metric = 'reverse_kl_on_student_samples'), 4) AS reverse_kl,
       round(max(value) FILTER (metric = 'forward_kl_on_teacher_samples'), 4) AS forward_kl
FROM evals WHERE round IS NULL AND run_id = (SELECT arg_max(run_id, created_at) FROM evals WHERE round IS NULL)
GROUP BY model, checkpoint ORDER BY greedy_em DESC
"""


DEMO_ROUNDS = 2
ROUNDS_QUERY = ("SELECT round, parent, checkpoint, greedy_exact_match, sampled_exact_match, improvement, reverse_kl, forward_kl, "
                "rollout_reward FROM rounds ORDER BY round")
SEEDED = {
    "distill_offline": ["teacher_model", "student_model", "seed_prompts", "teacher_labeled", "expanded", "synthesized",
                        "offline_student", "evals"],
    "distill_round": ["student_rollouts", "student_checkpoint", "round_eval"],
}
SEEDED_SAMPLING = {"teacher_labeled": ["sampling"], "expanded": ["sampling", "writing"], "synthesized": ["sampling", "writing"],
                   "student_rollouts": ["sampling"]}  # assets seeded by their Sampling settings (the others by `seed`)


def seeded(job: str, seed: int) -> dict:
    """The run config that sets `seed` on every seeded asset of `job` (none for the default, 0)."""
    def config(name: str) -> dict:
        return {field: {"seed": seed} for field in SEEDED_SAMPLING[name]} if name in SEEDED_SAMPLING else {"seed": seed}

    return {"ops": {name: {"config": config(name)} for name in SEEDED[job]}} if seed else {}


def main() -> None:
    parser = argparse.ArgumentParser(description="Materialize the embedded demo: the offline graph, then two rounds.")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model, dataset and training (default 0)")
    seed = parser.parse_args().seed
    store = Store()
    dagster_home = prepare_dagster_home(os.environ.setdefault("DAGSTER_HOME", str(store.root / "dagster")))
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        offline = defs.resolve_job_def("distill_offline")
        result = offline.execute_in_process(instance=instance, run_config=seeded("distill_offline", seed))
        if not result.success:
            raise SystemExit("the demo run failed; see the log above")
        for number in range(1, DEMO_ROUNDS + 1):  # what the round sensor does when enabled
            key = round_key(number)
            instance.add_dynamic_partitions(rounds.name, [key])
            run = defs.resolve_job_def("distill_round").execute_in_process(
                instance=instance, partition_key=key, run_config=seeded("distill_round", seed))
            if not run.success:
                raise SystemExit(f"round {key} failed; see the log above")
    teacher = store.read_card("teacher")
    print(f"\nDone in {time.perf_counter() - started:.0f} s (seed {seed}).")
    print(f"Teacher: {teacher.num_parameters:,} parameters, eval exact match {teacher.eval_exact_match:.3f}")
    student = store.read_card("student")
    print(f"Student: {student.num_parameters:,} parameters, SFT warm start exact match {student.eval_exact_match:.3f}")
    print(f"\nData under {store.root}; DuckDB catalog at {catalog_path(store)}\n")
    print(format_table(*list_datasets(store)))
    print(f"\n$ distill query \"{' '.join(DEMO_QUERY.split())}\"\n")
    print(format_table(*query(store, DEMO_QUERY)))
    print("\nCuration funnel (teacher-labeled, expanded, evolved and synthesized rows in; curated out):\n")
    print(format_table(*query(store, FUNNEL_QUERY)))
    print(f"\n$ distill query \"{ORIGIN_QUERY}\"\n")
    print(format_table(*query(store, ORIGIN_QUERY)))
    print("\nEvals on the eval split (greedy and sampled exact match; reverse KL on own samples and forward KL on teacher "
          "samples, to the teacher):\n")
    print(format_table(*query(store, EVALS_QUERY)))
    print(f"\nOn-policy rounds (GKD, λ = 0.5, JSD β = 0.5):\n\n$ distill query \"{ROUNDS_QUERY}\"\n")
    print(format_table(*query(store, ROUNDS_QUERY)))
    print(f"\nOpen the UI:  make ui   (Dagster on http://127.0.0.1:3000, DAGSTER_HOME={dagster_home})")


if __name__ == "__main__":
    main()

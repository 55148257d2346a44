"""`expanded`, `synthesized` and `curated` through `dagster.materialize` on a tiny configuration."""

import json

import dagster as dg

from assets import checks
from assets.curation import curated, expanded, synthesized
from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.models import teacher_model
from assets.resources import ModelEngine, store_resource
from storage.catalog import query
from storage.store import Store
from training.tasks.arithmetic import problems

ASSETS = [teacher_model, seed_prompts, eval_set, teacher_labeled, expanded, synthesized, curated]
CURATED_CHECKS = [checks.curated_signal_valid, checks.no_eval_items, checks.no_duplicate_text, checks.origin_shares]
RESOURCES = {"store": store_resource, "model_engine": ModelEngine(batch_size=32), "shard_executor": ShardExecutor()}
LABELING = {"sampling": {"max_new_tokens": 40}, "k": 8}
# a 30-step teacher writes no valid arithmetic, so the seeds are a file of questions without answers
# under task `none` (no verifier; a written input is the first line of the output), and short
# templates stand in for an instruction-following teacher: the plumbing is under test here, the
# embedded teacher's writing in bench/offline_graph.py
GENERIC = {"templates": "self_instruct", "writing": {"max_new_tokens": 12}, **LABELING}
CONFIG = {
    "teacher_model": {"train_steps": 30, "eval_problems": 16},
    "seed_prompts": {"num_prompts": 24},
    "eval_set": {"num_prompts": 16},
    "teacher_labeled": LABELING,
    "expanded": {**GENERIC, "num_expanded": 12, "num_evolved": 6, "demonstrations": 2,
                 "expand_template": "{demonstrations}", "demonstration_template": "{prompt};", "evolve_template": "{seed} >"},
    "synthesized": {**GENERIC, "num_synthesized": 10, "topics": {"op=add digits=2 carries=1": 1.0, "op=mul digits=3 carries=2": 3.0},
                    "synthesize_template": "[{topic}] >"},
    "curated": {"min_mean_logprob": -5.0, "max_mean_entropy": 5.0, "drop_unfinished": False, "target_size": 40},
}


def materialize(instance, selection, **overrides):
    names = [a.op.name for a in selection]
    config = {name: {**CONFIG.get(name, {}), **overrides.get(name, {})} for name in names}
    return dg.materialize(ASSETS + CURATED_CHECKS, selection=selection, instance=instance, resources=RESOURCES,
                          run_config={"ops": {n: {"config": c} for n, c in config.items() if c}}, raise_on_error=False)


def test_curated_end_to_end(instance, distill_home, tmp_path):
    """The curated graph on tiny settings: what each asset writes, the funnel, the checks; then a
    re-run whose filters leave nothing."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": p.prompt}) + "\n" for p in problems("train", 24, 7)))
    seeds = {"source": "files", "files": [str(questions)], "prompt_column": "question", "task": "none"}
    result = materialize(instance, ASSETS, seed_prompts=seeds)
    assert result.success
    store = Store(distill_home)
    written = store.read_dataset("expanded")
    meta = result.asset_materializations_for_node("expanded")[0].metadata
    assert meta["instructions"].value == 18 and meta["unparsed_outputs"].value + written.num_rows == 18
    assert set(written["origin"].to_pylist()) <= {"expanded", "evolved"}
    row = written.to_pylist()[0]
    assert row["instruction"] and row["parent_prompts"] and row["topk_ids"] and row["answer"] is None
    synthesized_rows = store.read_dataset("synthesized")
    assert set(synthesized_rows["topic"].to_pylist()) <= {"op=add digits=2 carries=1", "op=mul digits=3 carries=2"}

    kept, report = store.read_dataset("curated"), store.read_dataset("curation_report")
    dropped = store.read_dataset("curation_dropped")
    assert kept.num_rows + dropped.num_rows == 24 + written.num_rows + synthesized_rows.num_rows
    assert report["filter"].to_pylist()[-1] == "selection" and report["rows_out"].to_pylist()[-1] == kept.num_rows <= 40
    assert {"origin", "quality_score", "mean_token_logprob", "topk_ids", "tail_mass", "teacher_weights_hash"} <= set(kept.column_names)
    checks_passed = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    origins_lost = set(dropped["origin"].to_pylist()) - set(kept["origin"].to_pylist())
    assert checks_passed == {"sparse_signal_valid": True, "no_eval_items": True, "no_duplicate_text": True,
                             "origin_shares": not origins_lost}
    curated_meta = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == "curated"][0]
    metadata = curated_meta.materialization.metadata
    assert "data:image/png;base64," in metadata["funnel_chart"].value and "| selection |" in metadata["funnel"].value
    _, rows = query(store, "SELECT origin, count(*) FROM curated GROUP BY 1 ORDER BY 1")
    assert sum(n for _, n in rows) == kept.num_rows and set(dict(rows)) <= {"labeled", "expanded", "evolved", "synthesized"}
    # task `none` judges nothing: `correct` stays null and the verifier keeps every row
    assert query(store, "SELECT count(*) FILTER (correct IS NOT NULL), count(*) FROM teacher_labeled")[1] == [(0, 24)]
    assert query(store, "SELECT count(*) FROM curation_dropped WHERE filter = 'verifier'")[1] == [(0,)]
    assert query(store, "SELECT DISTINCT task FROM seed_prompts")[1] == [("none",)]

    # filters that leave nothing fail naming the filter, and the curated version there was stays
    failed = materialize(instance, [curated], curated={"min_mean_logprob": -0.0001, "use_verifier": False})
    assert not failed.success
    assert "`confidence`" in failed.get_step_failure_events()[0].step_failure_data.error.cause.message
    assert store.read_dataset("curated").equals(kept)


def test_out_of_range_threshold_fails_at_config_time(instance):
    result = materialize(instance, [curated], curated={"near_duplicate_threshold": 1.5})
    assert not result.success
    assert "near_duplicate_threshold" in str(result.get_step_failure_events()[0].step_failure_data.error)

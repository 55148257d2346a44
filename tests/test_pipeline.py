"""The offline graph end to end through `dagster.materialize`, in a temporary DAGSTER_HOME."""

import json
from pathlib import Path

import dagster as dg
import pytest
from conftest import copy_store

from assets.checks import (
    eval_disjoint_from_train,
    sparse_signal_valid,
    teacher_reaches_target,
    token_round_trip,
    vocab_compatible,
)
from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.models import student_model, teacher_model
from assets.publish import rounded
from assets.resources import ModelEngine, store_resource
from assets.students import evals, offline_student
from pipelines.cli import main as distill
from pipelines.definitions import defs
from storage.catalog import query
from storage.store import Store
from training.tasks.arithmetic import parse_chain

ASSETS = [teacher_model, student_model, seed_prompts, eval_set, teacher_labeled, offline_student, evals]
CHECKS = [sparse_signal_valid, token_round_trip, vocab_compatible, eval_disjoint_from_train, teacher_reaches_target]
RESOURCES = {"store": store_resource, "model_engine": ModelEngine(batch_size=32), "shard_executor": ShardExecutor()}
TINY = {
    "teacher_model": {"train_steps": 30, "eval_problems": 16},
    "student_model": {"train_steps": 20, "eval_problems": 16},
    "offline_student": {"steps": 20, "batch_size": 8, "train_on": "teacher_labeled"},  # the tiny graph has no curated
    "seed_prompts": {"num_prompts": 24},
    "eval_set": {"num_prompts": 16},
    "teacher_labeled": {"sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 40}, "k": 8},
}


def run_config(names, **overrides):
    merged = {name: {**TINY.get(name, {}), **overrides.get(name, {})} for name in names}
    return {"ops": {name: {"config": config} for name, config in merged.items() if config}}


def materialize(instance, selection=None, **overrides):
    names = [a.key.to_user_string() for a in (selection or ASSETS)]
    return dg.materialize(
        ASSETS + CHECKS,
        selection=selection,
        instance=instance,
        resources=RESOURCES,
        run_config=run_config(names, **overrides),
        raise_on_error=False,
    )


def test_offline_graph_end_to_end(instance, distill_home, tiny_offline_run, capsys):
    """The graph (the session's tiny run), then on a copy of its store: a clean re-run, k above the
    stored k refused, overlong prompts dropped or truncated and counted."""
    template, run, dagster_home = tiny_offline_run
    assert run["success"]
    assert run["checks"] == {
        "sparse_signal_valid": True,
        "token_round_trip": True,
        "vocab_compatible": True,
        "eval_disjoint_from_train": True,
        "teacher_reaches_target": False,  # 30 training steps are far from the target: the check can fail
    }

    store = copy_store(template, distill_home)
    labeled = store.read_dataset("teacher_labeled")
    assert labeled.num_rows == 48  # 24 prompts × n=2
    row = labeled.slice(0, 1).to_pylist()[0]
    assert len(row["topk_ids"]) == len(row["completion_token_ids"]) == row["num_tokens"] > 0
    assert len(row["topk_ids"][0]) == row["k"] == 8
    assert row["teacher_weights_hash"] == store.read_card("teacher").weights_hash
    assert row["logprob_mode"] == "raw" and row["codec"] == "topk-v1" and row["temperature"] == 1.0
    assert json.loads(row["sampling"]) == {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40, "seed": 0}
    assert row["run_id"] == run["run_id"] and len(row["sample_id"]) == 16
    assert len(set(labeled["sample_id"].to_pylist())) == 48

    with pytest.MonkeyPatch.context() as patch:  # the tiny run's materializations, in its own instance
        patch.setenv("DAGSTER_HOME", str(dagster_home))
        with dg.DagsterInstance.get() as tiny:
            metadata, offline = (tiny.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
                                 for asset in ("teacher_labeled", "offline_student"))
    assert metadata["dagster/row_count"].value == 48
    assert {"tokens", "mean_topk_entropy", "mean_tail_mass", "preview", "path"} <= set(metadata)
    assert Path(metadata["path"].value).exists()

    columns, rows = query(store, "SELECT asset, run_id FROM lineage ORDER BY asset")
    assert [r[0] for r in rows] == [
        "eval_set", "evals", "offline_student", "seed_prompts", "student_model", "teacher_labeled", "teacher_model"
    ]
    columns, rows = query(store, "SELECT model, metric FROM evals ORDER BY model, metric")
    student_metrics = ["forward_kl_on_teacher_samples", "greedy_exact_match", "reverse_kl_on_student_samples",
                       "sampled_exact_match", "student_nll_on_teacher_samples", "teacher_logprob_on_student_samples"]
    assert rows == [("offline_student", m) for m in student_metrics] + [("student", m) for m in student_metrics] + [
        ("teacher", "greedy_exact_match"), ("teacher", "sampled_exact_match"),
    ]
    assert offline["trained_on"].value == "teacher_labeled" and offline["steps"].value == 20
    assert "data:image/png;base64," in offline["loss_curve"].value
    assert 0 <= offline["eval_greedy_exact_match"].value <= 1
    streamed = run["streamed"]  # through Pipes
    assert any(m.startswith("step 0/20 loss") for m in streamed) and any(m.startswith("step 19/20 loss") for m in streamed)
    assert any(m.endswith(f"weights {offline['weights_hash'].value}") for m in streamed)
    figures = [entry.value for entries in (metadata, offline) for entry in entries.values() if isinstance(entry.value, float)]
    assert len(figures) > 5 and all(figure == rounded(figure) for figure in figures)  # the UI shows 4 significant digits
    assert rounded(0.04799999999999993) == 0.048 and rounded(-0.00084449) == -0.0008445 and rounded(3.0) == 3.0
    checkpoint = Path(store.read_card("offline_student").path)
    assert (checkpoint / "model.safetensors").exists() and len(json.loads((checkpoint / "curve.json").read_text())) == 20
    assert distill(["--home", str(distill_home), "query", "SELECT count(*) AS n FROM teacher_labeled"]) == 0
    assert "48" in capsys.readouterr().out

    again = materialize(instance, selection=[teacher_labeled])  # a re-run replaces the output cleanly
    assert again.success
    assert store.read_dataset("teacher_labeled")["run_id"].unique().to_pylist() == [again.run_id]
    assert query(store, "SELECT count(*) FROM lineage WHERE asset = 'teacher_labeled'")[1] == [(2,)]

    rejected = materialize(instance, selection=[offline_student], offline_student={"k": 50})  # above the stored top-8
    assert not rejected.success
    assert "k=50 is larger than the stored top-8" in str(rejected.get_step_failure_events()[0].step_failure_data.error)

    # overlong prompts, on the same teacher: the embedded context is 128 tokens, 100 new tokens leave 28 for the prompt
    path = distill_home / "long.jsonl"
    path.write_text(json.dumps({"prompt": "1" * 40 + "+1="}) + "\n" + json.dumps({"prompt": "1+1="}) + "\n")
    files = {"source": "files", "files": [str(path)]}
    for policy, kept, counter in [("drop", 1, "dropped_overlong_prompts"), ("truncate", 2, "truncated_overlong_prompts")]:
        result = materialize(
            instance,
            selection=[seed_prompts, teacher_labeled],
            seed_prompts=files,
            teacher_labeled={"sampling": {"n": 1, "temperature": 0.0, "max_new_tokens": 100}, "overlong_prompts": policy},
        )
        assert result.success
        labeled = result.asset_materializations_for_node("teacher_labeled")[0].metadata
        assert labeled[counter].value == 1
        assert labeled["dagster/row_count"].value == kept


def test_configured_model_is_recorded_not_trained(instance, distill_home, tiny_model_dir):
    result = materialize(instance, selection=[teacher_model], teacher_model={"model": str(tiny_model_dir)})
    assert result.success
    card = Store(distill_home).read_card("teacher")
    assert card.path == str(tiny_model_dir) and card.vocab_size == 300
    assert card.train_steps is None and len(card.tokenizer_hash) == 16


def test_the_long_task_by_settings_only(instance, distill_home):
    """arithmetic_chain: the embedded models grow to 320 positions, the prompts are chains, the teacher labels them."""
    chain = {"task": "arithmetic_chain", "train_steps": 2, "batch_size": 8, "micro_batch_size": 8, "eval_problems": 4}
    result = materialize(instance, selection=[teacher_model], teacher_model=chain)
    assert not result.success and "has no instruction language" in str(result.get_step_failure_events()[0].step_failure_data.error)
    result = materialize(instance, selection=[teacher_model, student_model, seed_prompts, teacher_labeled],
                         teacher_model={**chain, "instruction_share": 0.0},
                         student_model={**chain, "hidden_size": 96}, seed_prompts={"task": "arithmetic_chain", "num_prompts": 4},
                         teacher_labeled={"sampling": {"n": 1, "temperature": 0.0, "max_new_tokens": 256}})
    assert result.success
    store = Store(distill_home)
    assert [(store.read_card(name).task, store.read_card(name).context_length) for name in ("teacher", "student")] == \
        [("arithmetic_chain", 320)] * 2
    assert store.read_card("student").num_parameters == 194_400  # 96 wide (3 heads), not the default 64 (88,640)
    assert all(parse_chain(prompt) for prompt in store.read_dataset("seed_prompts")["prompt"].to_pylist())
    assert store.read_dataset("teacher_labeled").num_rows == 4


def test_unloadable_model_fails_before_any_work(instance, distill_home):
    result = materialize(instance, selection=[teacher_model], teacher_model={"model": str(distill_home / "no-such-model")})
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "cannot load the tokenizer" in failure.cause.message or "cannot load" in failure.message
    assert not (distill_home / "models" / "teacher" / "card.json").exists()


def test_bad_config_fails_at_config_time(instance):
    result = materialize(instance, selection=[teacher_labeled], teacher_labeled={"sampling": {"n": 3, "temperature": 0.0}})
    assert not result.success
    assert "greedy responses would all be the same" in str(result.get_step_failure_events()[0].step_failure_data.error)
    result = materialize(instance, selection=[offline_student], offline_student={"mix": 0.5})
    assert not result.success
    assert "offline_student has no rollouts to mix in" in str(result.get_step_failure_events()[0].step_failure_data.error)


def test_missing_prompt_column_names_the_columns(instance, distill_home):
    path = distill_home / "p.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"question": "1+1="}) + "\n")
    result = materialize(instance, selection=[seed_prompts], seed_prompts={"source": "files", "files": [str(path)]})
    assert not result.success
    assert "its columns are ['question']" in str(result.get_step_failure_events()[0].step_failure_data.error)


def test_definitions_load_and_validate(distill_home):
    """What `dagster definitions validate` checks, in process (test_ui's webserver loads workspace.yaml)."""
    dg.Definitions.validate_loadable(defs)
    assert {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()} >= {
        "teacher_model", "student_model", "seed_prompts", "eval_set", "teacher_labeled"
    }

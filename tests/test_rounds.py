"""On-policy rounds end to end on a tiny configuration: two rounds, lineage r002 → r001 →
offline_student, the missing-parent error, re-runs, and a second launch of a running round."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import copy_store
from test_pipeline import ASSETS, RESOURCES

from assets.partitions import rounds
from assets.round_steps import round_teacher
from assets.rounds import claim_round, online_feedback, round_eval, student_checkpoint, student_rollouts, teacher_feedback
from pipelines.cli import main as distill
from pipelines.jobs import mode_config
from storage.catalog import query
from training.data.labeling import score
from training.engines.hf import HFEngine

ROUND_ASSETS = [student_rollouts, teacher_feedback, student_checkpoint, round_eval]
TINY_ROUND = {  # the tiny offline store has no curated: the rounds draw from and train on teacher_labeled
    "student_rollouts": {"num_prompts": 12, "sampling": {"n": 2, "max_new_tokens": 40}, "prompts_from": "teacher_labeled"},
    "teacher_feedback": {"k": 8},
    "student_checkpoint": {"steps": 8, "batch_size": 8, "train_on": "teacher_labeled"},
}


def run_round(instance, key: str, selection=None, **overrides):
    instance.add_dynamic_partitions(rounds.name, [key])
    names = [a.op.name for a in (selection or ROUND_ASSETS)]
    config = {name: {**TINY_ROUND.get(name, {}), **overrides.get(name, {})} for name in names}
    return dg.materialize(
        ASSETS + ROUND_ASSETS + [online_feedback], selection=selection or ROUND_ASSETS, partition_key=key, instance=instance,
        resources=RESOURCES, run_config={"ops": {n: {"config": c} for n, c in config.items() if c}}, raise_on_error=False,
    )


@pytest.fixture
def offline(instance, distill_home, tiny_offline_store):
    return copy_store(tiny_offline_store, distill_home)


def error_of(result) -> str:
    return str(result.get_step_failure_events()[0].step_failure_data.error)


def test_two_rounds_end_to_end_with_lineage(instance, offline, distill_home, capsys):
    missing = run_round(instance, "r002")  # r001 does not exist yet
    assert not missing.success
    assert "round r002 starts from round r001's student_checkpoint, which does not exist" in error_of(missing)
    assert not offline.has_dataset("student_rollouts", "r002")

    first = run_round(instance, "r001")
    assert first.success
    trained = first.asset_materializations_for_node("student_checkpoint")[0].metadata  # 24 rollouts, batches of 8
    assert trained["rollout_reuse"].value == round(trained["on_policy_steps"].value * 8 / 24, 2)
    harness = local_harness_task(distill_home.parent / "harness", offline)  # r002's eval adds lm-evaluation-harness
    second = run_round(instance, "r002", round_eval={"harness": harness})
    assert second.success

    offline_hash = offline.read_card("offline_student").weights_hash
    r001, r002 = offline.read_card("student_checkpoint", "r001"), offline.read_card("student_checkpoint", "r002")
    assert r001.parent_checkpoint == offline_hash and r002.parent_checkpoint == r001.weights_hash
    assert r001.weights_hash != r002.weights_hash

    rollouts = offline.read_dataset("student_rollouts", "r002")
    assert rollouts.num_rows == 24 and set(rollouts["student_weights_hash"].to_pylist()) == {r001.weights_hash}
    assert json.loads(rollouts["sampling"][0].as_py())["temperature"] == 1.0
    assert rollouts["prompt_id"].to_pylist() != offline.read_dataset("student_rollouts", "r001")["prompt_id"].to_pylist()

    feedback = offline.read_dataset("teacher_feedback", "r001")
    row = feedback.slice(0, 1).to_pylist()[0]
    assert len(row["topk_ids"]) == len(row["student_token_logprob"]) == len(row["completion_token_ids"]) == row["num_tokens"]
    assert len(row["topk_ids"][0]) == row["k"] == 8
    ratio = sum(row["student_token_logprob"]) - sum(row["token_logprob"])
    assert row["log_ratio_sum"] == pytest.approx(ratio, abs=1e-4)
    assert set(pc.unique(feedback["reward"]).to_pylist()) <= {0.0, 1.0}
    assert trained["max_staleness"].value > 0  # stored rollouts: sampled by the parent, drawn at later steps

    _, lineage = query(offline, """
        SELECT partition, asset, parent_round, json_extract_string(input_versions, '$.parent_checkpoint')
        FROM lineage WHERE partition IS NOT NULL ORDER BY partition, asset""")
    assert [(r[0], r[1], r[2]) for r in lineage] == [
        ("r001", "round_eval", None), ("r001", "student_checkpoint", None), ("r001", "student_rollouts", None),
        ("r001", "teacher_feedback", None),
        ("r002", "round_eval", "r001"), ("r002", "student_checkpoint", "r001"), ("r002", "student_rollouts", "r001"),
        ("r002", "teacher_feedback", "r001"),
    ]
    assert {r[3] for r in lineage if r[0] == "r001"} == {offline_hash}
    assert {r[3] for r in lineage if r[0] == "r002"} == {r001.weights_hash}

    _, table = query(offline, "SELECT round, parent, parent_checkpoint, checkpoint, greedy_exact_match, improvement "
                              "FROM rounds ORDER BY round")
    assert [(r[0], r[1], r[2], r[3]) for r in table] == [
        ("r001", "offline_student", offline_hash, r001.weights_hash),
        ("r002", "student_checkpoint[r001]", r001.weights_hash, r002.weights_hash),
    ]
    _, evals = query(offline, "SELECT round, count(*) FROM evals WHERE model = 'student_checkpoint' AND harness IS NULL "
                              "GROUP BY round ORDER BY round")
    assert evals == [("r001", 6), ("r002", 6)]  # exact match greedy and sampled, and the four task-free metrics
    _, harnessed = query(offline, "SELECT round, split, metric, value, harness, num_fewshot, seed, max_gen_toks, checkpoint FROM evals "
                                  "WHERE harness IS NOT NULL")
    assert harnessed == [("r002", "arithmetic_local", "harness/arithmetic_local/exact_match,answer", harnessed[0][3], "lm-eval 0.4.13",
                          0, 0, 48, r002.weights_hash)] and 0 <= harnessed[0][3] <= 1
    metadata = second.asset_materializations_for_node("round_eval")[0].metadata
    assert metadata["harness/arithmetic_local/exact_match,answer"].value == harnessed[0][3]
    assert "parent_harness/arithmetic_local/exact_match,answer" in metadata  # the sensor can take it as its criterion
    assert metadata["harness/arithmetic_local/overlap_with_training"].value == 0.25  # 2 of its 8 prompts were trained on
    assert "data:image/png;base64," in metadata["rounds_plot"].value
    assert metadata["improvement"].value == pytest.approx(
        metadata["greedy_exact_match"].value - metadata["parent_greedy_exact_match"].value
    )
    assert distill(["--home", str(distill_home), "query", "SELECT round, parent FROM rounds"]) == 0
    assert "student_checkpoint[r001]" in capsys.readouterr().out

    again = run_round(instance, "r001", selection=[student_rollouts])  # a re-run replaces, lineage keeps both
    assert again.success
    assert offline.read_dataset("student_rollouts", "r001")["run_id"].unique().to_pylist() == [again.run_id]
    assert query(offline, "SELECT count(*) FROM lineage WHERE asset = 'student_rollouts' AND partition = 'r001'")[1] == [(2,)]


def local_harness_task(directory, store) -> dict:
    """A local lm-evaluation-harness task in `directory` (no hub): 6 eval problems and 2 training problems,
    GSM8K-style (the answer after ####); returns round_eval's `harness` config for it."""
    import yaml

    directory.mkdir()
    problems = store.read_dataset("eval_set", columns=["prompt", "answer"]).slice(0, 6).to_pylist()
    problems += store.read_dataset("teacher_labeled", columns=["prompt", "answer"]).slice(0, 2).to_pylist()
    (directory / "problems.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "answer": str(p["answer"])}) + "\n"
                                                      for p in problems))
    data = {"data_files": {"test": str(directory / "problems.jsonl")}}
    task = {"task": "arithmetic_local", "dataset_path": "json", "dataset_kwargs": data,
            "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
            "num_fewshot": 0, "generation_kwargs": {"until": ["\n"], "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "filter_list": [{"name": "answer", "filter": [{"function": "regex", "regex_pattern": "####\\s*(-?\\d+)"},
                                                          {"function": "take_first"}]}],
            "metadata": {"version": 1.0}}
    (directory / "arithmetic_local.yaml").write_text(yaml.safe_dump(task))
    return {"tasks": ["arithmetic_local"], "include_path": str(directory), "max_gen_toks": 48, "batch_size": 8}


OTHER_LAUNCH = """
import os, pathlib, time
import dagster as dg
from assets.partitions import rounds

@dg.asset(partitions_def=rounds)
def other_launch():
    pathlib.Path(os.environ["WORKING"]).touch()
    time.sleep(600)

with dg.DagsterInstance.get() as instance:
    dg.materialize([other_launch], partition_key="r002", instance=instance)
"""


@dg.asset(partitions_def=rounds)
def round_step(context: dg.AssetExecutionContext):
    with claim_round(context):
        return 1


def test_a_round_is_run_by_one_run_at_a_time_and_a_killed_run_does_not_hold_it(instance, tmp_path):
    instance.add_dynamic_partitions(rounds.name, ["r002"])
    working = tmp_path / "working"
    other = subprocess.Popen([sys.executable, "-c", OTHER_LAUNCH], env={**os.environ, "WORKING": str(working)})
    try:
        deadline = time.monotonic() + 60
        while not working.exists():  # another launch of r002 is running
            assert other.poll() is None and time.monotonic() < deadline, "the other launch never started"
            time.sleep(0.2)
        (running,) = [r.dagster_run.run_id for r in instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": "r002"}))]
        blocked = dg.materialize([round_step], partition_key="r002", instance=instance, raise_on_error=False)
        assert not blocked.success
        assert f"round r002 is already being run by run {running}: wait for it to finish" in error_of(blocked)
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
    assert dg.materialize([round_step], partition_key="r002", instance=instance).success  # killed: released, not in progress
    assert instance.get_run_by_id(running).status == dg.DagsterRunStatus.FAILURE


def sampled_logprobs_match_a_scoring_pass(rollouts, checkpoint: str) -> None:
    """The student logprobs kept from sampling are those a teacher-forced pass of the sampler gives."""
    scored, _ = score(HFEngine.load(checkpoint), rollouts, 1)
    np.testing.assert_allclose(pc.list_flatten(rollouts["student_token_logprob"]).to_numpy(),
                               pc.list_flatten(scored["token_logprob"]).to_numpy(), atol=1e-4)


def test_online_round_appends_every_batch_it_trains_on(instance, offline):
    """An online round on-policy distilling as an advantage: the teacher returns each sampled token's
    logprob only (k = 0), every step's fresh batch is kept with its policy step."""
    online = {"online": True, "mix": 1.0, "train_on": "teacher_labeled", "objective": "kl_advantage",
              "online_rollouts": {"num_prompts": 10, "sampling": {"n": 2, "max_new_tokens": 40}, "k": 0, "prompts_from": "teacher_labeled"}}
    result = run_round(instance, "r001", selection=[student_checkpoint, online_feedback, round_eval], student_checkpoint=online)
    assert result.success
    checkpoint = result.asset_materializations_for_node("student_checkpoint")[0].metadata
    assert result.asset_materializations_for_node("online_feedback")[0].metadata["batches"].value == 8
    assert checkpoint["on_policy_steps"].value == 8 and checkpoint["max_staleness"].value == 0

    batches = offline.read_dataset("online_feedback", "r001")  # GKD's Algorithm 1: one fresh batch of 8 per step
    _, per_step = query(offline, "SELECT policy_step, trained_at_step, max(staleness), count(*) FROM online_feedback "
                                 "WHERE round = 'r001' GROUP BY ALL ORDER BY 1")
    assert per_step == [(step, step, 0, 8) for step in range(8)]
    assert set(batches["student_weights_hash"].to_pylist()) == {offline.read_card("offline_student").weights_hash}
    assert len(set(batches["prompt_id"].to_pylist())) == 10  # 4 prompts per step, cycling through the round's 10
    first = batches.filter(pc.equal(batches["policy_step"], 0))  # sampled before any update: by offline_student
    sampled_logprobs_match_a_scoring_pass(first, offline.read_card("offline_student").path)
    row = batches.slice(0, 1).to_pylist()[0]
    assert row["log_ratio_sum"] == pytest.approx(sum(row["student_token_logprob"]) - sum(row["token_logprob"]), abs=1e-4)
    assert row["k"] == 0 and row["topk_ids"] == [[]] * row["num_tokens"] and "baseline" in row
    assert offline.read_card("student_checkpoint", "r001").objective == "kl_advantage"
    assert not offline.has_dataset("student_rollouts", "r001") and not offline.has_dataset("teacher_feedback", "r001")
    assert not (offline.root / "work" / "online_batches").exists()

    evaluation = result.asset_materializations_for_node("round_eval")[0].metadata
    assert evaluation["inputs"].value["online_feedback"] == offline.dataset_version("online_feedback", "r001")
    _, lineage = query(offline, "SELECT asset FROM lineage WHERE partition = 'r001' ORDER BY asset")
    assert lineage == [("online_feedback",), ("round_eval",), ("student_checkpoint",)]


def test_a_self_round_trains_on_the_samples_its_parent_scored_and_the_verifier_kept(instance, offline):
    """The self round's job config: the parent (offline_student) scores its own samples, and the
    student fine-tunes on those the verifier accepts (here every sample with a reward: the tiny
    student is rarely right); the rows, the card and the lineage name the parent as the teacher."""
    mode = {asset: op["config"] for asset, op in mode_config("self")["ops"].items()}
    result = run_round(instance, "r001", teacher_feedback=mode["teacher_feedback"],
                       student_checkpoint={**mode["student_checkpoint"], "min_reward": 0.0})
    assert result.success
    parent = offline.read_card("offline_student")
    feedback = offline.read_dataset("teacher_feedback", "r001")
    scorers = set(zip(feedback["teacher"].to_pylist(), feedback["teacher_weights_hash"].to_pylist()))
    assert scorers == {("offline_student", parent.weights_hash)}
    assert pc.max(pc.abs(feedback["log_ratio_sum"])).as_py() < 0.05  # the teacher is the sampler itself
    card = offline.read_card("student_checkpoint", "r001")
    assert card.teacher == "offline_student" and card.objective == "sft" and card.mix == 1.0
    assert result.asset_materializations_for_node("student_checkpoint")[0].metadata["kept_samples"].value == feedback.num_rows
    _, teachers = query(offline, "SELECT json_extract_string(input_versions, '$.teacher') FROM lineage WHERE asset = 'teacher_feedback'")
    assert teachers == [("offline_student",)]
    judged = run_round(instance, "r001", selection=[student_checkpoint],
                       student_checkpoint={**mode["student_checkpoint"], "keep": "judged"})
    assert not judged.success and "round r001 has no round_judgments yet: materialize it for r001 first" in error_of(judged)
    with pytest.raises(ValueError, match="its own or a later round's checkpoint"):
        round_teacher(offline, "r001", "student_checkpoint[r001]")
    with pytest.raises(ValueError, match=r"is none of teacher_model, teacher_model\[<teacher id>\], round_robin, mixture, parent"):
        round_teacher(offline, "r002", "student_model")


def test_bad_round_key_is_named(instance):
    result = run_round(instance, "round-one", selection=[student_rollouts])
    assert not result.success
    assert "round key 'round-one' is not of the form r001" in error_of(result)

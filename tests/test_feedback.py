"""The teacher as judge: the pair policies on hand-made judgments, the judges and corrections on the
tiny store's embedded teacher, and the offline dDPO path and a preference round end to end, with
their lineage queryable in DuckDB."""

import json
import math

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import copy_store
from test_pipeline import ASSETS, RESOURCES
from test_rounds import TINY_ROUND

from assets.feedback import preference_pairs_dataset, preference_student, student_samples, teacher_judgments
from assets.partitions import rounds
from assets.student_runs import ranking_data
from pipelines.jobs import mode_config
from storage.catalog import query
from training.engines.hf import HFEngine
from training.feedback.judgments import JudgmentSettings, first_unlikely, judgments_table
from training.feedback.pairs import PairPolicy, preference_pairs, ranked_lists
from training.tasks import get_task


def judged(rows: list[tuple]) -> pa.Table:
    """Judgments of (prompt_id, sample_id, score, corrects, verifier), with one token per response."""
    return pa.table({
        "prompt_id": [r[0] for r in rows], "prompt": [f"question {r[0]}" for r in rows], "sample_id": [r[1] for r in rows],
        "score": pa.array([r[2] for r in rows], pa.float64()), "corrects": pa.array([r[3] for r in rows], pa.string()),
        "verifier": pa.array([r[4] for r in rows], pa.float64()), "prompt_token_ids": [[1, 2]] * len(rows),
        "completion_token_ids": [[index] if not r[1].endswith("-copy") else [index - 1] for index, r in enumerate(rows)],
        "completion": [f"answer {r[1]}" for r in rows],
    })


JUDGED = judged([
    ("p1", "a", 0.9, None, 1.0), ("p1", "b", 0.5, None, 0.0), ("p1", "c", 0.1, None, 0.0), ("p1", "c-fix", None, "c", 1.0),
    ("p2", "d", 0.4, None, 0.0), ("p2", "e", 0.4, None, 0.0),  # a tie: never a pair
    ("p3", "f", 0.3, None, None),  # one candidate: no pair
    ("p4", "g", 0.7, None, 1.0), ("p4", "g-copy", 0.6999999, None, 1.0),  # the same response twice: never a pair
])


def pairs_of(policy: PairPolicy) -> list[tuple]:
    pairs, _ = preference_pairs(JUDGED, policy)
    return sorted(zip(pairs["chosen_sample_id"].to_pylist(), pairs["rejected_sample_id"].to_pylist()))


def test_pair_policies_on_hand_made_judgments():
    assert pairs_of(PairPolicy()) == [("a", "c"), ("c-fix", "c")]  # best vs worst, and the correction against what it corrects
    assert pairs_of(PairPolicy(corrections=False)) == [("a", "c")]
    assert pairs_of(PairPolicy(strategy="all", max_pairs_per_prompt=5, corrections=False)) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs_of(PairPolicy(strategy="all", max_pairs_per_prompt=1, corrections=False)) == [("a", "c")]  # the largest margin
    assert pairs_of(PairPolicy(strategy="best_vs_random", max_pairs_per_prompt=2, corrections=False)) == [("a", "b"), ("a", "c")]
    assert pairs_of(PairPolicy(min_margin=0.5, strategy="all", max_pairs_per_prompt=5, corrections=False)) == [("a", "c")]
    pairs, figures = preference_pairs(JUDGED, PairPolicy())
    first = next(p for p in pairs.to_pylist() if p["kind"] == "judged")
    assert first["margin"] == pytest.approx(0.8) and first["chosen"] == "answer a" and first["chosen_token_ids"] == [0]
    assert figures["prompts"] == 4 and figures["prompts_with_pairs"] == 1 and figures["correction_pairs"] == 1
    assert len(set(pairs["pair_id"].to_pylist())) == 2
    with duckdb.connect() as connection:
        ranked = ranked_lists(connection, JUDGED).to_arrow_table().to_pylist()
    assert [(r["prompt_id"], r["scores"]) for r in ranked] == [("p1", [0.9, 0.5, 0.1]), ("p2", [0.4, 0.4]), ("p4", [0.7, 0.6999999])]
    assert ranked[0]["responses_token_ids"] == [[0], [1], [2]]


def test_the_arithmetic_task_finds_the_first_wrong_step():
    task, right = get_task("arithmetic"), "7+6+0=3c1|3;4+5+1=0c1|03;3+8+1=2c1|203;c1|1203;#### 1203"
    assert task.first_error("347+856=", right) is None
    assert task.first_error("347+856=", right.replace("4+5+1=0c1", "4+5+1=1c1")) == 12  # the second step
    assert task.first_error("347+856=", right.replace("7+6+0=3c1", "7+6+0=13=3c1")) is None  # the long form is right too
    assert task.first_error("347+856=", right.replace("#### 1203", "#### 1204")) == right.index("####")
    assert task.first_error("not a problem", right) is None and get_task("none").first_error("347+856=", "x") is None


def test_first_unlikely_token():
    logprobs = pa.array([[-0.1, -5.0, -0.2, -6.0], [-0.1, -0.1], [], [-9.0]], pa.list_(pa.float32()))
    assert first_unlikely(logprobs, math.log(0.05)).tolist() == [1, 2, 0, 0]


@pytest.fixture(scope="module")
def embedded_teacher(tiny_offline_store):
    from storage.store import Store

    return HFEngine.load(Store(tiny_offline_store).read_card("teacher").path)


def test_judges_and_corrections_on_the_embedded_teacher(embedded_teacher, tiny_offline_store):
    from storage.store import Store

    labeled = Store(tiny_offline_store).read_dataset("teacher_labeled").slice(0, 6)
    candidates = labeled.drop_columns(["token_logprob"])  # the likelihood judge then scores them with the teacher
    settings = JudgmentSettings(k=8, correct=True, correction={"cut_logprob": -1.0, "sampling": {"temperature": 0.0, "max_new_tokens": 30}})
    table, figures = judgments_table(embedded_teacher, candidates, settings, get_task("arithmetic"), {"judge_weights_hash": "t0"})
    originals = table.filter(pa.compute.is_null(table["corrects"]))
    assert figures["teacher_scored"] == 6 and originals.num_rows == 6
    assert originals["verifier"].to_pylist() == [float(c) for c in labeled["correct"].to_pylist()]
    stored = [float(np.mean(t)) for t in labeled["token_logprob"].to_pylist()]
    assert originals["likelihood"].to_pylist() == pytest.approx(stored, abs=1e-4)  # the teacher's own signal, scored again
    combined = [v + 0.1 * s for v, s in zip(originals["verifier"].to_pylist(), stored)]
    assert originals["score"].to_pylist() == pytest.approx(combined, abs=1e-4)
    fixed = table.filter(pa.compute.is_valid(table["corrects"])).to_pylist()
    wrong = {r["sample_id"]: r for r in originals.to_pylist() if r["verifier"] == 0.0}
    assert len(fixed) == len(wrong) == figures.get("corrections", 0)
    task = get_task("arithmetic")
    for row in fixed:  # the student's tokens before its first wrong step (or first unlikely token), then the teacher's own
        source = wrong[row["corrects"]]
        cut = row["correction_cut"]
        assert row["completion_token_ids"][:cut] == source["completion_token_ids"][:cut] and row["origin"] == "correction"
        if row["correction_cut_by"] == "task":
            kept = embedded_teacher.tokenizer.decode(source["completion_token_ids"][:cut], skip_special_tokens=True)
            assert kept == source["completion"][: task.first_error(source["prompt"], source["completion"])]
        else:
            assert task.first_error(source["prompt"], source["completion"]) is None
            assert cut == len(source["completion_token_ids"]) or source["token_logprob"][cut] < -1.0
    assert len(set(table["judgment_id"].to_pylist())) == table.num_rows and set(table["judge_weights_hash"].to_pylist()) == {"t0"}


FEEDBACK_ASSETS = [student_samples, teacher_judgments, preference_pairs_dataset, preference_student]
TINY_FEEDBACK = {
    "student_samples": {"num_prompts": 8, "prompts_from": "teacher_labeled", "sampling": {"n": 2, "max_new_tokens": 40}},
    "teacher_judgments": {"k": 8, "teacher_responses_from": "teacher_labeled"},  # corrections: the embedded teacher's test
    "preference_pairs": {"strategy": "all", "max_pairs_per_prompt": 2},
    "preference_student": {"steps": 6, "batch_size": 4},
}


def test_offline_dpo_path_end_to_end_with_lineage(instance, distill_home, tiny_offline_store):
    store = copy_store(tiny_offline_store, distill_home)
    result = dg.materialize(ASSETS + FEEDBACK_ASSETS, selection=FEEDBACK_ASSETS, instance=instance, resources=RESOURCES,
                            run_config={"ops": {name: {"config": config} for name, config in TINY_FEEDBACK.items()}})
    assert result.success
    offline = store.read_card("offline_student")
    pairs = store.read_dataset("preference_pairs")
    assert pairs.num_rows > 0 and set(pairs["reference_weights_hash"].to_pylist()) == {offline.weights_hash}
    assert min(pairs["margin"].to_pylist()) > 0 and set(pairs["kind"].to_pylist()) == {"judged"}
    trained = store.read_card("preference_student")
    assert trained.objective == "dpo" and trained.parent == offline.weights_hash and trained.weights_hash != offline.weights_hash
    # every pair traces back to its two judged candidates and the teacher that judged them
    _, rows = query(store, "SELECT count(*) FROM preference_pairs p JOIN teacher_judgments c ON p.chosen_sample_id = c.sample_id "
                           "JOIN teacher_judgments r ON p.rejected_sample_id = r.sample_id WHERE c.prompt_id = r.prompt_id")
    assert rows[0][0] == pairs.num_rows
    _, origins = query(store, "SELECT origin, count(*) FROM teacher_judgments GROUP BY origin ORDER BY origin")
    assert {o for o, _ in origins} >= {"student", "teacher"}
    _, lineage = query(store, "SELECT asset, input_versions FROM lineage WHERE asset IN ('preference_pairs', 'preference_student')")
    inputs = {asset: json.loads(i) for asset, i in lineage}
    assert inputs["preference_pairs"]["reference"] == offline.weights_hash
    assert inputs["preference_student"]["preference_pairs"] == store.dataset_version("preference_pairs")

    with pytest.raises(ValueError, match="materialize preference_pairs again"):  # DPO's reference must be the start
        ranking_data(store, "preference_student", "dpo", "preference_pairs", "teacher_judgments", store.read_card("student"), None)
    listwise = dg.materialize(ASSETS + FEEDBACK_ASSETS, selection=[preference_student], instance=instance, resources=RESOURCES,
                              run_config={"ops": {"preference_student": {"config": {"objective": "rrhf", "steps": 3, "batch_size": 2}}}})
    assert listwise.success and store.read_card("preference_student").objective == "rrhf"
    assert not (store.root / "work" / "preference_student").exists()  # the ranked lists went with the training's work


def test_preference_round_job_from_the_tiny_store(instance, distill_home, tiny_offline_store):
    """The job `distill_round_preference`, run as the demo runs its rounds (the job of the code location)."""
    from pipelines.definitions import defs

    store = copy_store(tiny_offline_store, distill_home)
    instance.add_dynamic_partitions(rounds.name, ["r001"])
    mode = mode_config("preference")["ops"]["student_checkpoint"]["config"]
    config = {**{name: {"config": c} for name, c in TINY_ROUND.items()},
              "student_checkpoint": {"config": {**TINY_ROUND["student_checkpoint"], **mode, "batch_size": 4, "steps": 4}},
              "round_pairs": {"config": {"strategy": "all", "max_pairs_per_prompt": 2}}}
    result = defs.resolve_job_def("distill_round_preference").execute_in_process(
        instance=instance, partition_key="r001", run_config={"ops": config})
    assert result.success
    card = store.read_card("student_checkpoint", "r001")
    pairs = store.read_dataset("round_pairs", "r001")
    assert card.objective == "dpo" and set(pairs["reference_weights_hash"].to_pylist()) == {card.parent_checkpoint}
    rollouts = set(store.read_dataset("student_rollouts", "r001")["sample_id"].to_pylist())
    assert set(pairs["chosen_sample_id"].to_pylist()) | set(pairs["rejected_sample_id"].to_pylist()) <= rollouts
    evaluation = result.asset_materializations_for_node("round_eval")[0].metadata
    assert "greedy_exact_match" in evaluation

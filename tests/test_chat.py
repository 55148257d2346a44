"""Chat models: prompts rendered with each model's own template, end-of-turn stops, and the offline
job and a round on conversations without reference answers with a non-Llama, BPE-tokenized pair
whose templates differ; then an export TRL and axolotl load."""

import json

import dagster as dg
import datasets
import pyarrow as pa
import pytest

from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.feedback import preference_pairs_dataset, preference_student, round_judgments, round_pairs, student_samples, teacher_judgments
from assets.models import student_model, teacher_model
from assets.partitions import rounds
from assets.resources import ModelEngine, store_resource
from assets.rounds import round_eval, student_checkpoint, student_rollouts, teacher_feedback
from assets.students import evals, offline_student
from pipelines.cli import main as distill
from pipelines.jobs import mode_config
from storage.catalog import query
from storage.store import Store
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.models.chat import MESSAGES, prompt_ids_for, prompt_rendering, render
from training.models.checkpoints import load_model, load_tokenizer
from training.models.tokenizer import build_char_tokenizer

SYSTEM = "You are terse."
TWO_TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def test_each_model_renders_with_its_own_template(chat_pair):
    rows = pa.table({"prompt": ["12+7=", "And 3+3?"], "messages": pa.array([None, TWO_TURNS], MESSAGES), "system_prompt": [SYSTEM, None]})
    teacher, student = load_tokenizer(str(chat_pair["teacher"])), load_tokenizer(str(chat_pair["student"]))
    assert [teacher.decode(ids) for ids in render(teacher, rows)] == [
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ]
    expected = "<|im_start|>SYSTEM: You are terse.<|im_end|><|im_start|>USER: 12+7=<|im_end|><|im_start|>ASSISTANT: "
    assert student.decode(render(student, rows)[0]) == expected
    assert prompt_rendering(teacher) != prompt_rendering(student)
    raw = build_char_tokenizer()  # the embedded tokenizer: no template, <bos> + text
    assert raw.decode(render(raw, rows.slice(0, 1).drop_columns(["system_prompt"]))[0]) == "<bos>12+7="
    with pytest.raises(ValueError, match="no chat template"):
        render(raw, rows)


def test_generation_stops_at_the_end_of_turn_and_at_stop_strings(chat_pair):
    model, tokenizer = load_model(str(chat_pair["teacher"]))
    engine = HFEngine(model, tokenizer, batch_size=32)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.end_of_turn_ids == [im_end, tokenizer.eos_token_id]  # generation_config's order (its end of turn first), then the eos
    prompts = render(tokenizer, pa.table({"prompt": [f"{i}+{i}=" for i in range(32)]}))
    generations = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_new_tokens=24, seed=1))
    at_end = [g for g in generations if im_end in g.completion_ids]
    assert at_end, "no sample reached <|im_end|>: pick another seed"
    for g in generations:
        ends = [i for i, t in enumerate(g.completion_ids) if t in engine.end_of_turn_ids]
        assert ends in ([], [len(g.completion_ids) - 1])  # only ever the last token
        assert (g.finish_reason == "stop") == bool(ends)
    stopped = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=24, seed=1, stop=["1"]))
    with_stop = [g for g in stopped if "1" in g.text]
    assert with_stop and all(g.finish_reason == "stop" and "1" not in tokenizer.decode(g.completion_ids[:-1]) for g in with_stop)


CHAT_ASSETS = [teacher_model, student_model, seed_prompts, eval_set, teacher_labeled, offline_student, evals]
ROUND_ASSETS = [student_rollouts, teacher_feedback, student_checkpoint, round_eval]
FEEDBACK_ASSETS = [student_samples, teacher_judgments, preference_pairs_dataset, preference_student]
PREFERENCE_ROUND = [student_rollouts, teacher_feedback, round_judgments, round_pairs, student_checkpoint, round_eval]
JUDGE = {"template": "Rate this answer 1-10.\n{instruction}\n{response}", "k": 64}  # the default rubric outgrows the tiny context


def chat_config(chat_pair, seeds, evals_file) -> dict:
    source = {"source": "files", "prompt_column": "messages", "task": "none", "system_prompt": SYSTEM}
    config = {
        "teacher_model": {"model": str(chat_pair["teacher"])},
        "student_model": {"model": str(chat_pair["student"])},
        "seed_prompts": {**source, "files": [str(seeds)]},
        "eval_set": {**source, "files": [str(evals_file)], "split": "train"},
        "teacher_labeled": {"sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 16}, "k": 8},
        "offline_student": {"steps": 4, "batch_size": 4, "train_on": "teacher_labeled"},  # not curated: too few rows for it
        "student_rollouts": {"num_prompts": 8, "sampling": {"n": 1, "max_new_tokens": 16}, "prompts_from": "teacher_labeled"},
        "teacher_feedback": {"k": 8},
        "student_checkpoint": {"steps": 4, "batch_size": 4, "train_on": "teacher_labeled"},
    }
    return {"ops": {name: {"config": value} for name, value in config.items()}}


def test_chat_pair_offline_job_round_and_export_without_answers(chat_pair, instance, distill_home, tmp_path, capsys):
    seeds, evals_file = tmp_path / "seeds.jsonl", tmp_path / "evals.jsonl"
    conversations = [TWO_TURNS] + [[{"role": "user", "content": f"{i}*{i}=?"}] for i in range(11)]
    seeds.write_text("\n".join(json.dumps({"messages": m}) for m in conversations))
    evals_file.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{i}-{i}=?"}]}) for i in range(6)))
    run_config = chat_config(chat_pair, seeds, evals_file)
    resources = {"store": store_resource, "model_engine": ModelEngine(batch_size=16), "shard_executor": ShardExecutor()}
    offline = dg.materialize(CHAT_ASSETS, instance=instance, resources=resources,
                             run_config={"ops": {k: v for k, v in run_config["ops"].items()
                                                 if k in {a.key.to_user_string() for a in CHAT_ASSETS}}})
    assert offline.success
    store = Store(distill_home)
    labeled = store.read_dataset("teacher_labeled")
    teacher_tokenizer = load_tokenizer(str(chat_pair["teacher"]))
    first = labeled.filter(pa.compute.equal(labeled["prompt"], "user: What is 2+2?\nassistant: 4\nuser: And 3+3?"))
    assert teacher_tokenizer.decode(first["prompt_token_ids"][0].as_py()).startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert set(labeled["prompt_rendering"].to_pylist()) == {prompt_rendering(teacher_tokenizer)}
    assert labeled["correct"].null_count == labeled.num_rows  # no reference answers: nothing judged
    student_tokenizer = load_tokenizer(str(chat_pair["student"]))
    trained_on = prompt_ids_for(student_tokenizer, first)  # what training feeds the student: its own template
    assert student_tokenizer.decode(trained_on[0].as_py()).startswith("<|im_start|>SYSTEM: You are terse.<|im_end|>")

    instance.add_dynamic_partitions(rounds.name, ["r001"])
    round_ops = {k: v for k, v in run_config["ops"].items() if k in {a.op.name for a in ROUND_ASSETS}}
    first_round = dg.materialize(CHAT_ASSETS + ROUND_ASSETS, selection=ROUND_ASSETS, partition_key="r001", instance=instance,
                                 resources=resources, run_config={"ops": round_ops})
    assert first_round.success
    evaluation = first_round.asset_materializations_for_node("round_eval")[0].metadata
    for metric in ["reverse_kl_on_student_samples", "teacher_logprob_on_student_samples", "forward_kl_on_teacher_samples",
                   "student_nll_on_teacher_samples", "parent_reverse_kl_on_student_samples"]:
        assert metric in evaluation
    assert "greedy_exact_match" not in evaluation  # no answers: no task metric, rather than a wrong one
    rollouts = store.read_dataset("student_rollouts", "r001")
    assert student_tokenizer.decode(rollouts["prompt_token_ids"][0].as_py()).startswith("<|im_start|>SYSTEM: You are terse.")
    _, rows = query(store, "SELECT round, greedy_exact_match, reverse_kl, forward_kl FROM rounds")
    assert rows[0][0] == "r001" and rows[0][1] is None and rows[0][2] > 0 and rows[0][3] > 0
    _, rows = query(store, "SELECT asset, input_versions FROM lineage WHERE asset IN ('offline_student', 'student_checkpoint')")
    for asset, inputs in rows:  # both templates in lineage: the teacher's rendered the data, the student's trained on it
        inputs = json.loads(inputs)
        assert inputs["teacher_chat_template"] == prompt_rendering(teacher_tokenizer), asset
        assert inputs["student_chat_template"] == prompt_rendering(student_tokenizer), asset

    exit_codes = {format: distill(["export", "teacher_labeled", "--format", format, "--out", str(tmp_path / format),
                                   "--tokenizer", str(chat_pair["student"])]) for format in ["trl", "messages", "axolotl"]}
    assert exit_codes["trl"] == exit_codes["messages"] == 0
    trl = datasets.load_dataset("parquet", data_files=str(tmp_path / "trl" / "train.parquet"), split="train")
    assert trl[0]["prompt"][0] == {"role": "system", "content": SYSTEM} and trl[0]["completion"][0]["role"] == "assistant"
    messages = datasets.load_dataset("parquet", data_files=str(tmp_path / "messages" / "train.parquet"), split="train")
    assert messages[0]["messages"][-1]["role"] == "assistant" and messages[0]["messages"][-2]["role"] == "user"
    if exit_codes["axolotl"]:  # the random teacher rarely stops, and samples ids the template does not reproduce
        assert "no row could be laid out for axolotl" in capsys.readouterr().err and not (tmp_path / "axolotl").exists()
    else:
        kd = datasets.load_dataset(str(tmp_path / "axolotl"), split="train")  # through its dataset card
        assert kd.features["target_token_ids"] == datasets.List(datasets.List(datasets.Value("int32")))
        row = labeled.filter(pa.compute.equal(labeled["sample_id"], kd[0]["sample_id"]))  # laid out on the student's template:
        assert kd[0]["target_token_ids"][:-1] == row["topk_ids"][0].as_py()  # nothing after its <|im_end|>, then the filler row

    # the teacher as an LLM judge (its chat template, the expected score), offline dDPO, then a preference round
    judged = {"judges": ["likelihood", "judge"], "k": 8, "judge": JUDGE}
    feedback = {"student_samples": {"num_prompts": 6, "sampling": {"n": 2, "max_new_tokens": 16}, "prompts_from": "teacher_labeled"},
                "teacher_judgments": {**judged, "teacher_responses_from": "teacher_labeled"},
                "preference_student": {"steps": 3, "batch_size": 2}}
    offline_dpo = dg.materialize(CHAT_ASSETS + FEEDBACK_ASSETS, selection=FEEDBACK_ASSETS, instance=instance, resources=resources,
                                 run_config={"ops": {name: {"config": config} for name, config in feedback.items()}})
    assert offline_dpo.success
    judgments = store.read_dataset("teacher_judgments")
    assert judgments["verifier"].null_count == judgments.num_rows  # no reference answers: no verifier
    assert all((s is None) != (e is None) for s, e in zip(judgments["judge_score"].to_pylist(), judgments["judge_excluded"].to_pylist()))
    assert all(1 <= s <= 10 for s in judgments["judge_score"].drop_null().to_pylist())
    assert len(set(judgments["judge_template_hash"].to_pylist())) == 1
    assert store.read_card("preference_student").objective == "dpo"
    assert distill(["export", "preference_pairs", "--format", "dpo", "--out", str(tmp_path / "dpo")]) == 0
    dpo = datasets.load_dataset("parquet", data_files=str(tmp_path / "dpo" / "train.parquet"), split="train")
    assert dpo[0]["prompt"][0] == {"role": "system", "content": SYSTEM} and dpo[0]["chosen"][0]["role"] == "assistant"

    instance.add_dynamic_partitions(rounds.name, ["r002"])
    two_each = {"config": {**round_ops["student_rollouts"]["config"], "sampling": {"n": 2, "max_new_tokens": 16}}}  # pairs need two
    preference = {**round_ops, "student_rollouts": two_each, "round_judgments": {"config": judged},
                  "student_checkpoint": {"config": {**round_ops["student_checkpoint"]["config"],
                                                    **mode_config("preference")["ops"]["student_checkpoint"]["config"]}}}
    second_round = dg.materialize(CHAT_ASSETS + PREFERENCE_ROUND, selection=PREFERENCE_ROUND, partition_key="r002", instance=instance,
                                  resources=resources, run_config={"ops": preference})
    assert second_round.success
    card = store.read_card("student_checkpoint", "r002")
    assert card.objective == "dpo" and card.parent_checkpoint == store.read_card("student_checkpoint", "r001").weights_hash
    _, rows = query(store, "SELECT count(*), list(DISTINCT reference_weights_hash) FROM round_pairs WHERE round = 'r002'")
    assert rows[0][0] > 0 and rows[0][1] == [card.parent_checkpoint]  # DPO's reference: the parent, r001

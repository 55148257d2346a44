"""Several teachers: teacher_model holds more than one, teacher_labeled routes prompts to them (by a
column of the source, round-robin or all), every teacher scores every response and their mixture is
stored too, with lineage; a student trains on the rows of the teachers it names. On the chat pair's
two models (one tokenizer, two chat templates) as the two teachers."""

import hashlib
import json
import re

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.inputs import teacher_card
from assets.models import student_model, teacher_model
from assets.partitions import rounds
from assets.resources import ModelEngine, store_resource
from assets.round_steps import round_teacher
from assets.rounds import student_checkpoint, student_rollouts, teacher_feedback
from assets.students import offline_student
from pipelines.cli import main as distill
from storage.catalog import query
from storage.store import Store
from training.data.labeling import TeacherPanel, routed
from training.engines.hf import HFEngine
from training.models.chat import prompt_ids_for, prompt_rendering
from training.models.checkpoints import load_model, load_tokenizer
from training.schema.signal import mixed_signal, signal_from_topk
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for

ASSETS = [teacher_model, seed_prompts, teacher_labeled]
ROUND = [student_rollouts, teacher_feedback, student_checkpoint]
RESOURCES = {"store": store_resource, "model_engine": ModelEngine(batch_size=8), "shard_executor": ShardExecutor(shard_size=4)}


def run_config(chat_pair, seeds, **labeling) -> dict:
    return {"ops": {
        "teacher_model": {"config": {"model": str(chat_pair["teacher"]), "teacher_id": "big",
                                     "others": [{"teacher_id": "small", "model": str(chat_pair["student"])}]}},
        "seed_prompts": {"config": {"source": "files", "files": [str(seeds)], "task": "none", "teacher_column": "expert"}},
        "teacher_labeled": {"config": {"sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 10}, "k": 6, **labeling}},
    }}


def test_two_teachers_route_score_and_mix_with_lineage(chat_pair, instance, distill_home, tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "expert": "small" if i % 3 == 0 else "big"}) for i in range(9)))
    config = run_config(chat_pair, seeds, routing="column", scoring="every", mixture={"big": 3, "small": 1})
    result = dg.materialize(ASSETS, instance=instance, resources=RESOURCES, run_config=config)
    assert result.success
    store = Store(distill_home)
    rows = store.read_dataset("teacher_labeled")
    assert rows.num_rows == 3 * 9  # each response: its author's row, the other teacher's and the mixture's
    _, counts = query(store, "SELECT written_by, teacher_id, count(*) FROM teacher_labeled GROUP BY ALL ORDER BY ALL")
    assert counts == [("big", "big", 6), ("big", "mixture", 6), ("big", "small", 6),
                      ("small", "big", 3), ("small", "mixture", 3), ("small", "small", 3)]
    _, routes = query(store, "SELECT DISTINCT prompt, written_by FROM teacher_labeled ORDER BY ALL")
    assert routes == sorted((f"{i}+{i}=", "small" if i % 3 == 0 else "big") for i in range(9))
    assert pc.count_distinct(rows["sample_id"]).as_py() == rows.num_rows

    # the other teacher's row is that teacher's own distribution on the author's tokens, its prompt in its own template
    small_tokenizer = load_tokenizer(str(chat_pair["student"]))
    by = lambda teacher_id, written_by: rows.filter(pc.and_(pc.equal(rows["teacher_id"], teacher_id),
                                                           pc.equal(rows["written_by"], written_by))).sort_by("prompt_id")
    rescored, authored = by("small", "big"), by("big", "big")
    assert rescored["completion_token_ids"].to_pylist() == authored["completion_token_ids"].to_pylist()
    assert set(rescored["prompt_rendering"].to_pylist()) == {prompt_rendering(small_tokenizer)}
    engine = HFEngine(*load_model(str(chat_pair["student"])), batch_size=8)
    expected = engine.score(rescored["prompt_token_ids"].to_pylist(), rescored["completion_token_ids"].to_pylist(), 6, 1.0)
    np.testing.assert_allclose(np.concatenate(rescored["token_logprob"].to_pylist()),
                               np.concatenate([s.token_logprob for s in expected]), atol=1e-4)
    # the mixture: the token's own probability is exactly 3/4 of big's plus 1/4 of small's
    mixture = by("mixture", "big")
    mixed = np.exp(np.concatenate(mixture["token_logprob"].to_pylist()))
    parts = [np.exp(np.concatenate(table["token_logprob"].to_pylist())) for table in (authored, rescored)]
    np.testing.assert_allclose(mixed, 0.75 * parts[0] + 0.25 * parts[1], rtol=1e-4)
    assert set(mixture["teacher"].to_pylist()) == {"mixture(big=0.75, small=0.25)"}

    _, lineage = query(store, "SELECT input_versions FROM lineage WHERE asset = 'teacher_labeled'")
    inputs = json.loads(lineage[0][0])
    assert inputs["teacher_model[small]"] == Store(distill_home).read_card("teachers/small").weights_hash
    assert store.read_card("teacher").other_teachers == {"small": inputs["teacher_model[small]"]}

    # exports: each response once, or one teacher's rows; axolotl's signal asks which teacher
    for teacher, rows_written in [(None, 9), ("mixture", 9), ("small", 9)]:
        assert distill(["export", "teacher_labeled", "--format", "trl", "--out", str(tmp_path / f"trl-{teacher}"),
                        *(["--teacher", teacher] if teacher else [])]) == 0
        assert pq.read_table(tmp_path / f"trl-{teacher}" / "train.parquet").num_rows == rows_written
    assert distill(["export", "teacher_labeled", "--format", "axolotl", "--out", str(tmp_path / "axolotl"),
                    "--tokenizer", str(chat_pair["student"])]) != 0
    assert "name the one to export (--teacher" in capsys.readouterr().err

    # rounds and judgments name one of the teachers (teacher_feedback's teacher, the judgments' judged_by)
    name, card = round_teacher(store, "r002", "teacher_model[small]")
    assert (name, card.name, card.weights_hash) == ("teacher_model[small]", "teacher_model[small]", inputs["teacher_model[small]"])
    assert teacher_card(store, "teacher_model[big]") == teacher_card(store, "teacher_model") == store.read_card("teacher")
    with pytest.raises(ValueError, match=r"they are \['big', 'small'\]"):
        teacher_card(store, "teacher_model[nobody]")

    # a student trains on the rows of the teachers it names, and is told when none are there
    student, tokenizer = load_model(str(chat_pair["student"]))
    paths = [str(p) for p in store.shard_paths("teacher_labeled")]
    batches = batches_for(student, tokenizer, TrainingSettings(teachers=["mixture"], batch_size=4), paths)
    assert {t for step in range(4) for t in batches.fixed(step)["teacher_id"].to_pylist()} == {"mixture"}
    with pytest.raises(ValueError, match=r"no rows were scored by teachers \['nobody'\]"):
        batches_for(student, tokenizer, TrainingSettings(teachers=["nobody"], batch_size=4), paths)


def test_two_teachers_on_vllm(chat_pair, instance, distill_home, tmp_path, monkeypatch):
    """The same labeling with the vllm backend: both teachers' engines in one process."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "expert": "big"}) for i in range(6)))
    config = run_config(chat_pair, seeds, routing="every", scoring="every", mixture={"big": 1.0, "small": 1.0})
    vllm = {**RESOURCES, "model_engine": ModelEngine(backend="vllm", max_model_len=128, max_logprobs=8)}
    assert dg.materialize(ASSETS, instance=instance, resources=vllm, run_config=config).success
    rows = Store(distill_home).read_dataset("teacher_labeled")
    assert rows.num_rows == 6 * 2 * 3
    by = {(w, t): rows.filter(pc.and_(pc.equal(rows["written_by"], w), pc.equal(rows["teacher_id"], t))).sort_by("prompt_id")
          for w in ("big", "small") for t in ("big", "small", "mixture")}
    probability = lambda table: np.exp(np.concatenate(table["token_logprob"].to_pylist()))
    for author in ("big", "small"):
        np.testing.assert_allclose(probability(by[author, "mixture"]),
                                   0.5 * probability(by[author, "big"]) + 0.5 * probability(by[author, "small"]), rtol=1e-4)


def test_rounds_scored_by_the_mixture_and_round_robin(chat_pair, instance, distill_home, tmp_path):
    """A round's samples scored by the mixture of two teachers (the rows store it, and the round trains on
    it), and the next round's routed round-robin, each prompt's samples by one teacher."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"prompt": f"{i}*{i}=", "expert": "big"}) for i in range(12)))
    offline = dict(run_config(chat_pair, seeds)["ops"])
    evals_file = tmp_path / "evals.jsonl"
    evals_file.write_text("\n".join(json.dumps({"prompt": f"{i}-{i}="}) for i in range(4)))
    offline |= {"student_model": {"config": {"model": str(chat_pair["student"])}},
                "eval_set": {"config": {"source": "files", "files": [str(evals_file)], "task": "none", "split": "train"}},
                "offline_student": {"config": {"steps": 2, "batch_size": 4, "train_on": "teacher_labeled"}}}
    assert dg.materialize([*ASSETS, student_model, eval_set, offline_student], instance=instance, resources=RESOURCES,
                          run_config={"ops": offline}).success
    round_ops = {"student_rollouts": {"config": {"num_prompts": 8, "sampling": {"n": 2, "max_new_tokens": 8},
                                                 "prompts_from": "teacher_labeled"}},
                 "student_checkpoint": {"config": {"steps": 2, "batch_size": 4, "train_on": "teacher_labeled"}}}
    store, feedback = Store(distill_home), {}
    for key, teacher in [("r001", {"teacher": "mixture", "mixture": {"big": 1.0, "small": 3.0}}), ("r002", {"teacher": "round_robin"})]:
        instance.add_dynamic_partitions(rounds.name, [key])
        result = dg.materialize([*ASSETS, student_model, eval_set, offline_student, *ROUND], selection=ROUND, partition_key=key,
                                instance=instance, resources=RESOURCES,
                                run_config={"ops": {**round_ops, "teacher_feedback": {"config": {"k": 6, **teacher}}}})
        assert result.success
        feedback[key] = store.read_dataset("teacher_feedback", key)
    mixed = feedback["r001"].sort_by("sample_id")
    assert set(mixed["teacher"].to_pylist()) == {"mixture(big=0.25, small=0.75)"} and set(mixed["teacher_id"].to_pylist()) == {"mixture"}
    engines = {name: HFEngine(*load_model(str(chat_pair[name])), batch_size=16) for name in ("teacher", "student")}
    alone = {name: engine.score(prompt_ids_for(engine.tokenizer, mixed).to_pylist(), mixed["completion_token_ids"].to_pylist(), 6, 1.0)
             for name, engine in engines.items()}  # each in its own template
    expected = 0.25 * np.exp(np.concatenate([s.token_logprob for s in alone["teacher"]])) + \
        0.75 * np.exp(np.concatenate([s.token_logprob for s in alone["student"]]))
    np.testing.assert_allclose(np.exp(np.concatenate(mixed["token_logprob"].to_pylist())), expected, rtol=1e-4)
    _, lineage = query(store, "SELECT input_versions FROM lineage WHERE asset = 'teacher_feedback' ORDER BY created_at")
    assert json.loads(lineage[0][0])["teacher_model[small]"] == store.read_card("teachers/small").weights_hash
    routed = feedback["r002"]
    by_prompt = {}
    for prompt, teacher in zip(routed["prompt_id"].to_pylist(), routed["teacher"].to_pylist()):
        by_prompt.setdefault(prompt, set()).add(teacher)
    assert all(len(names) == 1 for names in by_prompt.values())  # a prompt's samples, one teacher
    assert set(routed["teacher"].to_pylist()) == {store.read_card("teacher").name, "teacher_model[small]"}


def test_bad_panels_fail_before_any_labeling(chat_pair, instance, distill_home, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "expert": "tiny" if i == 2 else "big"}) for i in range(4)))
    for labeling, message in [({"routing": "column"}, r"seed_prompts name \['tiny'\]"),
                              ({"scoring": "every", "mixture": {"big": 1, "huge": 1}}, r"mixture names \['huge'\]")]:
        result = dg.materialize(ASSETS, instance=instance, resources=RESOURCES, run_config=run_config(chat_pair, seeds, **labeling),
                                raise_on_error=False)
        failure = result.failure_data_for_node("teacher_labeled")
        assert failure is not None and re.search(message, failure.error.cause.message)
        assert not Store(distill_home).has_dataset("teacher_labeled")
    with pytest.raises(ValueError, match="set scoring 'every'"):
        TeacherPanel(mixture={"big": 1})


def test_round_robin_routing_is_by_prompt_and_covers_the_teachers():
    prompts = pa.table({"prompt_id": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(60)]})
    shares = routed(prompts, ["a", "b", "c"], "round_robin")
    assert set(shares) == {"a", "b", "c"} and sum(t.num_rows for t in shares.values()) == prompts.num_rows
    again = routed(prompts.slice(5), ["a", "b", "c"], "round_robin")  # another shard, the same prompts' teachers
    assert all(set(again[t]["prompt_id"].to_pylist()) <= set(shares[t]["prompt_id"].to_pylist()) for t in again)
    assert routed(prompts, ["a", "b"], "every")["b"] is prompts


def test_mixture_is_the_weighted_sum_over_the_union_of_top_k():
    rng = np.random.default_rng(0)
    tokens, vocabulary, k = 9, 40, 5
    targets = rng.integers(0, vocabulary, tokens)
    dense, signals = [], []
    for _ in range(2):
        logprobs = np.log(rng.dirichlet(np.full(vocabulary, 0.3), tokens))
        ids = np.argsort(-logprobs, axis=1)[:, :k]
        signals.append(signal_from_topk(ids, np.take_along_axis(logprobs, ids, 1), logprobs[np.arange(tokens), targets]))
        kept = np.zeros_like(logprobs)
        np.put_along_axis(kept, ids, np.exp(np.take_along_axis(logprobs, ids, 1)), 1)
        dense.append((kept, np.exp(logprobs[np.arange(tokens), targets])))
    mixed = mixed_signal(signals, np.array([0.3, 0.7]))
    expected = 0.3 * dense[0][0] + 0.7 * dense[1][0]
    top = np.sort(expected, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(np.exp(mixed.topk_logprobs), top, rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(expected, mixed.topk_ids, 1), top, rtol=1e-6)
    np.testing.assert_allclose(mixed.tail_mass, 1 - top.sum(1), atol=1e-6)
    np.testing.assert_allclose(np.exp(mixed.token_logprob), 0.3 * dense[0][1] + 0.7 * dense[1][1], rtol=1e-6)
    peaked = signal_from_topk(np.array([[0, 5]]), np.array([[np.log(0.999999), -40.0]], np.float32), np.array([-1e-6], np.float32))
    np.testing.assert_allclose(mixed_signal([peaked, peaked], np.array([0.5, 0.5])).topk_logprobs, peaked.topk_logprobs, rtol=1e-6)
    same = mixed_signal([signals[0], signals[0]], np.array([0.5, 0.5]))
    assert (same.topk_ids == signals[0].topk_ids).all() and np.allclose(same.topk_logprobs, signals[0].topk_logprobs, atol=1e-6)


def test_rows_of_another_tokenizer_are_refused_in_a_batch(chat_pair, tiny_offline_store):
    rows = Store(tiny_offline_store).read_dataset("teacher_labeled").slice(0, 8)
    hashes = rows["tokenizer_hash"].to_pylist()
    mixed = rows.set_column(rows.schema.get_field_index("tokenizer_hash"), "tokenizer_hash",
                            pa.array(hashes[:4] + ["another tokenizer"] * 4))
    student, tokenizer = load_model(str(Store(tiny_offline_store).read_card("student").path))
    assert batches_for(student, tokenizer, TrainingSettings(batch_size=8), rows).fixed(0).num_rows == 8
    with pytest.raises(ValueError, match="train on one teacher's tokenizer at a time"):
        batches_for(student, tokenizer, TrainingSettings(batch_size=8), mixed).fixed(0)

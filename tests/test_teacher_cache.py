"""The content-addressed teacher cache: hits, misses, invalidation, and labeling on vLLM."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_engine_vllm import K, assert_same_signal, hf_engine, sequences  # noqa: F401 (fixture)
from test_pipeline import ASSETS, CHECKS, run_config

from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.executor import ShardExecutor
from assets.models import teacher_model
from assets.resources import ModelEngine, close_vllm_engines, store_resource
from storage.store import Store
from training.data.rollouts import score_rollouts
from training.engines.cache import FANOUT, CachedEngine, TeacherCache
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.schema.signal import SignalSettings


def test_cache_hits_what_it_stored_and_misses_anything_else(hf_engine, tmp_path):
    prompts, completions = sequences(hf_engine)
    cache = TeacherCache(tmp_path / "cache")
    first = CachedEngine(hf_engine, cache, model_id="weights-a")
    computed = first.score(prompts, completions, K)
    assert (first.hits, first.misses) == (0, len(prompts))
    again = first.score(prompts[::-1], completions[::-1], K)  # another order, same items
    assert (first.hits, first.misses) == (len(prompts), len(prompts)) and first.hit_rate == 0.5
    for expected, got in zip(computed[::-1], again):
        assert_same_signal(expected, got, atol=0)
    for model_id, k, temperature in [("weights-b", K, 1.0), ("weights-a", K - 1, 1.0), ("weights-a", K, 2.0)]:
        other = CachedEngine(hf_engine, cache, model_id=model_id)
        other.score(prompts[:2], completions[:2], k, temperature)
        assert (other.hits, other.misses) == (0, 2)
    assert sorted(p.suffix for p in (tmp_path / "cache" / "score").iterdir()) == [".parquet"] * 4

    params = Sampling(n=2, temperature=1.0, max_new_tokens=10, seed=1)
    sampled = first.generate(prompts[:3], params)
    mixed = CachedEngine(hf_engine, cache, model_id="weights-a").generate(prompts[1:4], params)
    assert [g.completion_ids for g in mixed[:4]] == [g.completion_ids for g in sampled[2:]]
    assert [(g.prompt_index, g.sample_index) for g in mixed] == [(p, s) for p in range(3) for s in range(2)]


def test_compaction_merges_each_full_level_into_one_file_and_loses_no_row(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    calls = FANOUT * FANOUT + 1
    for i in range(calls):
        cache.put("score", pa.table({"key": [f"k{i}"], "value": [i]}))
    files = sorted(p.name.split("-")[1] if "-L" in p.name else "L0" for p in (tmp_path / "cache" / "score").glob("part-*.parquet"))
    assert files == ["L0", "L2"]  # 256 calls: 16 level-1 files, merged into one level-2 file
    found = cache.get("score", [f"k{i}" for i in range(calls)])
    assert sorted(zip(found["key"].to_pylist(), found["value"].to_pylist())) == sorted((f"k{i}", i) for i in range(calls))


def test_identical_prompts_in_one_call_are_independent_samples(hf_engine, tmp_path):
    prompt = sequences(hf_engine)[0][0]
    params = Sampling(temperature=1.0, max_new_tokens=16, seed=3)
    cached = CachedEngine(hf_engine, TeacherCache(tmp_path / "cache"), model_id="weights-a")
    first = [g.completion_ids for g in cached.generate([prompt] * 8, params)]
    assert len({tuple(c) for c in first}) > 1  # not one sample copied eight times
    again = CachedEngine(hf_engine, TeacherCache(tmp_path / "cache"), model_id="weights-a")
    assert [g.completion_ids for g in again.generate([prompt] * 8, params)] == first and again.hit_rate == 1.0


@pytest.fixture
def vllm_engine_resource():
    yield ModelEngine(backend="vllm", max_model_len=128, max_logprobs=16)
    close_vllm_engines()


def test_labeling_on_vllm_a_full_cache_hit_on_rerun_and_two_handles_in_turn(instance, distill_home, vllm_engine_resource):
    resources = {"store": store_resource, "model_engine": vllm_engine_resource, "shard_executor": ShardExecutor()}
    labeling = [teacher_model, seed_prompts, eval_set, teacher_labeled]  # what the cache concerns
    names = [a.key.to_user_string() for a in labeling]
    result = dg.materialize(ASSETS + CHECKS, selection=labeling, instance=instance, resources=resources, run_config=run_config(names))
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["sparse_signal_valid"] and checks["token_round_trip"]
    metadata = result.asset_materializations_for_node("teacher_labeled")[0].metadata
    assert metadata["engine"].value == "vllm" and metadata["cache_hit_rate"].value == 0.0
    store = Store(distill_home)
    first = store.read_dataset("teacher_labeled")
    assert first.num_rows == 48

    again = dg.materialize(
        ASSETS + CHECKS, selection=[teacher_labeled], instance=instance, resources=resources,
        run_config=run_config(["teacher_labeled"]),
    )  # fmt: skip
    assert again.success
    assert again.asset_materializations_for_node("teacher_labeled")[0].metadata["cache_hit_rate"].value == 1.0
    second = store.read_dataset("teacher_labeled")
    assert pc.all(pc.not_equal(second["run_id"], first["run_id"])).as_py()
    assert second.drop_columns(["run_id"]).equals(first.drop_columns(["run_id"]))

    # teacher_feedback holds the teacher's and the student's engines at once; on vLLM only one is
    # resident, so each handle (re)starts its engine when used. The teacher's engine is still resident
    # from the graph; the student stands in with other settings, so the two handles take turns.
    card = store.read_card("teacher")
    teacher = vllm_engine_resource.load(card)
    student = ModelEngine(backend="vllm", max_model_len=128, max_logprobs=K).load(card)
    reference_engine = HFEngine.load(card.path, batch_size=16)
    rollouts = first.select(["prompt_token_ids", "completion_token_ids"]).slice(0, 6)
    columns, _ = score_rollouts(teacher, student, rollouts, SignalSettings(k=K))
    reference, _ = score_rollouts(reference_engine, reference_engine, rollouts, SignalSettings(k=K))
    for name, depth in (("topk_logprobs", 2), ("token_logprob", 1), ("student_token_logprob", 1)):
        got, want = columns[name], reference[name]
        for _ in range(depth):
            got, want = pc.list_flatten(got), pc.list_flatten(want)
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=1e-3, rtol=0)

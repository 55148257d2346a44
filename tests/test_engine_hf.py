import pytest
import torch

from training.engines.hf import HFEngine
from training.engines.sampling import Sampling, derived_seed


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine.load(str(tiny_model_dir), batch_size=3)


def prompt_ids(engine, prompts):
    return engine.tokenizer(prompts, add_special_tokens=True)["input_ids"]


PROMPTS = ["12+7=", "305-18=", "4*9=", "999+1=", "7-7="]


def test_generate_n_per_prompt_is_seeded(engine):
    params = Sampling(n=3, temperature=1.0, max_new_tokens=12, seed=5)
    first = engine.generate(prompt_ids(engine, PROMPTS), params)
    assert [(g.prompt_index, g.sample_index) for g in first] == [(p, s) for p in range(5) for s in range(3)]
    again = engine.generate(prompt_ids(engine, PROMPTS), params)
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    other = engine.generate(prompt_ids(engine, PROMPTS), Sampling(n=3, temperature=1.0, max_new_tokens=12, seed=6))
    assert [g.completion_ids for g in first] != [g.completion_ids for g in other]
    for g in first:
        assert len(g.completion_ids) <= 12
        assert (g.finish_reason == "stop") == (g.completion_ids[-1] in engine.end_of_turn_ids)
        assert not set(g.completion_ids[:-1]) & {engine.tokenizer.pad_token_id, *engine.end_of_turn_ids}


def test_greedy_does_not_depend_on_batching(engine):
    params = Sampling(n=1, temperature=0.0, max_new_tokens=10)
    batched = engine.generate(prompt_ids(engine, PROMPTS), params)
    alone = [engine.generate(prompt_ids(engine, [p]), params)[0] for p in PROMPTS]
    assert [g.completion_ids for g in batched] == [g.completion_ids for g in alone]


def test_score_equals_an_unpadded_forward_pass(engine):
    prompts = prompt_ids(engine, PROMPTS)
    completions = [g.completion_ids for g in engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=9))]
    signals = engine.score(prompts, completions, k=5)
    for prompt, completion, signal in zip(prompts, completions, signals):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits, -1)
        top = logprobs.topk(5, -1)
        assert signal.topk_ids.shape == (len(completion), 5)
        assert (signal.topk_ids == top.indices.numpy()).all()
        torch.testing.assert_close(torch.from_numpy(signal.topk_logprobs), top.values, atol=1e-5, rtol=0)
        actual = logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.from_numpy(signal.token_logprob), actual, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(signal.tail_mass), 1 - top.values.exp().sum(-1), atol=1e-5, rtol=0)


def test_sampling_is_validated_and_its_json_and_seeds_are_stable():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        Sampling(n=0)
    with pytest.raises(ValueError, match="greedy responses would all be the same"):
        Sampling(n=2, temperature=0.0)
    with pytest.raises(ValueError, match="extra"):
        Sampling(temprature=0.5)
    # the JSON is part of every sample id: the same keys and values as ever, `stop` only when set
    assert Sampling(n=2, max_new_tokens=40).as_json() == '{"max_new_tokens": 40, "n": 2, "seed": 0, "temperature": 1.0, "top_p": 1.0}'
    assert '"stop": ["####"]' in Sampling(stop=["####"]).as_json()
    assert [derived_seed(0, part=3), derived_seed(0, 2), derived_seed(0, 2, 5), derived_seed(1, 2, 5)] == [3, 2, 7, 1007]
    assert Sampling(seed=1).derived(2, 5).seed == 1007

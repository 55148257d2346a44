import pytest
import torch

from training.engines.base import SamplingParams
from training.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine.load(str(tiny_model_dir), batch_size=3)


def prompt_ids(engine, prompts):
    return engine.tokenizer(prompts, add_special_tokens=True)["input_ids"]


PROMPTS = ["12+7=", "305-18=", "4*9=", "999+1=", "7-7="]


def test_generate_n_per_prompt_is_seeded(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5)
    first = engine.generate(prompt_ids(engine, PROMPTS), params)
    assert [(g.prompt_index, g.sample_index) for g in first] == [(p, s) for p in range(5) for s in range(3)]
    again = engine.generate(prompt_ids(engine, PROMPTS), params)
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    other = engine.generate(prompt_ids(engine, PROMPTS), SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=6))
    assert [g.completion_ids for g in first] != [g.completion_ids for g in other]
    for g in first:
        assert len(g.completion_ids) <= 12
        assert (g.finish_reason == "stop") == (g.completion_ids[-1] in engine.end_of_turn_ids)
        assert not set(g.completion_ids[:-1]) & {engine.tokenizer.pad_token_id, *engine.end_of_turn_ids}


def test_greedy_does_not_depend_on_batching(engine):
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    batched = engine.generate(prompt_ids(engine, PROMPTS), params)
    alone = [engine.generate(prompt_ids(engine, [p]), params)[0] for p in PROMPTS]
    assert [g.completion_ids for g in batched] == [g.completion_ids for g in alone]


def test_score_equals_an_unpadded_forward_pass(engine):
    prompts = prompt_ids(engine, PROMPTS)
    completions = [g.completion_ids for g in engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=9))]
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


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)

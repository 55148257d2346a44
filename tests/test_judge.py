"""The teacher as an LLM judge, for real on the chat pair's Qwen2 teacher: prompts in its chat template,
the expected score read from its top-k (checked against a forward pass of the model), both orders of a
pair, the rubric's hash, overlong prompts excluded; the text parse on fixed strings (a random model's
judgments are noise)."""

import itertools

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.feedback.judge import (
    NO_PREFERENCE,
    NO_SCORE,
    TOO_LONG,
    JudgeSettings,
    judge_candidates,
    judge_pairwise,
    judge_pointwise,
    judge_prompts,
    length_correlation,
    parse_rating,
    template_hash,
)
from training.models.chat import MESSAGES

TEMPLATE = "Rate {min_score}-{max_score}: {response} for {instruction}"  # short: the tiny teacher reads 256 tokens
PAIRWISE = "Better for {instruction}? A: {response_a} B: {response_b}"
TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def teacher(chat_pair):
    return HFEngine.load(str(chat_pair["teacher"]), batch_size=8)


def candidates(completions: list[str], prompts: list[str] | None = None) -> pa.Table:
    prompts = prompts or ["12+7=", "What is the capital of France?", "4*9="][: len(completions)]
    return pa.table({"prompt": prompts, "completion": completions})


def user_turn_ids(tokenizer, text: str) -> list[int]:
    """The judge prompt as the test renders it, straight from the tokenizer's chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)["input_ids"]


def distribution(model, ids: list[int], position: int) -> torch.Tensor:
    """softmax of the model's logits at `position` of `ids` (a forward pass of its own)."""
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, position].double(), dim=-1)


def test_the_judge_prompt_is_a_user_turn_in_the_teachers_template(teacher):
    rows = pa.table({"prompt": ["12+7=", "And 3+3?"], "messages": pa.array([None, TURNS], MESSAGES),
                     "system_prompt": [None, "You are terse."], "completion": ["19", "six"]})
    settings = JudgeSettings(template=TEMPLATE)
    rendered = [teacher.tokenizer.decode(ids) for ids in judge_prompts(teacher.tokenizer, rows, settings)]
    for text, instruction, response in zip(rendered, ["12+7=", "And 3+3?"], ["19", "six"]):
        assert text == f"<|im_start|>user\nRate 1-10: {response} for {instruction}<|im_end|>\n<|im_start|>assistant\n"
    assert "What is 2+2?" not in rendered[1] and "terse" not in rendered[1]  # the instruction is the last user turn


def test_expected_score_is_the_mean_of_the_score_tokens_at_the_score_position(teacher):
    tokenizer, model = teacher.tokenizer, teacher.model
    assert tokenizer.tokenize("Rating: 10")[-2:] == ["1", "0"]  # "10" is two tokens here: the split reading is exercised
    rows = candidates(["19", "Paris.", "36"])
    whole = JudgeSettings(template=TEMPLATE, k=len(tokenizer))  # the whole vocabulary: comparable with a forward pass
    judged = judge_pointwise(teacher, rows, whole)
    assert judged.num_rows == 3 and judged["judge_excluded"].null_count == 3

    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    one, zero = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0")
    is_digits = torch.tensor([t.isascii() and t.isdigit() for t in texts])
    answer = tokenizer("Rating: 10", add_special_tokens=False)["input_ids"]
    for instruction, response, score, mass in zip(rows["prompt"].to_pylist(), rows["completion"].to_pylist(),
                                                  judged["judge_score"].to_pylist(), judged["judge_score_mass"].to_pylist()):
        ids = user_turn_ids(tokenizer, TEMPLATE.format(min_score=1, max_score=10, response=response, instruction=instruction))
        at = len(ids) + len(answer) - 2  # where "1" of "10" stands: its logits row is at − 1
        p, after_one = distribution(model, ids + answer, at - 1), distribution(model, ids + answer, at)
        p_score = {s: 0.0 for s in range(1, 11)}
        for token, text in enumerate(texts):
            if text.strip().isascii() and text.strip().isdigit() and 1 <= int(text.strip()) <= 10:
                p_score[int(text.strip())] += p[token].item()
        p_score[1] -= p[one].item() * after_one[is_digits].sum().item()  # "1" then a digit is not the score 1
        p_score[10] += p[one].item() * after_one[zero].item()
        expected = sum(s * q for s, q in p_score.items()) / sum(p_score.values())
        assert score == pytest.approx(expected, rel=1e-5) and mass == pytest.approx(sum(p_score.values()), rel=1e-5)
        assert 1 <= score <= 10

    top20 = judge_pointwise(teacher, rows, JudgeSettings(template=TEMPLATE))  # the default k = 20: a part of that mass
    for score, mass, reason, full_mass in zip(*(top20[c].to_pylist() for c in ("judge_score", "judge_score_mass", "judge_excluded")),
                                              judged["judge_score_mass"].to_pylist()):
        assert (reason == NO_SCORE and score is None) if mass < 1e-6 else (1 <= score <= 10 and reason is None)
        assert mass <= full_mass + 1e-6


def test_the_template_hash_follows_the_rubric(teacher):
    settings = JudgeSettings(template=TEMPLATE)
    judged = judge_pointwise(teacher, candidates(["19"]), settings)
    assert judged["judge_template_hash"].to_pylist() == [template_hash(settings)]
    assert template_hash(JudgeSettings(template=TEMPLATE)) == template_hash(settings)
    others = [JudgeSettings(template=TEMPLATE + "!"), JudgeSettings(template=TEMPLATE, max_score=5),
              JudgeSettings(mode="pairwise"), JudgeSettings(mode="pairwise", pairwise_template=PAIRWISE)]
    hashes = {template_hash(s) for s in [settings, *others]}
    assert len(hashes) == 5
    assert template_hash(JudgeSettings(template=TEMPLATE, pairwise_template=PAIRWISE)) == template_hash(settings)  # not in use


def test_pairwise_asks_both_orders_and_flags_their_disagreement(teacher):
    tokenizer, model = teacher.tokenizer, teacher.model
    prompts = ["12+7=", "What is the capital of France?", "4*9="]
    first, second = candidates(["19", "Paris.", "36"], prompts), candidates(["20", "Lyon, I think.", "x" * 400], prompts)
    settings = JudgeSettings(mode="pairwise", pairwise_template=PAIRWISE, k=len(tokenizer))
    judged = judge_pairwise(teacher, first, second, settings)
    assert judged["judge_excluded"].to_pylist() == [None, None, TOO_LONG]
    assert judged["judge_preference_a"][2].as_py() is None and judged["judge_position_disagreement"][2].as_py() is None

    answer = tokenizer("Preferred: A", add_special_tokens=False)["input_ids"]
    letter = {name: tokenizer.convert_tokens_to_ids(name) for name in ("A", "B")}
    for row in range(2):
        instruction, a, b = prompts[row], first["completion"][row].as_py(), second["completion"][row].as_py()
        p_a_better = []
        for shown_first, shown_second, a_is in [(a, b, "A"), (b, a, "B")]:
            ids = user_turn_ids(tokenizer, PAIRWISE.format(instruction=instruction, response_a=shown_first, response_b=shown_second))
            p = distribution(model, ids + answer, len(ids) + len(answer) - 2)
            p_a_better.append((p[letter[a_is]] / (p[letter["A"]] + p[letter["B"]])).item())
        assert judged["judge_preference_a"][row].as_py() == pytest.approx(sum(p_a_better) / 2, rel=1e-5)
        assert judged["judge_position_disagreement"][row].as_py() == ((p_a_better[0] > 0.5) != (p_a_better[1] > 0.5))

    swapped = judge_pairwise(teacher, second.slice(0, 2), first.slice(0, 2), settings)  # the same two prompts, a and b exchanged
    for mine, theirs in zip(judged["judge_preference_a"].to_pylist()[:2], swapped["judge_preference_a"].to_pylist()):
        assert theirs == pytest.approx(1 - mine, rel=1e-5)
    assert swapped["judge_position_disagreement"].to_pylist() == judged["judge_position_disagreement"].to_pylist()[:2]
    top20 = judge_pairwise(teacher, first, second, settings.model_copy(update={"k": 20}))  # the random teacher's A, B: rarely in its top 20
    assert set(top20["judge_excluded"].to_pylist()[:2]) <= {None, NO_PREFERENCE}
    with pytest.raises(ValueError, match="the same prompt"):
        judge_pairwise(teacher, first, candidates(["1", "2", "3"]).set_column(0, "prompt", pa.array(["a", "b", "c"])), settings)


def test_a_judge_prompt_longer_than_the_context_is_excluded(teacher):
    rows = candidates(["19", "x" * 400, "36"])
    judged = judge_pointwise(teacher, rows, JudgeSettings(template=TEMPLATE, k=len(teacher.tokenizer)))
    assert judged.num_rows == 3
    assert judged["judge_excluded"].to_pylist() == [None, TOO_LONG, None]
    assert judged["judge_score"][1].as_py() is None and judged["judge_score_mass"][1].as_py() is None
    assert judged["judge_score"][0].as_py() is not None and judged["judge_score"][2].as_py() is not None
    writing = JudgeSettings(template=TEMPLATE, rationale=True, sampling=Sampling(max_new_tokens=250))  # no room left to write
    assert judge_pointwise(teacher, candidates(["19"]), writing)["judge_excluded"].to_pylist() == [TOO_LONG]


def test_written_judgments_are_parsed_and_counted(teacher):
    rows = candidates(["19", "Paris."])
    settings = JudgeSettings(template=TEMPLATE, rationale=True, sampling=Sampling(n=2, temperature=1.0, max_new_tokens=12, seed=3))
    judged = judge_pointwise(teacher, rows, settings)
    generations = teacher.generate(judge_prompts(teacher.tokenizer, rows, settings), settings.sampling)  # the same seed: the same texts
    for row in range(2):
        texts = [g.text for g in generations if g.prompt_index == row]
        ratings = [r for r in (parse_rating(t, 1, 10) for t in texts) if r is not None]
        assert judged["judge_rationale"][row].as_py() == texts[0]
        assert judged["judge_text_unparsed"][row].as_py() == 2 - len(ratings)
        assert judged["judge_text_score"][row].as_py() == (sum(ratings) / len(ratings) if ratings else None)
    plain = judge_pointwise(teacher, rows, JudgeSettings(template=TEMPLATE))
    assert plain["judge_rationale"].null_count == plain["judge_text_score"].null_count == 2


@pytest.mark.parametrize("text, rating", [
    ("Rating: 7", 7), ("**Rating:** 9/10", 9), ("rating = 3", 3), ("The score is 8/10.", 8), ("Score: **10**", 10),
    ("RATING:4\nRationale: short and right", 4), ("Rating: 1\nScore: 9", 1), ("no rating here", None), ("Rating: 11", None),
    ("Rating: 0", None), ("Rating: 7.5", None), ("I give it 7", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text, 1, 10) == rating


def test_length_correlation():
    assert length_correlation([1.0, 2.0, 3.0], [10, 20, 30]) == pytest.approx(1.0)
    assert length_correlation(pa.array([3.0, None, 1.0, 2.0]), pa.array([1, 50, 3, 2])) == pytest.approx(-1.0)
    assert length_correlation([1.0, None], [1, 2]) is None  # one pair
    assert length_correlation([5.0, 5.0, 5.0], [1, 2, 3]) is None  # no variance


def test_bad_settings_are_refused_before_any_model_call(teacher):
    with pytest.raises(ValidationError, match="needs"):
        JudgeSettings(template="Rate {instruction}")
    with pytest.raises(ValidationError, match="needs"):
        JudgeSettings(template="Rate {instruction} {response} {answer}")
    with pytest.raises(ValidationError, match="above min_score"):
        JudgeSettings(min_score=5, max_score=5)
    with pytest.raises(ValueError, match="call judge_pairwise"):
        judge_pointwise(teacher, candidates(["19"]), JudgeSettings(mode="pairwise"))
    with pytest.raises(ValueError, match="choose a scale"):  # "100" is three tokens here
        judge_pointwise(teacher, candidates(["19"]), JudgeSettings(template=TEMPLATE, max_score=100))
    with pytest.raises(ValueError, match="completion"):
        judge_pointwise(teacher, pa.table({"prompt": ["12+7="]}), JudgeSettings(template=TEMPLATE))


def test_pairwise_scores_are_win_rates_against_the_prompts_other_candidates(teacher):
    settings = JudgeSettings(mode="pairwise", pairwise_template=PAIRWISE, k=len(teacher.tokenizer))
    rows = candidates(["19", "20", "18", "Paris.", "Lyon."], ["12+7="] * 3 + ["Capital of France?"] * 2)
    rows = rows.append_column("prompt_id", pa.array(["p1"] * 3 + ["p2"] * 2))
    lone = candidates(["36"], ["4*9="]).append_column("prompt_id", pa.array(["p3"]))
    table = pa.concat_tables([rows, lone])
    scored, figures = judge_candidates(teacher, table, settings)
    wins, games = [0.0] * 6, [0] * 6
    for group in ([0, 1, 2], [3, 4]):  # every pair of a prompt once, both orders inside judge_pairwise
        for i, j in itertools.combinations(group, 2):
            preference = judge_pairwise(teacher, table.slice(i, 1), table.slice(j, 1), settings)["judge_preference_a"][0].as_py()
            wins[i], wins[j], games[i], games[j] = wins[i] + preference, wins[j] + 1 - preference, games[i] + 1, games[j] + 1
    expected = [1 + 9 * w / g for w, g in zip(wins[:5], games[:5])]
    assert scored["judge_score"].to_pylist()[:5] == pytest.approx(expected, rel=1e-5)
    assert scored["judge_score"][5].as_py() is None and scored["judge_excluded"][5].as_py() == NO_PREFERENCE  # no rival
    assert figures["judge_pairs"] == 4 and scored["judge_template_hash"][0].as_py() == template_hash(settings)

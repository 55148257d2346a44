"""Each curation filter on hand-made rows, and the selection."""

import math
import random
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pytest

from training.data.curation import CurationSettings, curate, similar_pairs
from training.schema.tables import with_constants

SURE = [-0.01, -0.02]  # a confident response: mean token logprob −0.015
SURE_TOPK = [[-0.01, -5.0], [-0.02, -4.5]]


def rows(*specs: dict) -> pa.Table:
    """Candidates with confident two-token responses unless a spec says otherwise."""
    defaults = {"completion": "#### 1", "origin": "labeled", "num_tokens": 2, "finish_reason": "stop", "correct": None,
                "answer": None, "token_logprob": SURE, "topk_logprobs": SURE_TOPK}
    full = [{"sample_id": f"s{i:02d}", **defaults, **spec} for i, spec in enumerate(specs)]
    return pa.Table.from_pylist(full, schema=pa.schema([
        ("sample_id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()), ("origin", pa.string()),
        ("num_tokens", pa.int32()), ("finish_reason", pa.string()), ("correct", pa.bool_()), ("answer", pa.string()),
        ("token_logprob", pa.list_(pa.float32())), ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]))


@dataclass
class Result:
    kept: pa.Table
    dropped: pa.Table
    funnel: list[dict]


def run_curation(candidates: pa.Table, eval_prompts: list[str], settings: CurationSettings) -> Result:
    with duckdb.connect() as connection:
        connection.register("candidates", with_constants(candidates, filename="candidates.parquet"))
        funnel = curate(connection, eval_prompts, settings).funnel
        return Result(connection.sql("SELECT * FROM kept ORDER BY sample_id").to_arrow_table(),
                      connection.sql("SELECT * FROM dropped").to_arrow_table(), funnel)


def dropped_by(result, name: str) -> dict[str, str]:
    table = result.dropped.filter(pa.compute.equal(result.dropped["filter"], name))
    return dict(zip(table["sample_id"].to_pylist(), table["reason"].to_pylist()))


LONG = "Explain how a binary search tree keeps its keys ordered when a new key is inserted"


def test_exact_duplicates_keep_the_seed_copy_and_ignore_case_and_spacing():
    result = run_curation(rows({"prompt": "12+7=", "origin": "synthesized"}, {"prompt": "  12+7=", "origin": "labeled"},
                         {"prompt": "12+7=", "completion": "#### 2"}), [], CurationSettings())
    assert dropped_by(result, "exact_duplicate") == {"s00": "exact duplicate of s01"}
    assert sorted(result.kept["sample_id"].to_pylist()) == ["s01", "s02"]  # another response to the prompt stays


def test_near_duplicates_differing_by_a_few_characters_are_dropped_and_distinct_texts_kept():
    result = run_curation(rows({"prompt": LONG}, {"prompt": LONG.replace("inserted", "insertd"), "origin": "expanded"},
                         {"prompt": LONG.upper() + "!", "origin": "evolved"},
                         {"prompt": "Write a haiku about the sea in winter, with a ship in it"}), [], CurationSettings())
    near = dropped_by(result, "near_duplicate")
    assert set(near) == {"s01", "s02"} and all(r.startswith("near duplicate of s00") for r in near.values())
    assert sorted(result.kept["sample_id"].to_pylist()) == ["s00", "s03"]


def test_near_duplicate_threshold_decides():
    pair = rows({"prompt": LONG}, {"prompt": LONG.replace("inserted", "insertd")})
    assert run_curation(pair, [], CurationSettings(near_duplicate_threshold=0.98)).kept.num_rows == 2
    assert run_curation(pair, [], CurationSettings(near_duplicate_threshold=0.7)).kept.num_rows == 1


def test_decontamination_drops_eval_items_and_shared_ngrams():
    evals = ["305-18=", "please " + LONG.lower() + " and why"]
    candidates = rows({"prompt": "305-18="}, {"prompt": "305-19="}, {"prompt": LONG}, {"prompt": "Explain binary search trees"})
    result = run_curation(candidates, evals,
                    CurationSettings())
    assert set(dropped_by(result, "decontamination")) == {"s00", "s02"}


def test_length_bounds_and_unfinished_responses():
    result = run_curation(rows({"prompt": "x" * 50}, {"prompt": "ok", "num_tokens": 9}, {"prompt": "fine", "finish_reason": "length"},
                         {"prompt": "good"}), [], CurationSettings(max_prompt_chars=40, max_response_tokens=8))
    reasons = dropped_by(result, "length")
    assert reasons == {"s00": "prompt has 50 chars > 40", "s01": "response has 9 tokens > 8",
                       "s02": "response hit max_new_tokens before <eos>"}


def test_verifier_rejects_wrong_answers_and_keeps_unverifiable_rows():
    result = run_curation(rows({"prompt": "2+2=", "correct": True, "answer": "4"}, {"prompt": "2+3=", "correct": False, "answer": "5"},
                         {"prompt": "tell a joke", "correct": None}), [], CurationSettings())
    assert dropped_by(result, "verifier") == {"s01": "the task verifier rejects the answer (expected 5)"}
    assert run_curation(rows({"prompt": "2+3=", "correct": False}), [], CurationSettings(use_verifier=False)).kept.num_rows == 1


def test_confidence_drops_unsure_responses():
    unsure = math.log(0.5)
    result = run_curation(rows({"prompt": "a b"}, {"prompt": "c d", "token_logprob": [-2.0, -1.5]},
                         {"prompt": "e f", "token_logprob": [-0.1, -0.1], "topk_logprobs": [[unsure, unsure], [unsure, unsure]]}),
                    [], CurationSettings(min_mean_logprob=-1.0, max_mean_entropy=0.5))
    reasons = dropped_by(result, "confidence")
    assert reasons["s01"] == "mean token logprob -1.750 < -1.0"
    assert reasons["s02"] == "mean top-k entropy 0.693 > 0.5"  # two tokens of 1/2: ln 2
    assert result.kept["sample_id"].to_pylist() == ["s00"]


def test_selection_prefers_quality_and_skips_near_copies_of_selected_prompts():
    long_response = {"num_tokens": 40, "token_logprob": [-0.01] * 40, "topk_logprobs": [[-0.01]] * 40}
    result = run_curation(rows({"prompt": LONG, **long_response}, {"prompt": LONG + " and removed", **long_response},
                         {"prompt": "Write a haiku about the sea"}, {"prompt": "Name three prime numbers"}),
                    [], CurationSettings(near_duplicate_threshold=0.98, target_size=2, selection_similarity=0.7))
    assert sorted(result.kept["sample_id"].to_pylist()) == ["s00", "s02"]
    selection = dropped_by(result, "selection")
    assert selection["s01"].startswith("too similar to selected s00") and selection["s03"].startswith("below the selection cut")


def test_a_row_without_a_quality_score_still_falls_below_the_cut():
    empty = {"num_tokens": 0, "token_logprob": [], "topk_logprobs": []}  # no response tokens: no mean logprob, no score
    result = run_curation(rows({"prompt": "Write a haiku about the sea"}, {"prompt": "Name three prime numbers", **empty}),
                          [], CurationSettings(min_response_tokens=0, target_size=1))
    assert result.kept["sample_id"].to_pylist() == ["s00"]
    assert dropped_by(result, "selection") == {"s01": "below the selection cut (quality score none)"}


def test_nothing_left_names_the_filter_that_removed_most():
    with pytest.raises(ValueError, match="`verifier`.*removed the most, 2 of 2"):
        run_curation(rows({"prompt": "1+1=", "correct": False}, {"prompt": "1+2=", "correct": False}), [], CurationSettings())


def test_out_of_range_thresholds_fail_at_config_time():
    with pytest.raises(ValueError, match="near_duplicate_threshold"):
        CurationSettings(near_duplicate_threshold=1.5)
    with pytest.raises(ValueError, match="min > max"):
        CurationSettings(min_prompt_chars=10, max_prompt_chars=5)


def test_funnel_counts_add_up():
    result = run_curation(rows({"prompt": "1+1=", "correct": False}, {"prompt": "1+2="}, {"prompt": "1+2="}), [], CurationSettings())
    assert [(f["filter"], f["rows_in"], f["rows_out"]) for f in result.funnel] == [
        ("length", 3, 3), ("exact_duplicate", 3, 2), ("near_duplicate", 2, 2), ("decontamination", 2, 2),
        ("verifier", 2, 1), ("confidence", 1, 1), ("selection", 1, 1)]
    assert result.dropped.num_rows == 2 and result.funnel[1]["examples"] == ["1+2= (exact duplicate of s01)"]


def test_similar_pairs_finds_the_planted_near_copies_with_their_exact_jaccard():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega tau rho chi psi".split()
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    texts += [t[:100] + "#" + t[101:] for t in texts[:30]]  # a one-character edit: J ≈ 0.95
    grams = [{t[i : i + 5] for i in range(len(t) - 4)} for t in texts]
    exact = {(i, j): len(grams[i] & grams[j]) / len(grams[i] | grams[j])
             for i in range(len(texts)) for j in range(i + 1, len(texts)) if len(grams[i] & grams[j]) >= 0.8 * len(grams[i] | grams[j])}
    assert set(exact) == {(i, 200 + i) for i in range(30)}
    with duckdb.connect() as connection:
        connection.register("texts", pa.table({"id": range(len(texts)), "text": texts}))
        similar_pairs(connection, "texts", 0.8, 5)
        found = connection.sql("SELECT * FROM pairs").to_arrow_table().to_pylist()
    assert {(p["earlier"], p["later"]): p["jaccard"] for p in found} == pytest.approx(exact)

"""The teacher as an LLM judge: it reads a rubric, the instruction and a candidate response, and answers
"Rating: <n>" (pointwise), or reads two responses and answers "Preferred: A" or "Preferred: B" (pairwise).
The judge prompt is one user turn in the teacher's own chat template (`training.models.chat.render`).

Expected score (pointwise; any model, nothing to parse): the answer prefix "Rating: " is teacher-forced,
and the judge's top-k at the position after it gives p(s) for each token that reads as an integer s in
[min_score, max_score]:

    judge_score = Σ_s s·p(s) / Σ_s p(s),    judge_score_mass = Σ_s p(s)

A score the tokenizer writes in two tokens ("10" as "1", "0") is read at the next position too, where
the digits of the top score are teacher-forced: p(10) = p("1")·p("0" | "1"), and "1" is the score 1
only when no digit follows, p(1) = p("1")·(1 − Σ_digits d p(d | "1")) (a digit making an out-of-range
number, "11", is no valid score). A judgment whose mass is below 1e-6 gives no score.

Pairwise, against position bias: each pair (a, b) is asked in both orders, p renormalized over {A, B},

    judge_preference_a = (p(A | a shown first) + p(B | b shown first)) / 2

and the two orders disagree when they prefer different candidates.

Text (`rationale`): the judge also writes its judgment with `sampling` (n samples each); `parse_rating`
reads its rating, and judge_text_score is the mean over the samples that give one.
"""

import hashlib
import json
import re
import string
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.engines.base import Engine
from training.engines.sampling import Sampling
from training.models.chat import conversations, render

RATING_PREFIX = "Rating: "
PREFERENCE_PREFIX = "Preferred: "
MIN_MASS = 1e-6
TOO_LONG = "judge prompt longer than the context"
NO_SCORE = "no score token in the judge's top-k"
NO_PREFERENCE = "no A or B token in the judge's top-k"

POINTWISE_TEMPLATE = """Rate the response to the instruction below for its helpfulness, correctness and honesty.

### Instruction
{instruction}

### Response
{response}

Rate the response on an integer scale from {min_score} (poor) to {max_score} (excellent). Answer in exactly this form:
Rating: <an integer from {min_score} to {max_score}>
Rationale: <one or two sentences>"""

PAIRWISE_TEMPLATE = """Compare the two responses to the instruction below for their helpfulness, correctness and honesty.

### Instruction
{instruction}

### Response A
{response_a}

### Response B
{response_b}

Which response is better? Answer in exactly this form:
Preferred: <A or B>"""

RATING = re.compile(r"(?:rating|score)(?:\*\*)?\s*(?::|=|is:?)\s*(?:\*\*)?\s*(\d+)(?!\d|\.\d)", re.IGNORECASE)
DIGITS = re.compile(r"[0-9]+")


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class JudgeSettings(BaseModel):
    """How the teacher judges responses as an LLM judge (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(POINTWISE_TEMPLATE, description="the pointwise rubric: {instruction} and {response} (and optionally "
                          "{min_score}, {max_score}) are filled in; the judge answers 'Rating: <n>'; literal braces as {{ }}")
    pairwise_template: str = Field(PAIRWISE_TEMPLATE, description="the pairwise rubric: {instruction}, {response_a}, {response_b}; "
                                   "the judge answers 'Preferred: A' or 'Preferred: B'")
    mode: Literal["pointwise", "pairwise"] = Field("pointwise", description="a score per response, or a preference per pair "
                                                   "(asked in both orders)")
    min_score: int = Field(1, ge=0, description="the lowest rating")
    max_score: int = Field(10, description="the highest rating")
    rationale: bool = Field(False, description="the judge also writes its judgment (rating and rationale) with `sampling`, "
                            "and the parsed ratings give judge_text_score")
    sampling: Sampling = Field(Sampling(temperature=0.0, max_new_tokens=128),
                               description="how the written judgments are sampled (n: judge samples per response)")
    k: int = Field(20, ge=1, description="top-k read at the score position (20 is the most an OpenAI-compatible server returns)")

    @model_validator(mode="after")
    def _rubrics_fit(self):
        if self.max_score <= self.min_score:
            raise ValueError(f"max_score={self.max_score} must be above min_score={self.min_score}")
        for name, required, allowed in [("template", {"instruction", "response"}, {"min_score", "max_score"}),
                                        ("pairwise_template", {"instruction", "response_a", "response_b"}, set())]:
            found = placeholders(getattr(self, name))
            if not required <= found or found - required - allowed:
                raise ValueError(f"{name} has the placeholders {sorted(found)}; it needs {sorted(required)}"
                                 f"{f' (and may have {sorted(allowed)})' if allowed else ''}; write literal braces as {{{{ }}}}")
        return self


def template_hash(settings: JudgeSettings) -> str:
    """sha256 (16 hex digits) of the rubric in use: the mode's template, and the scale for pointwise."""
    used = {"mode": settings.mode, "pairwise_template": settings.pairwise_template} if settings.mode == "pairwise" else \
        {"mode": settings.mode, "template": settings.template, "min_score": settings.min_score, "max_score": settings.max_score}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]


def parse_rating(text: str, min_score: int, max_score: int) -> int | None:
    """The first integer after "Rating" or "Score" (any case; ":", "=" or "is"; "**" markdown allowed;
    "8/10" reads 8) when it lies in [min_score, max_score]; None when there is none or it is out of range."""
    match = RATING.search(text)
    rating = int(match.group(1)) if match else None
    return rating if rating is not None and min_score <= rating <= max_score else None


def length_correlation(scores, lengths) -> float | None:
    """Pearson correlation of judge scores with response lengths over the rows where both are present
    (a judge that rewards length shows it here); None with fewer than 2 such rows or no variance."""
    scores, lengths = (pc.cast(v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v), pa.float64())
                       .to_numpy(zero_copy_only=False) for v in (scores, lengths))
    present = np.isfinite(scores) & np.isfinite(lengths)
    scores, lengths = scores[present], lengths[present]
    if len(scores) < 2 or scores.std() == 0 or lengths.std() == 0:
        return None
    return float(np.corrcoef(scores, lengths)[0, 1])


def instructions(candidates: pa.Table) -> list[str]:
    """What each candidate responds to: its conversation's last user turn (else its prompt)."""
    return [next((m["content"] for m in reversed(conversation) if m["role"] == "user"), prompt)
            for conversation, prompt in zip(conversations(candidates), candidates["prompt"].to_pylist())]


def rendered(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn in the tokenizer's chat template, as the judge sees it."""
    return render(tokenizer, pa.table({"prompt": pa.array(texts, pa.string())}))


def judge_prompts(tokenizer, candidates: pa.Table, settings: JudgeSettings) -> list[list[int]]:
    """The pointwise judge prompt of each candidate (prompt, optional messages, completion)."""
    texts = [settings.template.format(instruction=instruction, response=response, min_score=settings.min_score,
                                      max_score=settings.max_score)
             for instruction, response in zip(instructions(candidates), candidates["completion"].to_pylist())]
    return rendered(tokenizer, texts)


def pairwise_prompts(tokenizer, candidates_a: pa.Table, candidates_b: pa.Table, settings: JudgeSettings):
    """The pairwise judge prompts of each pair in both orders: (a shown as A, b shown as A)."""
    pairs = list(zip(instructions(candidates_a), candidates_a["completion"].to_pylist(), candidates_b["completion"].to_pylist()))
    fill = lambda instruction, first, second: settings.pairwise_template.format(instruction=instruction, response_a=first,
                                                                                response_b=second)
    return rendered(tokenizer, [fill(i, a, b) for i, a, b in pairs]), rendered(tokenizer, [fill(i, b, a) for i, a, b in pairs])


def answer_tokens(tokenizer, prefix: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
    """(the ids of `prefix`, the ids of each answer after it) as the tokenizer writes prefix + answer:
    the prefix ids end before the first token that goes beyond `prefix`."""
    prefix_ids, answer_ids = None, []
    for answer in answers:
        ids = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
        cut = next(n for n in range(len(ids)) if not prefix.startswith(tokenizer.decode(ids[: n + 1])))
        if prefix_ids not in (None, ids[:cut]) or tokenizer.decode(ids[cut:]).strip() != answer:
            raise ValueError(f"this tokenizer writes {prefix + answer!r} as {tokenizer.convert_ids_to_tokens(ids)}, not as the "
                             f"tokens of {prefix!r} then those of {answer!r}: the judge's answer cannot be read at one position")
        prefix_ids = ids[:cut]
        answer_ids.append(ids[cut:])
    return prefix_ids, answer_ids


def preference_answer(tokenizer) -> tuple[list[int], list[list[int]]]:
    """(the ids of "Preferred: ", the one id of A and of B after it); raises when A or B takes more tokens."""
    prefix_ids, answer_ids = answer_tokens(tokenizer, PREFERENCE_PREFIX, ["A", "B"])
    if any(len(ids) != 1 for ids in answer_ids):
        raise ValueError(f"this tokenizer writes the answers A and B as {answer_ids}, not one token each; the preference "
                         "cannot be read at one position: use mode 'pointwise'")
    return prefix_ids, answer_ids


def score_answer(tokenizer, settings: JudgeSettings) -> tuple[list[int], int, int | None]:
    """(the completion teacher-forced after the judge prompt: "Rating: " and a score's digits, the
    completion position that predicts the score, the first token of the scores written in two tokens
    or None). Raises when a score takes more tokens than that reading handles."""
    scores = [str(s) for s in range(settings.min_score, settings.max_score + 1)]
    prefix_ids, answer_ids = answer_tokens(tokenizer, RATING_PREFIX, scores)
    split = [ids for ids in answer_ids if len(ids) > 1]
    if any(len(ids) > 2 for ids in split) or len({ids[0] for ids in split}) > 1:
        raise ValueError(f"scores {settings.min_score}–{settings.max_score} take more than one token beyond one shared first "
                         f"digit on this tokenizer ({', '.join(f'{s}: {len(ids)} tokens' for s, ids in zip(scores, answer_ids))}): "
                         "choose a scale such as 1–10")
    digits = split[0] if split else answer_ids[-1]
    return prefix_ids + digits, len(prefix_ids), split[0][0] if split else None


def token_texts(tokenizer, ids: np.ndarray) -> np.ndarray:
    """The text of each token id (an object array shaped like `ids`)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.array(tokenizer.batch_decode(unique[:, None].tolist()), dtype=object)[inverse.reshape(-1)].reshape(ids.shape)


def integers(texts: np.ndarray) -> np.ndarray:
    """The integer each text writes in ASCII digits, NaN where it is anything else."""
    return np.array([float(t) if DIGITS.fullmatch(t) else np.nan for t in texts.flat], dtype=np.float64).reshape(texts.shape)


def topk_at(signals, position: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities) of the top-k at completion `position` of each signal: (rows, k) each."""
    return (np.stack([s.topk_ids[position] for s in signals]),
            np.exp(np.stack([s.topk_logprobs[position] for s in signals]).astype(np.float64)))


def expected_scores(tokenizer, signals, position: int, split_first: int | None, settings: JudgeSettings):
    """(Σ s·p(s) / Σ p(s), Σ p(s)) per signal over the valid scores in its top-k (module docstring);
    the score is NaN where the mass is below MIN_MASS."""
    ids, probs = topk_at(signals, position)
    values = integers(np.vectorize(str.strip, otypes=[object])(token_texts(tokenizer, ids)))
    if split_first is not None:  # p(first) splits into the one-token score and the two-token ones
        next_ids, next_probs = topk_at(signals, position + 1)
        following = token_texts(tokenizer, next_ids)
        is_first = ids == split_first
        p_first = (probs * is_first).sum(1, keepdims=True)
        ends = np.clip(1 - (next_probs * ~np.isnan(integers(following))).sum(1, keepdims=True), 0, 1)
        probs = np.concatenate([np.where(is_first, probs * ends, probs), p_first * next_probs], axis=1)
        values = np.concatenate([values, integers(tokenizer.decode([split_first]).strip() + following)], axis=1)
    valid = (values >= settings.min_score) & (values <= settings.max_score)
    mass = (probs * valid).sum(1)
    total = (probs * np.where(valid, values, 0)).sum(1)
    return np.where(mass >= MIN_MASS, total / np.maximum(mass, MIN_MASS), np.nan), mass


def written_judgments(engine: Engine, prompt_ids: list[list[int]], settings: JudgeSettings):
    """(mean parsed rating, the first sample's text, samples without a rating) per prompt, from
    `settings.sampling.n` written judgments each."""
    ratings = np.full((len(prompt_ids), settings.sampling.n), np.nan)
    texts = [None] * len(prompt_ids)
    for g in engine.generate(prompt_ids, settings.sampling) if prompt_ids else []:
        rating = parse_rating(g.text, settings.min_score, settings.max_score)
        ratings[g.prompt_index, g.sample_index] = np.nan if rating is None else rating
        texts[g.prompt_index] = g.text if g.sample_index == 0 else texts[g.prompt_index]
    parsed = (~np.isnan(ratings)).sum(1)
    return np.where(parsed > 0, np.nansum(ratings, 1) / np.maximum(parsed, 1), np.nan), texts, settings.sampling.n - parsed


def check_judge_input(engine: Engine, settings: JudgeSettings, mode: str, *tables: pa.Table) -> None:
    if settings.mode != mode:
        other = "judge_pairwise" if settings.mode == "pairwise" else "judge_pointwise"
        raise ValueError(f"the judge's mode is {settings.mode!r}: call {other}, or set mode={mode!r}")
    for table in tables:
        if missing := {"prompt", "completion"} - set(table.column_names):
            raise ValueError(f"candidates need the columns prompt and completion (the response text); missing {sorted(missing)}")
    if settings.k > len(engine.tokenizer):
        raise ValueError(f"k={settings.k} is larger than the vocabulary ({len(engine.tokenizer)} tokens); lower k")
    engine.check_signal(settings.k, 1.0)


def scattered(values: np.ndarray, kept: np.ndarray, kind: pa.DataType, missing=None) -> pa.Array:
    """`values` of the kept rows in their places, `missing` on the other rows; NaN and None are null."""
    out = np.full(len(kept), missing, dtype=object)
    out[kept] = values
    return pa.array(out, kind, from_pandas=True)


def judge_pointwise(engine: Engine, candidates: pa.Table, settings: JudgeSettings) -> pa.Table:
    """The teacher's judgment of each candidate (prompt, optional messages and system_prompt, completion),
    as many rows: judge_score (the expected score, null when excluded), judge_score_mass, judge_text_score,
    judge_rationale and judge_text_unparsed (with `rationale`: the written judgments' mean rating, the first
    one's text, how many gave no rating), judge_excluded (why there is no score, null when scored),
    judge_template_hash. One score call for all candidates."""
    check_judge_input(engine, settings, "pointwise", candidates)
    completion, position, split_first = score_answer(engine.tokenizer, settings)
    prompts = judge_prompts(engine.tokenizer, candidates, settings)
    room = max(len(completion), settings.sampling.max_new_tokens if settings.rationale else 0)
    fits = np.array([len(ids) + room <= engine.context_length for ids in prompts], dtype=bool)
    kept = [ids for ids, fit in zip(prompts, fits) if fit]
    scores, mass = np.zeros(0), np.zeros(0)
    if kept:
        signals = engine.score(kept, [completion] * len(kept), settings.k)
        scores, mass = expected_scores(engine.tokenizer, signals, position, split_first, settings)
    text_scores, texts, unparsed = (written_judgments(engine, kept, settings) if settings.rationale
                                    else (np.full(len(kept), None, dtype=object),) * 3)
    return pa.table({
        "judge_score": scattered(scores, fits, pa.float64()),
        "judge_score_mass": scattered(mass, fits, pa.float64()),
        "judge_text_score": scattered(text_scores, fits, pa.float64()),
        "judge_rationale": scattered(np.array(texts, dtype=object), fits, pa.string()),
        "judge_text_unparsed": scattered(unparsed, fits, pa.int32()),
        "judge_excluded": scattered(np.where(np.isnan(scores), NO_SCORE, None), fits, pa.string(), TOO_LONG),
        "judge_template_hash": pa.repeat(pa.scalar(template_hash(settings)), candidates.num_rows),
    })


def judge_pairwise(engine: Engine, candidates_a: pa.Table, candidates_b: pa.Table, settings: JudgeSettings) -> pa.Table:
    """The teacher's preference between row i of `candidates_a` and row i of `candidates_b` (the same
    prompt), asked in both orders in one score call: judge_preference_a (in [0, 1], null when excluded),
    judge_position_disagreement (the orders prefer different candidates), judge_excluded, judge_template_hash."""
    check_judge_input(engine, settings, "pairwise", candidates_a, candidates_b)
    if candidates_a.num_rows != candidates_b.num_rows or not candidates_a["prompt"].equals(candidates_b["prompt"]):
        raise ValueError("candidates_a and candidates_b must be pairs: as many rows, the same prompt on each row")
    prefix_ids, answer_ids = preference_answer(engine.tokenizer)
    completion = prefix_ids + answer_ids[0]
    a_first, b_first = pairwise_prompts(engine.tokenizer, candidates_a, candidates_b, settings)
    fits = np.array([max(len(x), len(y)) + len(completion) <= engine.context_length for x, y in zip(a_first, b_first)], dtype=bool)
    kept = [ids for ids, fit in zip(a_first, fits) if fit] + [ids for ids, fit in zip(b_first, fits) if fit]
    pairs = len(kept) // 2
    preference, disagree = np.zeros(0), np.zeros(0, dtype=object)
    if kept:
        ids, probs = topk_at(engine.score(kept, [completion] * len(kept), settings.k), len(prefix_ids))
        letters = np.vectorize(str.strip, otypes=[object])(token_texts(engine.tokenizer, ids))
        p_a, p_b = (probs * (letters == "A")).sum(1), (probs * (letters == "B")).sum(1)
        answered = p_a + p_b >= MIN_MASS
        p_a = p_a / np.maximum(p_a + p_b, MIN_MASS)  # renormalized over {A, B}
        a_shown_first, b_shown_first = p_a[:pairs], 1 - p_a[pairs:]  # both: the probability that candidate a is better
        valid = answered[:pairs] & answered[pairs:]
        preference = np.where(valid, (a_shown_first + b_shown_first) / 2, np.nan)
        disagree = np.where(valid, (a_shown_first - 0.5) * (b_shown_first - 0.5) < 0, None)
    return pa.table({
        "judge_preference_a": scattered(preference, fits, pa.float64()),
        "judge_position_disagreement": scattered(disagree, fits, pa.bool_()),
        "judge_excluded": scattered(np.where(np.isnan(preference), NO_PREFERENCE, None), fits, pa.string(), TOO_LONG),
        "judge_template_hash": pa.repeat(pa.scalar(template_hash(settings)), candidates_a.num_rows),
    })


def judge_candidates(engine: Engine, candidates: pa.Table, settings: JudgeSettings) -> tuple[pa.Table, dict]:
    """Every candidate's judge score in the settings' mode: pointwise, the expected score
    (`judge_pointwise`); pairwise, its win rate against the other candidates of its prompt
    (`prompt_id`), each pair judged in both orders (`judge_pairwise`), on the rubric's scale:
    min + (max − min) · (Σ preferences for it / pairs judged). Returns (the columns of
    `judge_pointwise`: judge_score, judge_excluded, judge_template_hash, …; figures)."""
    if settings.mode == "pointwise":
        return judge_pointwise(engine, candidates, settings), {}
    pairs = [(i, j) for rows in _rows_by_prompt(candidates["prompt_id"].to_pylist()) for k, i in enumerate(rows) for j in rows[k + 1:]]
    first, second = np.array([i for i, _ in pairs], np.int64), np.array([j for _, j in pairs], np.int64)
    judged = judge_pairwise(engine, candidates.take(first), candidates.take(second), settings) if pairs else None
    wins, games = np.zeros(len(candidates)), np.zeros(len(candidates))
    if judged is not None:
        preference = judged["judge_preference_a"].to_numpy(zero_copy_only=False).astype(np.float64)
        valid = ~np.isnan(preference)
        np.add.at(wins, first[valid], preference[valid])
        np.add.at(wins, second[valid], 1 - preference[valid])
        np.add.at(games, first[valid], 1)
        np.add.at(games, second[valid], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(games > 0, settings.min_score + (settings.max_score - settings.min_score) * wins / games, np.nan)
    disagreements = judged["judge_position_disagreement"].drop_null() if judged is not None else pa.array([], pa.bool_())
    figures = {"judge_pairs": len(first), "judge_position_disagreement": pc.mean(pc.cast(disagreements, pa.float64())).as_py()
               if len(disagreements) else None}
    return pa.table({
        "judge_score": pa.array(score, pa.float64(), from_pandas=True),
        "judge_pairs_judged": pa.array(games, pa.int32()),
        "judge_excluded": pa.array([None if g else NO_PREFERENCE for g in games], pa.string()),
        "judge_template_hash": pa.repeat(pa.scalar(template_hash(settings)), len(candidates)),
    }), figures


def _rows_by_prompt(prompts: list) -> list[list[int]]:
    """Row indices grouped by prompt, in row order."""
    groups: dict = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    return list(groups.values())


def check_rubric(tokenizer, settings: JudgeSettings) -> None:
    """Raises, before any model call, when the judge's answer cannot be read from this tokenizer at
    one position (the score after "Rating: ", or A and B after "Preferred: ")."""
    score_answer(tokenizer, settings) if settings.mode == "pointwise" else preference_answer(tokenizer)

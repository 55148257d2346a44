"""Judgments: the teacher assesses candidate responses (a round's student rollouts, teacher responses,
any stored dataset of responses), one row per candidate, each judge a column of its own:

    verifier    the task's reward r ∈ {0, 1} where the prompt has a reference answer; null otherwise
    likelihood  the teacher's mean token logprob of the response, (1/|y|) Σ_t log p(y_t | x, y_<t), read from
                the stored signal (teacher_feedback, teacher_labeled: no model call); candidates without it
                are scored by the teacher first
    judge       the teacher as an LLM judge, a rubric score in [1, 10] (judge.py): the expected score, or with
                `mode: pairwise` the candidate's win rate against the others of its prompt on that scale

and `score` = Σ_j w_j · s_j over the judges that gave a score (null when none did), the weights
`JudgmentSettings.weights`. The default, verifier 1 and likelihood 0.1, ranks correct answers first and
among equals the one the teacher finds likelier (survey: the teacher as reward, and its likelihood
as a distilled preference).

`correction` (Xu et al.'s corrective feedback): for a candidate the verifier rejects (or, without
one, scores below `correct_below`), the teacher keeps the student's prefix up to its first wrong step
where the task can tell (`Task.first_error`), else up to the first token the teacher finds unlikely
(log p(y_t) < `cut_logprob`), and writes the rest itself. The correction is a candidate of its own
(`origin` 'correction', `corrects` the sample it corrects, `correction_cut` the tokens kept and
`correction_cut_by` 'task' or 'likelihood'), judged like the others; preference pairs take it as
chosen against the response it corrects.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from training.data.labeling import score, with_columns
from training.data.rollouts import sequence_sums
from training.engines.base import Engine, shortest_prefix
from training.engines.sampling import Sampling
from training.feedback.judge import JudgeSettings, judge_candidates, length_correlation, template_hash
from training.feedback.pairs import PROMPT
from training.models.chat import prompt_ids_for
from training.schema.signal import SignalSettings
from training.schema.tables import parquet, with_constants, with_content_id

if TYPE_CHECKING:
    from training.tasks import Task

JUDGES = ("verifier", "likelihood", "judge")
SIGNAL_COLUMNS = ["topk_ids", "topk_logprobs", "token_logprob", "tail_mass", "k", "temperature", "logprob_mode", "codec"]


class CorrectionSettings(BaseModel):
    """How the teacher corrects a rejected response."""

    cut_logprob: float = Field(math.log(0.05), lt=0, description="the student's prefix is kept up to the first token whose "
                               "teacher logprob is below this (default log 0.05)")
    correct_below: Optional[float] = Field(None, description="without a verifier verdict, candidates whose combined score is below "
                                           "this are corrected; empty: those below the best of their prompt")
    sampling: Sampling = Field(Sampling(temperature=0.0, max_new_tokens=96), description="how the teacher writes the rest "
                               "(max_new_tokens: the continuation's own budget, after the kept prefix)")


class JudgmentSettings(SignalSettings):
    """Which judges assess each candidate and how their scores combine (and, inherited, the teacher
    signal stored on candidates that come without one)."""

    judges: list[str] = Field(["verifier", "likelihood"], description="the judges to run: 'verifier', "
                                          "'likelihood', 'judge' (the teacher as an LLM judge, one more model call per candidate)")
    weights: dict[str, float] = Field({"verifier": 1.0, "likelihood": 0.1, "judge": 0.1},
                                      description="judge → weight in the combined score")
    judge: JudgeSettings = Field(JudgeSettings(), description="the LLM judge's rubric, mode and sampling")
    correct: bool = Field(False, description="the teacher corrects rejected candidates (the corrections become candidates)")
    correction: CorrectionSettings = Field(CorrectionSettings(), description="how corrections are cut and written")

    @model_validator(mode="after")
    def _weights_known(self):
        if unknown := (set(self.weights) | set(self.judges)) - set(JUDGES):
            raise ValueError(f"unknown judges {sorted(unknown)}: the judges are {list(JUDGES)}")
        if not self.judges:
            raise ValueError("no judges: choose one or more of 'verifier', 'likelihood', 'judge'")
        return self


def with_teacher_signal(teacher: Engine, candidates: pa.Table, settings: SignalSettings) -> tuple[pa.Table, int]:
    """`candidates` with the teacher's signal (top-k, token logprob, tail mass) on every response
    token: as stored where a row has it, else scored now (at `settings`: the judgments asset makes them
    the stored rows' k and temperature, so one dataset holds one kind of signal). Returns (table, rows scored)."""
    stored = candidates["token_logprob"].is_valid() if "token_logprob" in candidates.column_names else pa.repeat(False, len(candidates))
    missing = pc.invert(stored)
    scored = pc.sum(missing).as_py() or 0
    if not scored:
        return candidates, 0
    order = pa.array(range(len(candidates)), pa.int64())
    unscored = candidates.append_column("_row", order).filter(missing)
    columns, _ = score(teacher, unscored, settings.k, settings.signal_temperature, settings.logprob_dtype)
    columns = pa.table({name: columns[name].cast(candidates.schema.field(name).type) if name in candidates.column_names else columns[name]
                        for name in columns.column_names})  # the stored rows' types (float16 logprobs stay float16)
    unscored = with_columns(unscored.drop_columns([c for c in SIGNAL_COLUMNS if c in unscored.column_names]), columns)
    rows = pa.concat_tables([candidates.append_column("_row", order).filter(stored), unscored], promote_options="permissive")
    return rows.sort_by("_row").drop_columns(["_row"]), scored


def mean_token_logprob(token_logprob: pa.ChunkedArray | pa.Array) -> pa.Array:
    """(1/|y|) Σ_t log p(y_t | …) per row (null for an empty response)."""
    lengths = pc.list_value_length(token_logprob).to_numpy(zero_copy_only=False).astype(np.float64)
    sums = sequence_sums(token_logprob).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pa.array(np.where(lengths > 0, sums / np.maximum(lengths, 1), np.nan), pa.float64(), from_pandas=True)


def combined_score(table: pa.Table, weights: dict[str, float], judges: list[str]) -> pa.Array:
    """Σ_j w_j · s_j over the judges that scored the row; null where none did."""
    total = np.zeros(table.num_rows)
    scored = np.zeros(table.num_rows, dtype=bool)
    for judge in judges:
        values = pc.cast(table[judge], pa.float64()).to_numpy(zero_copy_only=False)
        present = ~np.isnan(values)
        total += np.where(present, weights.get(judge, 1.0) * np.nan_to_num(values), 0.0)
        scored |= present
    return pa.array(np.where(scored, total, np.nan), pa.float64(), from_pandas=True)


def first_unlikely(token_logprob: pa.ChunkedArray | pa.Array, threshold: float) -> np.ndarray:
    """Per row, the index of the first token with teacher logprob < `threshold` (the response's length when none)."""
    token_logprob = token_logprob.combine_chunks() if isinstance(token_logprob, pa.ChunkedArray) else token_logprob
    lengths = pc.list_value_length(token_logprob).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    below = np.flatnonzero(pc.list_flatten(token_logprob).to_numpy(zero_copy_only=False) < threshold)
    rows = np.searchsorted(starts, below, side="right") - 1  # the row of each unlikely token
    cut = lengths.copy()
    np.minimum.at(cut, rows, below - starts[rows])
    return cut


def token_at(tokenizer, ids: list[int], offset: int) -> int:
    """The index of the token of `ids` whose decoded text holds character `offset` (len(ids) past the end)."""
    past = shortest_prefix(tokenizer, ids, lambda text: len(text) > offset)
    return len(ids) if past is None else past - 1


def correction_cuts(tokenizer, rejected: pa.Table, settings: CorrectionSettings, task: "Task") -> tuple[np.ndarray, list[str]]:
    """Per rejected candidate, the tokens a correction keeps and why: before the first wrong step where
    the task tells it ('task'), else before the first token the teacher finds unlikely ('likelihood'),
    and at least the last token rewritten (a kept end-of-turn token would leave the teacher nothing to write)."""
    lengths = pc.list_value_length(rejected["completion_token_ids"]).to_numpy(zero_copy_only=False)
    cut = np.minimum(first_unlikely(rejected["token_logprob"], settings.cut_logprob), np.maximum(lengths - 1, 0))
    by = ["likelihood"] * len(cut)
    rows = zip(rejected["prompt"].to_pylist(), rejected["completion"].to_pylist(), rejected["completion_token_ids"].to_pylist())
    for row, (prompt, completion, ids) in enumerate(rows):
        if (offset := task.first_error(prompt, completion)) is not None:
            cut[row], by[row] = token_at(tokenizer, ids, offset), "task"
    return cut, by


def corrections(teacher: Engine, rejected: pa.Table, settings: CorrectionSettings, task: "Task") -> pa.Table:
    """The teacher's corrections of `rejected` candidates (with the teacher's token_logprob): the
    student's tokens before its first wrong step (`correction_cuts`), then the teacher's continuation,
    as candidate rows (prompt columns kept; `corrects`, `correction_cut`, `correction_cut_by`, a new
    `sample_id`). The continuation has `settings.sampling.max_new_tokens` of its own."""
    cut, by = correction_cuts(teacher.tokenizer, rejected, settings, task)
    prefixes = [ids[:c] for ids, c in zip(rejected["completion_token_ids"].to_pylist(), cut)]
    prompts = prompt_ids_for(teacher.tokenizer, rejected).to_pylist()
    sampling = Sampling(**{**settings.sampling.model_dump(), "n": 1})
    generated = teacher.generate([p + prefix for p, prefix in zip(prompts, prefixes)], sampling) if prefixes else []
    corrected = [prefix + g.completion_ids for prefix, g in zip(prefixes, generated)]
    columns = {name: rejected[name] for name in PROMPT if name in rejected.column_names}  # the rest is the correction's own
    columns |= {
        "completion_token_ids": pa.array(corrected, pa.list_(pa.int32())),
        "completion": pa.array([teacher.tokenizer.decode(ids, skip_special_tokens=True) for ids in corrected], pa.string()),
        "num_tokens": pa.array([len(ids) for ids in corrected], pa.int32()),
        "finish_reason": pa.array([g.finish_reason for g in generated], pa.string()),
        "origin": pa.repeat(pa.scalar("correction"), rejected.num_rows),
        "corrects": rejected["sample_id"], "correction_cut": pa.array(cut, pa.int32()), "correction_cut_by": pa.array(by, pa.string()),
        "sampling": pa.repeat(pa.scalar(settings.sampling.as_json()), rejected.num_rows),
    }
    return with_content_id(pa.table(columns), "sample_id", ["corrects", "completion_token_ids"])


def rejected_rows(table: pa.Table, settings: JudgmentSettings) -> pa.Array:
    """Which candidates a correction is written for: the verifier's zeros, or without a verifier
    verdict a combined score below `correct_below` (empty: below the best of the prompt's candidates);
    never a correction itself."""
    score = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    prompts = pc.dictionary_encode(table["prompt_id"]).combine_chunks().indices.to_numpy(zero_copy_only=False)
    best = np.full(prompts.max(initial=-1) + 1, -np.inf)
    np.fmax.at(best, prompts, score)  # NaN (no score) never wins
    below = settings.correction.correct_below
    low = pa.array(score < (best[prompts] if below is None else below))
    verdict = pc.cast(table["verifier"], pa.float64())
    rejected = pc.if_else(pc.is_null(verdict), low, pc.equal(verdict, 0.0))
    return pc.and_(pc.fill_null(rejected, False), pc.not_equal(table["origin"], "correction"))


def settings_hash(settings: JudgmentSettings) -> str:
    """16 hex digits of sha256 over every judging setting (judges, weights, rubric, correction): in each judgment_id."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


def assess(teacher: Engine, candidates: pa.Table, settings: JudgmentSettings, task: "Task") -> tuple[pa.Table, dict]:
    """Every judge of `settings.judges` on `candidates` (rows of responses, with their prompt columns),
    the combined score, and the teacher's signal where it was missing: (table, figures)."""
    judged_before = [c for c in candidates.column_names if c in (*JUDGES, "score") or c.startswith("judge_")]
    table, scored = with_teacher_signal(teacher, candidates.drop_columns(judged_before), settings)
    figures = {"candidates": table.num_rows, "teacher_scored": scored}
    scores = {"verifier": pc.cast(task.verify(table["completion"], table["answer"]), pa.float64()),
              "likelihood": mean_token_logprob(table["token_logprob"])}
    if "judge" in settings.judges:
        judged, judge_figures = judge_candidates(teacher, table, settings.judge)
        table, scores["judge"] = with_columns(table, judged), judged["judge_score"]
        figures |= {**judge_figures, "judge_template_hash": template_hash(settings.judge),
                    "judge_excluded": len(judged["judge_excluded"]) - judged["judge_excluded"].null_count,
                    "judge_length_correlation": length_correlation(judged["judge_score"], table["num_tokens"])}
    for judge in JUDGES:  # a judge not asked for leaves its column null
        table = table.append_column(judge, scores[judge] if judge in settings.judges else pa.nulls(table.num_rows, pa.float64()))
    table = table.append_column("score", combined_score(table, settings.weights, settings.judges))
    return table, figures


def judgments_table(teacher: Engine, candidates: pa.Table, settings: JudgmentSettings, task: "Task",
                    identity: dict) -> tuple[pa.Table, dict]:
    """The judged candidates, with the corrections when `settings.correct` (judged too), the judges'
    settings and `identity` on every row (judge_model, judge_weights_hash: the teacher that judged;
    judgment_run_id; round) and a `judgment_id` hashing the candidate, the judges and the judging
    teacher: (table, figures). The candidates' own columns stay (who wrote them, in which run)."""
    if "origin" not in candidates.column_names:
        candidates = candidates.append_column("origin", pa.repeat(pa.scalar("candidates"), candidates.num_rows))
    table, figures = assess(teacher, candidates, settings, task)
    for name, kind in [("corrects", pa.string()), ("correction_cut", pa.int32()), ("correction_cut_by", pa.string())]:
        table = table.append_column(name, pa.nulls(table.num_rows, kind))
    if settings.correct and (wrong := table.filter(rejected_rows(table, settings))).num_rows:
        fixed = corrections(teacher, wrong, settings.correction, task)
        if "judge" in settings.judges and settings.judge.mode == "pairwise":  # win rates against every candidate of the prompt
            table, figures = assess(teacher, pa.concat_tables([table, fixed], promote_options="permissive"), settings, task)
        else:
            fixed, _ = assess(teacher, fixed, settings, task)
            table = pa.concat_tables([table, fixed], promote_options="permissive")  # the candidates' other columns: null
        corrected = table.filter(pc.equal(table["origin"], "correction"))
        figures |= {"corrections": corrected.num_rows, "corrections_verified": pc.sum(corrected["verifier"]).as_py()}
    judges = json.dumps({"judges": settings.judges, "weights": settings.weights}, sort_keys=True)
    table = table.drop_columns([name for name in identity if name in table.column_names])
    table = with_constants(table, judges=judges, judgment_settings=settings_hash(settings), **identity)
    table = with_content_id(table, "judgment_id", ["sample_id", "judgment_settings", "judge_weights_hash", "completion_token_ids"])
    valid = table["score"].drop_null()
    figures |= {"judged": table.num_rows, "mean_score": pc.mean(valid).as_py() if len(valid) else None,
                "mean_verifier": pc.mean(table["verifier"]).as_py(), "mean_likelihood": pc.mean(table["likelihood"]).as_py()}
    return table, figures


def offline_candidates(students: list[Path], teachers: list[Path]) -> str:
    """SQL: the student's samples (`students`' shards) and, for the same prompts, the teacher's responses
    (`teachers`' shards; none: students only; several teachers' rows: each response once, its author's),
    every column kept, `origin` 'student' or 'teacher'."""
    sampled = f"SELECT COLUMNS(lambda c: c != 'origin'), 'student' AS origin FROM {parquet(students)}"
    if not teachers:
        return sampled
    authors = "AND teacher_id IS NOT DISTINCT FROM written_by" if "written_by" in duckdb.sql(
        f"SELECT * FROM {parquet(teachers)} LIMIT 0").columns else ""  # with several teachers, each response once
    return (f"{sampled} UNION ALL BY NAME SELECT COLUMNS(lambda c: c != 'origin'), 'teacher' AS origin FROM {parquet(teachers)} "
            f"WHERE prompt_id IN (SELECT prompt_id FROM {parquet(students)}) {authors}")


def by_prompt(connection: "duckdb.DuckDBPyConnection", candidates: str):  # a string: storage/catalog.py
    """The candidates of the SQL `candidates` as one row per prompt (`candidates`: its rows as a list of
    structs), so that a shard of the judging holds whole prompts (pairwise judging compares a prompt's
    candidates with each other); `ungrouped` undoes it."""
    return connection.sql(f"SELECT c.prompt_id AS prompt_key, list(c ORDER BY c.sample_id) AS candidates FROM ({candidates}) c "
                          "GROUP BY c.prompt_id ORDER BY c.prompt_id")


def ungrouped(rows: pa.Table) -> pa.Table:
    """The candidate rows of `by_prompt`'s rows."""
    return pa.Table.from_struct_array(pc.list_flatten(rows["candidates"]))


def uniform_signal(connection: "duckdb.DuckDBPyConnection", candidates: str, settings: JudgmentSettings) -> JudgmentSettings:
    """`settings` with the k and temperature of the candidates that carry the teacher's signal (those
    scored now are scored alike, and stored in their types: one dataset holds one kind of signal), or as they are."""
    if "topk_ids" not in connection.sql(f"SELECT * FROM ({candidates}) LIMIT 0").columns:
        return settings
    rows = connection.sql(f"SELECT k, temperature FROM ({candidates}) WHERE topk_ids IS NOT NULL LIMIT 1").fetchall()
    return settings.model_copy(update={"k": int(rows[0][0]), "signal_temperature": float(rows[0][1])}) if rows else settings

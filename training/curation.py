"""Curation: filters over the candidate pool, each recording why it dropped a row, then a
Deita-style selection to a target size.

Filters, in order (a row is dropped by the first that rejects it):
    length           prompt characters and response tokens within bounds; responses that hit
                     max_new_tokens before <eos> are unfinished
    exact_duplicate  the same normalized prompt and response twice (normalized: trimmed,
                     lower case, runs of whitespace as one space)
    near_duplicate   MinHash LSH on character n-grams of the normalized prompt: a prompt whose
                     estimated Jaccard similarity to an earlier kept prompt is ≥ threshold
    decontamination  the prompt shares a word n-gram with an eval prompt (texts shorter than n
                     words compare whole)
    verifier         the task verifier rejects the teacher's answer (rejection sampling)
    confidence       mean token logprob of the response < min, or mean top-k entropy
                     H_k = −Σ_{i≤k} p_i log p_i > max (the teacher was unsure)
    selection        by quality score s = exp(mean token logprob) · ln(1 + response tokens)
                     (teacher confidence × complexity), best first, skipping a candidate whose
                     prompt is ≥ `selection_similarity` similar to one already selected

"Earlier" is the origin order labeled, expanded, evolved, synthesized, then sample_id, so a seed
prompt wins over a teacher-written copy of it. Rows are Arrow tables; the work is DuckDB SQL,
except MinHash, which is datasketch.
"""

from dataclasses import dataclass
from typing import Optional

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, Field, model_validator

from training.tables import with_constants

ORIGINS = ["labeled", "expanded", "evolved", "synthesized"]
NUM_PERM = 128
MAX_SIMILARITY = 0.98  # the highest threshold MinHash LSH can band with NUM_PERM permutations
EXAMPLES_PER_FILTER = 3


class CurationSettings(BaseModel):
    """Every threshold of the filters and the selection, checked before any row is read."""

    min_prompt_chars: int = Field(1, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)
    min_response_tokens: int = Field(1, ge=0)
    max_response_tokens: int = Field(4096, ge=1)
    drop_unfinished: bool = Field(True, description="drop responses that hit max_new_tokens before <eos>")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=MAX_SIMILARITY, description="MinHash Jaccard on character shingles")
    shingle_chars: int = Field(5, ge=1)
    decontamination_ngram: int = Field(8, ge=1, description="word n-gram shared with the eval split")
    use_verifier: bool = Field(True, description="drop teacher answers the task verifier rejects")
    min_mean_logprob: float = Field(-1.0, le=0, description="teacher confidence: mean token logprob of the response")
    max_mean_entropy: float = Field(1.5, ge=0, description="teacher uncertainty: mean top-k entropy, nats")
    target_size: Optional[int] = Field(None, ge=1, description="select this many rows by quality score; empty: keep all")
    selection_similarity: float = Field(0.9, gt=0, le=MAX_SIMILARITY, description="a candidate this similar to a selected prompt is skipped")

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_prompt_chars > self.max_prompt_chars or self.min_response_tokens > self.max_response_tokens:
            raise ValueError("a length bound has min > max: swap or widen them")
        return self


@dataclass
class Curation:
    kept: pa.Table  # the candidates that passed, with score columns
    dropped: pa.Table  # sample_id, prompt, origin, filter, reason: one row per dropped candidate
    funnel: list[dict]  # per filter: filter, setting, rows_in, rows_out, examples


def normalized(column: str) -> str:
    """SQL: the normalized text of `column` (trimmed, lower case, runs of whitespace as one space),
    the one normalization of curation, decontamination and the dataset checks."""
    return f"lower(trim(regexp_replace({column}, '\\s+', ' ', 'g')))"


def candidate_pool(tables: dict[str, pa.Table]) -> pa.Table:
    """The union of `teacher_labeled` (origin `labeled`) and the written datasets in `tables`
    (`expanded`, `synthesized`: their rows carry their origin). All must come from one teacher with
    one k, so that the pool carries one teacher's signal, and sample ids must be unique."""
    labeled = tables["teacher_labeled"]
    written = {name: table for name, table in tables.items() if name != "teacher_labeled"}
    for column in ("teacher_weights_hash", "k"):
        first = pc.unique(labeled[column]).to_pylist()
        for name, table in written.items():
            if (values := pc.unique(table[column]).to_pylist()) != first:
                raise ValueError(
                    f"{name} has {column} {values} but teacher_labeled has {first}: re-materialize {name} with the same "
                    "teacher and k, so that curated carries one teacher's signal"
                )
    labeled = with_constants(labeled, origin="labeled")
    rows = pa.concat_tables([labeled, *written.values()], promote_options="permissive")
    if pc.count_distinct(rows["sample_id"]).as_py() != rows.num_rows:
        raise ValueError("sample_id is not unique across the candidate datasets; re-materialize them")
    return rows


def shared_prompts(rows: pa.Table, others: pa.Table) -> list[str]:
    """The prompts of `rows` whose normalized text is also a prompt of `others`."""
    return _sql(rows, f"SELECT prompt FROM rows WHERE {normalized('prompt')} IN (SELECT {normalized('prompt')} FROM others)",
                others=others)["prompt"].to_pylist()


def duplicate_rows(rows: pa.Table) -> int:
    """How many rows repeat an earlier row's normalized prompt and completion."""
    return _sql(rows, f"SELECT count(*) - count(DISTINCT ({normalized('prompt')}, completion)) AS n FROM rows")["n"][0].as_py()


def origin_counts(table: pa.Table) -> dict[str, int]:
    """Rows per origin."""
    counts = table["origin"].value_counts()
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def scored(candidates: pa.Table) -> pa.Table:
    """Adds normalized_prompt, origin_rank, mean_token_logprob, mean_topk_entropy, quality_score."""
    unknown = set(candidates["origin"].unique().to_pylist()) - set(ORIGINS)
    if unknown:
        raise ValueError(f"unknown origins {sorted(unknown)}; expected some of {ORIGINS}")
    ranks = ", ".join(f"'{o}'" for o in ORIGINS)
    return _sql(
        candidates,
        f"""SELECT *, {normalized('prompt')} AS normalized_prompt,
                   list_position([{ranks}], origin) AS origin_rank,
                   list_avg(token_logprob) AS mean_token_logprob,
                   list_avg(list_transform(topk_logprobs, lambda t: list_sum(list_transform(t, lambda x: -exp(x) * x))))
                       AS mean_topk_entropy,
                   exp(list_avg(token_logprob)) * ln(1 + num_tokens) AS quality_score
            FROM rows ORDER BY origin_rank, sample_id""",
    )


def curate(candidates: pa.Table, eval_prompts: list[str], settings: CurationSettings) -> Curation:
    """Runs the filters in order; raises, naming the filter that removed the most, if none are left."""
    rows = scored(candidates)
    s = settings
    verifier = "off"
    if s.use_verifier:
        verifiable = rows["correct"].null_count < rows.num_rows
        verifier = "task verifier on the teacher's answer" if verifiable else "skipped: no row has a reference answer to verify"
    steps = [
        ("length", f"prompt {s.min_prompt_chars}–{s.max_prompt_chars} chars, response {s.min_response_tokens}–"
         f"{s.max_response_tokens} tokens{', finished' if s.drop_unfinished else ''}", lambda t: _length(t, s)),
        ("exact_duplicate", "normalized prompt + response", _exact_duplicates),
        ("near_duplicate", f"Jaccard ≥ {s.near_duplicate_threshold} on {s.shingle_chars}-char shingles",
         lambda t: near_duplicates(t, s.near_duplicate_threshold, s.shingle_chars)),
        ("decontamination", f"{s.decontamination_ngram}-word n-gram shared with the eval split",
         lambda t: _contaminated(t, eval_prompts, s.decontamination_ngram)),
        ("verifier", verifier, lambda t: _verifier(t, s.use_verifier)),
        ("confidence", f"mean logprob ≥ {s.min_mean_logprob}, mean top-k entropy ≤ {s.max_mean_entropy}",
         lambda t: _confidence(t, s.min_mean_logprob, s.max_mean_entropy)),
        ("selection", f"top {s.target_size} by quality score, similarity < {s.selection_similarity}" if s.target_size else "off",
         lambda t: _select(t, s.target_size, s.selection_similarity, s.shingle_chars)),
    ]
    funnel, dropped = [], []
    for name, setting, apply in steps:
        reasons = apply(rows)  # sample_id, reason
        removed = _sql(rows, "SELECT r.sample_id, r.prompt, r.origin, q.reason FROM rows r JOIN reasons q USING (sample_id)", reasons=reasons)
        rows = _sql(rows, "SELECT * FROM rows ANTI JOIN reasons USING (sample_id) ORDER BY origin_rank, sample_id", reasons=reasons)
        removed = with_constants(removed, filter=name)
        dropped.append(removed.select(["sample_id", "prompt", "origin", "filter", "reason"]))
        funnel.append({"filter": name, "setting": setting, "rows_in": rows.num_rows + removed.num_rows, "rows_out": rows.num_rows,
                       "examples": [f"{p} ({r})" for p, r in zip(removed["prompt"].to_pylist(), removed["reason"].to_pylist())][:EXAMPLES_PER_FILTER]})
        if rows.num_rows == 0:
            worst = max(funnel, key=lambda f: f["rows_in"] - f["rows_out"])
            raise ValueError(
                f"curation left no rows: `{worst['filter']}` ({worst['setting']}) removed the most, "
                f"{worst['rows_in'] - worst['rows_out']} of {worst['rows_in']}; loosen it"
            )
    return Curation(rows.drop_columns(["normalized_prompt", "origin_rank"]), pa.concat_tables(dropped), funnel)


def _sql(rows: pa.Table, sql: str, **tables: pa.Table) -> pa.Table:
    with duckdb.connect() as connection:
        connection.register("rows", rows)
        for name, table in tables.items():
            connection.register(name, table)
        return connection.sql(sql).to_arrow_table()


def _reasons(sample_ids: list[str], reasons: list[str]) -> pa.Table:
    return pa.table({"sample_id": pa.array(sample_ids, pa.string()), "reason": pa.array(reasons, pa.string())})


def _length(rows: pa.Table, s: CurationSettings) -> pa.Table:
    return _sql(
        rows,
        f"""SELECT sample_id, CASE
                WHEN length(prompt) < {s.min_prompt_chars} THEN format('prompt has {{}} chars < {s.min_prompt_chars}', length(prompt))
                WHEN length(prompt) > {s.max_prompt_chars} THEN format('prompt has {{}} chars > {s.max_prompt_chars}', length(prompt))
                WHEN num_tokens < {s.min_response_tokens} THEN format('response has {{}} tokens < {s.min_response_tokens}', num_tokens)
                WHEN num_tokens > {s.max_response_tokens} THEN format('response has {{}} tokens > {s.max_response_tokens}', num_tokens)
                WHEN {s.drop_unfinished} AND finish_reason = 'length' THEN 'response hit max_new_tokens before <eos>'
            END AS reason FROM rows WHERE reason IS NOT NULL""",
    )


def _exact_duplicates(rows: pa.Table) -> pa.Table:
    return _sql(
        rows,
        """SELECT sample_id, format('exact duplicate of {}', first_kept) AS reason FROM (
               SELECT sample_id, first_value(sample_id) OVER same AS first_kept, row_number() OVER same AS copy
               FROM rows WINDOW same AS (PARTITION BY normalized_prompt, completion ORDER BY origin_rank, sample_id))
           WHERE copy > 1""",
    )


def shingles(text: str, size: int) -> list[bytes]:
    """Character `size`-grams of `text` (the whole text when shorter)."""
    grams = {text[i : i + size] for i in range(max(1, len(text) - size + 1))}
    return [g.encode() for g in grams]


def minhashes(texts: list[str], size: int) -> list[MinHash]:
    return MinHash.bulk([shingles(t, size) for t in texts], num_perm=NUM_PERM)


def near_duplicates(rows: pa.Table, threshold: float, size: int) -> pa.Table:
    """Walks the distinct prompts in order; one within `threshold` of a kept prompt is dropped."""
    prompts = _sql(rows, "SELECT normalized_prompt, first(sample_id ORDER BY origin_rank, sample_id) AS first_id, "
                   "min(origin_rank) AS rank FROM rows GROUP BY 1 ORDER BY rank, first_id")
    texts, first_ids = prompts["normalized_prompt"].to_pylist(), prompts["first_id"].to_pylist()
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    hashes = minhashes(texts, size)
    near: dict[str, str] = {}
    for i, (text, minhash) in enumerate(zip(texts, hashes)):
        matches = [(hashes[j].jaccard(minhash), j) for j in lsh.query(minhash)]
        best = max(matches, default=(0.0, -1))
        if best[0] >= threshold:
            near[text] = f"near duplicate of {first_ids[best[1]]} (Jaccard ≈ {best[0]:.2f})"
        else:
            lsh.insert(i, minhash)
    if not near:
        return _reasons([], [])
    found = pa.table({"normalized_prompt": list(near), "reason": list(near.values())})
    return _sql(rows, "SELECT sample_id, reason FROM rows JOIN found USING (normalized_prompt)", found=found)


def _contaminated(rows: pa.Table, eval_prompts: list[str], n: int) -> pa.Table:
    grams = lambda column: f"""CASE WHEN len(string_split({normalized(column)}, ' ')) < {n} THEN [{normalized(column)}]
        ELSE list_transform(range(1, len(string_split({normalized(column)}, ' ')) - {n} + 2),
                            lambda i: array_to_string(string_split({normalized(column)}, ' ')[i:i + {n} - 1], ' ')) END"""
    evals = pa.table({"prompt": pa.array(eval_prompts, pa.string())})
    return _sql(
        rows,
        f"""WITH eval_grams AS (SELECT DISTINCT unnest({grams('prompt')}) AS gram FROM evals),
                 row_grams AS (SELECT sample_id, unnest({grams('prompt')}) AS gram FROM rows)
            SELECT sample_id, format('shares "{{}}" with the eval split', first(gram ORDER BY gram)) AS reason
            FROM row_grams JOIN eval_grams USING (gram) GROUP BY sample_id""",
        evals=evals,
    )


def _verifier(rows: pa.Table, use: bool) -> pa.Table:
    if not use:
        return _reasons([], [])
    return _sql(rows, "SELECT sample_id, format('the task verifier rejects the answer (expected {})', answer) AS reason "
                      "FROM rows WHERE correct = false")


def _confidence(rows: pa.Table, min_logprob: float, max_entropy: float) -> pa.Table:
    return _sql(
        rows,
        f"""SELECT sample_id, CASE
                WHEN mean_token_logprob < {min_logprob} THEN format('mean token logprob {{:.3f}} < {min_logprob}', mean_token_logprob)
                WHEN mean_topk_entropy > {max_entropy} THEN format('mean top-k entropy {{:.3f}} > {max_entropy}', mean_topk_entropy)
            END AS reason FROM rows WHERE reason IS NOT NULL""",
    )


def _select(rows: pa.Table, target: int | None, similarity: float, size: int) -> pa.Table:
    """Deita-style: best quality score first; a candidate too similar to a selected prompt is skipped."""
    if target is None or rows.num_rows <= target:
        return _reasons([], [])
    ranked = _sql(rows, "SELECT sample_id, normalized_prompt, quality_score FROM rows ORDER BY quality_score DESC, sample_id")
    ids, texts, scores = (ranked[c].to_pylist() for c in ("sample_id", "normalized_prompt", "quality_score"))
    lsh = MinHashLSH(threshold=similarity, num_perm=NUM_PERM)
    selected: dict[str, tuple[str, MinHash]] = {}  # normalized prompt → (its first selected sample_id, MinHash)
    kept, dropped_ids, reasons = 0, [], []
    for sample_id, text, score, minhash in zip(ids, texts, scores, minhashes(texts, size)):
        if kept >= target:
            dropped_ids.append(sample_id)
            reasons.append(f"below the selection cut (quality score {score:.3f})")
            continue
        if text not in selected:  # another response to a selected prompt needs no similarity check
            close = max(((selected[o][1].jaccard(minhash), o) for o in lsh.query(minhash)), default=(0.0, ""))
            if close[0] >= similarity:
                dropped_ids.append(sample_id)
                reasons.append(f"too similar to selected {selected[close[1]][0]} (Jaccard ≈ {close[0]:.2f})")
                continue
            selected[text] = (sample_id, minhash)
            lsh.insert(text, minhash)
        kept += 1
    return _reasons(dropped_ids, reasons)

"""Curation: filters over the candidate pool, each recording why it dropped a row, then a
Deita-style selection to a target size.

Filters, in order (a row is dropped by the first that rejects it):
    length           prompt characters and response tokens within bounds; responses that hit
                     max_new_tokens before <eos> are unfinished
    exact_duplicate  the same normalized prompt and response twice with one teacher's signal (normalized:
                     trimmed, lower case, runs of whitespace as one space; another teacher's
                     signal on a response is another row: teacher_labeled's scoring 'every')
    near_duplicate   a prompt whose Jaccard similarity to an earlier kept prompt is ≥ threshold,
                     J(A, B) = |A ∩ B| / |A ∪ B| over the character n-grams of the normalized prompts
    decontamination  the prompt shares a word n-gram with an eval prompt (texts shorter than n
                     words compare whole)
    verifier         the task verifier rejects the teacher's answer (rejection sampling)
    confidence       mean token logprob of the response < min, or mean top-k entropy
                     H_k = −Σ_{i≤k} p_i log p_i > max (the teacher was unsure)
    selection        by quality score s = exp(mean token logprob) · ln(1 + response tokens)
                     (teacher confidence × complexity), best first, skipping a candidate whose
                     prompt is ≥ `selection_similarity` similar to one already selected

"Earlier" is the origin order labeled, expanded, evolved, synthesized, then sample_id, so a seed
prompt wins over a teacher-written copy of it.

Scale: the work is DuckDB SQL in one connection over the candidates' Parquet shards. The filters see
only the light columns and the scores (table `kept`), never the signal; the whole rows are read
back one source file at a time (`kept_rows`). A connection on disk spills past its memory limit, so
millions of candidates need no more memory than DuckDB is given. Similar prompts are found with
MinHash LSH: numpy hashes a block of shingles at a time, a DuckDB join on band buckets gives the
candidate pairs, and their Jaccard similarity is computed exactly over the shingles. Python walks
only those pairs, never every row.
"""

# Annotations stay strings, as in storage/catalog.py: an evaluated `duckdb.DuckDBPyConnection`
# outlives the interpreter and duckdb's bindings print "leaked instance" warnings at every exit.
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, model_validator

from training.schema.tables import parquet

ORIGINS = ["labeled", "expanded", "evolved", "synthesized"]
NUM_PERM = 128
MAX_SIMILARITY = 0.98  # the highest threshold MinHash LSH can band with NUM_PERM permutations
EXAMPLES_PER_FILTER = 3
SHINGLES_PER_BLOCK = 1 << 16  # shingles hashed at once (NUM_PERM × 8 bytes each: 64 MiB)
FALSE_NEGATIVE_WEIGHT = 0.9  # LSH banding: a missed pair weighs 9× a needless candidate (see `lsh_bands`)
LABELED_ORIGIN = ", 'labeled' AS origin"  # teacher_labeled's rows carry no origin column
SCORES = ["mean_token_logprob", "mean_topk_entropy", "quality_score"]


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
    selection_similarity: float = Field(0.9, gt=0, le=MAX_SIMILARITY,
                                        description="a candidate this similar to a selected prompt is skipped")

    @model_validator(mode="after")
    def _bounds_ordered(self):
        if self.min_prompt_chars > self.max_prompt_chars or self.min_response_tokens > self.max_response_tokens:
            raise ValueError("a length bound has min > max: swap or widen them")
        return self


def normalized(column: str) -> str:
    """SQL: the normalized text of `column` (trimmed, lower case, runs of whitespace as one space),
    the one normalization of curation, decontamination and the dataset checks."""
    return f"lower(trim(regexp_replace({column}, '\\s+', ' ', 'g')))"


def connect(path: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """The DuckDB database curation works in, at `path`: past `memory_limit` it spills to disk beside it."""
    return duckdb.connect(str(path), config={"memory_limit": memory_limit})


def candidate_pool(connection: duckdb.DuckDBPyConnection, sources: dict[str, list[Path]]) -> None:
    """Creates the view `candidates` over the shards of `teacher_labeled` (origin `labeled`) and of the
    written datasets in `sources` (`expanded`, `synthesized`: their rows carry their origin), with
    each row's `filename`. The written datasets' teacher and k must be teacher_labeled's (one of its
    teachers', with several), and sample ids must be unique."""
    distinct = lambda name, column: _fetch(f"SELECT DISTINCT {column} FROM {parquet(sources[name])} ORDER BY 1", connection)
    for column in ("teacher_weights_hash", "k"):
        first = distinct("teacher_labeled", column)
        for name in sources:
            if name != "teacher_labeled" and not set(values := distinct(name, column)) <= set(first):
                raise ValueError(
                    f"{name} has {column} {[v for v, in values]} but teacher_labeled has {[v for v, in first]}: re-materialize "
                    f"{name} with the same teacher and k, so that curated carries its teachers' signal"
                )
    selects = [f"SELECT *{LABELED_ORIGIN if name == 'teacher_labeled' else ''} FROM {parquet(paths, filename=True)}"
               for name, paths in sources.items()]
    connection.execute(f"CREATE OR REPLACE VIEW candidates AS {' UNION ALL BY NAME '.join(selects)}")
    if _fetch("SELECT count(*) - count(DISTINCT sample_id) FROM candidates", connection)[0][0]:
        raise ValueError("sample_id is not unique across the candidate datasets; re-materialize them")


def kept_rows(connection: duckdb.DuckDBPyConnection, sources: dict[str, list[Path]]) -> Iterator[pa.Table]:
    """The whole rows `curate` kept, with their scores, one source file at a time (in the order of
    `sources`, then origin and sample_id), all with the schema of the pool: memory is bounded by a
    file. `kept` is ordered by `file_key` (an integer: DuckDB skips row groups by its min and max), so
    each file's lookup reads only its part."""
    schema = connection.sql(f"SELECT c.* EXCLUDE (filename), {', '.join(f'k.{c}' for c in SCORES)} "
                            "FROM candidates c JOIN kept k USING (sample_id) LIMIT 0").to_arrow_table().schema
    for name, paths in sources.items():
        origin = LABELED_ORIGIN if name == "teacher_labeled" else ""
        for path in paths:
            table = connection.sql(
                f"""SELECT c.*{origin}, {', '.join(f'k.{c}' for c in SCORES)}
                    FROM {parquet([path])} c JOIN (SELECT * FROM kept WHERE file_key = hash($file)) k USING (sample_id)
                    ORDER BY k.origin_rank, c.sample_id""", params={"file": str(path)}).to_arrow_table()
            if table.num_rows:
                yield pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                                for f in schema}).cast(schema)


def shared_prompts(rows: str, others: str) -> list[str]:
    """The prompts of the relation `rows` (SQL) whose normalized text is also a prompt of `others`."""
    return [p for p, in _fetch(f"SELECT prompt FROM {rows} WHERE {normalized('prompt')} IN (SELECT {normalized('prompt')} FROM {others})")]


def duplicate_rows(rows: str) -> int:
    """How many rows of the relation `rows` (SQL) repeat an earlier row's normalized prompt and completion
    (with the same teacher's signal, when the rows name teachers)."""
    with duckdb.connect() as connection:
        scorer = ", teacher_id" if "teacher_id" in connection.sql(f"SELECT * FROM {rows} LIMIT 0").columns else ""
        return _fetch(f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {rows} "
                      f"GROUP BY {normalized('prompt')}, completion{scorer})", connection)[0][0]


def origin_counts(rows: str, connection: duckdb.DuckDBPyConnection | None = None) -> dict[str, int]:
    """Rows per origin of the relation `rows` (SQL)."""
    return dict(_fetch(f"SELECT origin, count(*) FROM {rows} GROUP BY 1 ORDER BY 1", connection))


def _fetch(sql: str, connection: duckdb.DuckDBPyConnection | None = None) -> list[tuple]:
    """The rows of `sql`, in `connection` or else a connection of its own (all of them fetched: DuckDB 2
    refuses new work on a connection while a result is unfinished)."""
    if connection is not None:
        return connection.execute(sql).fetchall()
    with duckdb.connect() as own:
        return own.execute(sql).fetchall()


@dataclass
class Curation:
    """What `curate` returns: the funnel (per filter: filter, setting, rows_in, rows_out, examples) and
    readers of the rows it kept and dropped, which stay in its database (`kept`: the light columns and
    scores of the rows that passed, with `file_key`, the hash of their file; `dropped`: sample_id,
    prompt, origin, filter, reason) and are read in pieces, so memory stays bounded."""

    connection: duckdb.DuckDBPyConnection
    funnel: list[dict]

    def kept(self, sources: dict[str, list[Path]]) -> Iterator[pa.Table]:
        return kept_rows(self.connection, sources)

    def dropped(self, rows: int) -> pa.RecordBatchReader:
        return self.connection.sql("SELECT * FROM dropped ORDER BY rowid").to_arrow_reader(rows)

    def origins(self) -> dict[str, int]:
        """Candidates and kept rows per origin: candidates_<origin>, kept_<origin>."""
        return {f"{which}_{origin}": n for which in ["candidates", "kept"] for origin, n in origin_counts(which, self.connection).items()}


def curate(connection: duckdb.DuckDBPyConnection, eval_prompts: list[str], settings: CurationSettings) -> Curation:
    """Runs the filters in order over the view `candidates` (`candidate_pool`); returns the `Curation`.
    Raises, naming the filter that removed the most, if none are left."""
    _score(connection)
    connection.execute("CREATE OR REPLACE TABLE dropped "
                       "(sample_id VARCHAR, prompt VARCHAR, origin VARCHAR, filter VARCHAR, reason VARCHAR)")
    s = settings
    verifier = "off"
    if s.use_verifier:
        verifiable = _fetch("SELECT count(correct) > 0 FROM kept", connection)[0][0]
        verifier = "task verifier on the teacher's answer" if verifiable else "skipped: no row has a reference answer to verify"
    steps = [
        ("length", f"prompt {s.min_prompt_chars}–{s.max_prompt_chars} chars, response {s.min_response_tokens}–"
         f"{s.max_response_tokens} tokens{', finished' if s.drop_unfinished else ''}", lambda: _length(s)),
        ("exact_duplicate", "normalized prompt + response", _exact_duplicates),
        ("near_duplicate", f"Jaccard ≥ {s.near_duplicate_threshold} on {s.shingle_chars}-char shingles",
         lambda: _near_duplicates(connection, s.near_duplicate_threshold, s.shingle_chars)),
        ("decontamination", f"{s.decontamination_ngram}-word n-gram shared with the eval split",
         lambda: _contaminated(connection, eval_prompts, s.decontamination_ngram)),
        ("verifier", verifier, lambda: _verifier(s.use_verifier)),
        ("confidence", f"mean logprob ≥ {s.min_mean_logprob}, mean top-k entropy ≤ {s.max_mean_entropy}",
         lambda: _confidence(s.min_mean_logprob, s.max_mean_entropy)),
        ("selection", f"top {s.target_size} by quality score, similarity < {s.selection_similarity}" if s.target_size else "off",
         lambda: _select(connection, s.target_size, s.selection_similarity, s.shingle_chars)),
    ]
    funnel = []
    for name, setting, reasons in steps:
        rows_in = _fetch("SELECT count(*) FROM kept", connection)[0][0]
        connection.execute(f"CREATE OR REPLACE TABLE reasons AS {reasons()}")
        connection.execute("INSERT INTO dropped SELECT k.sample_id, k.prompt, k.origin, $filter, r.reason "
                           "FROM kept k JOIN reasons r USING (sample_id) ORDER BY k.origin_rank, k.sample_id", {"filter": name})
        connection.execute("DELETE FROM kept WHERE sample_id IN (SELECT sample_id FROM reasons)")
        rows_out = _fetch("SELECT count(*) FROM kept", connection)[0][0]
        examples = connection.execute("SELECT format('{} ({})', prompt, reason) FROM dropped WHERE filter = $filter ORDER BY rowid "
                                      f"LIMIT {EXAMPLES_PER_FILTER}", {"filter": name}).fetchall()
        funnel.append({"filter": name, "setting": setting, "rows_in": rows_in, "rows_out": rows_out, "examples": [e for e, in examples]})
        if rows_out == 0:
            worst = max(funnel, key=lambda f: f["rows_in"] - f["rows_out"])
            raise ValueError(
                f"curation left no rows: `{worst['filter']}` ({worst['setting']}) removed the most, "
                f"{worst['rows_in'] - worst['rows_out']} of {worst['rows_in']}; loosen it"
            )
    return Curation(connection, funnel)


def _score(connection: duckdb.DuckDBPyConnection) -> None:
    """Table `kept`: the light columns of every candidate with normalized_prompt, origin_rank,
    mean_token_logprob, mean_topk_entropy and quality_score, ordered by file (`file_key`)."""
    unknown = set(origin_counts("candidates", connection)) - set(ORIGINS)
    if unknown:
        raise ValueError(f"unknown origins {sorted(unknown)}; expected some of {ORIGINS}")
    ranks = ", ".join(f"'{o}'" for o in ORIGINS)
    scorer = "teacher_id" if "teacher_id" in connection.sql("SELECT * FROM candidates LIMIT 0").columns else "NULL AS teacher_id"
    connection.execute(
        f"""CREATE OR REPLACE TABLE kept AS
            SELECT sample_id, prompt, completion, origin, num_tokens, finish_reason, correct, answer, hash(filename) AS file_key,
                   {scorer},
                   {normalized('prompt')} AS normalized_prompt,
                   list_position([{ranks}], origin) AS origin_rank,
                   list_avg(token_logprob) AS mean_token_logprob,
                   list_avg(list_transform(topk_logprobs, lambda t: list_sum(list_transform(t, lambda x: -exp(x) * x))))
                       AS mean_topk_entropy,
                   exp(list_avg(token_logprob)) * ln(1 + num_tokens) AS quality_score
            FROM candidates ORDER BY file_key, origin_rank, sample_id""")


def _length(s: CurationSettings) -> str:
    return f"""SELECT sample_id, CASE
                WHEN length(prompt) < {s.min_prompt_chars} THEN format('prompt has {{}} chars < {s.min_prompt_chars}', length(prompt))
                WHEN length(prompt) > {s.max_prompt_chars} THEN format('prompt has {{}} chars > {s.max_prompt_chars}', length(prompt))
                WHEN num_tokens < {s.min_response_tokens} THEN format('response has {{}} tokens < {s.min_response_tokens}', num_tokens)
                WHEN num_tokens > {s.max_response_tokens} THEN format('response has {{}} tokens > {s.max_response_tokens}', num_tokens)
                WHEN {s.drop_unfinished} AND finish_reason = 'length' THEN 'response hit max_new_tokens before <eos>'
            END AS reason FROM kept WHERE reason IS NOT NULL"""


def _exact_duplicates() -> str:
    return """SELECT sample_id, format('exact duplicate of {}', first_kept) AS reason FROM (
                  SELECT sample_id, first_value(sample_id) OVER same AS first_kept, row_number() OVER same AS copy
                  FROM kept WINDOW same AS (PARTITION BY normalized_prompt, completion, teacher_id ORDER BY origin_rank, sample_id))
              WHERE copy > 1"""


@functools.cache
def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands b, rows r), b·r ≤ NUM_PERM, for MinHash LSH at `threshold`: two texts of similarity s
    share a bucket with probability P(s) = 1 − (1 − s^r)^b; minimizes the weighted error
    (1 − w)·∫₀ᵗ P + w·∫ₜ¹ (1 − P) with w = FALSE_NEGATIVE_WEIGHT: a false positive costs only an exact
    Jaccard count, a false negative a missed duplicate (at 0.8: b = 14, r = 9, P(0.8) = 0.87, P(0.9) = 0.999)."""
    s = np.linspace(0, 1, 201)
    b, r = np.meshgrid(np.arange(1, NUM_PERM + 1), np.arange(1, NUM_PERM + 1), indexing="ij")
    fits = b * r <= NUM_PERM
    p = 1 - (1 - s[None, None, :] ** r[..., None]) ** b[..., None]
    error = np.where(s < threshold, (1 - FALSE_NEGATIVE_WEIGHT) * p, FALSE_NEGATIVE_WEIGHT * (1 - p)).mean(axis=-1)
    best = np.unravel_index(np.where(fits, error, np.inf).argmin(), error.shape)
    return int(b[best]), int(r[best])


def similar_pairs(connection: duckdb.DuckDBPyConnection, texts: str, threshold: float, size: int) -> None:
    """Table `pairs`: the pairs (earlier, later) of the texts in table `texts` (columns id, text) with
    Jaccard similarity `jaccard` ≥ `threshold` over their character `size`-grams (the whole text
    when shorter).

    MinHash: h_i(S) = min_{x ∈ S} ⌊((a_i·x + b_i) mod 2⁶⁴) / 2³²⌋ over 32-bit shingle hashes x, for random
    64-bit (a_i, b_i) (multiply-add-shift hashing: no division);
    texts whose signatures agree on every row of some band (`lsh_bands`) are candidates, and the
    candidates' Jaccard similarity is then counted exactly."""
    connection.execute(
        f"""CREATE OR REPLACE TABLE shingles AS
            SELECT DISTINCT id, hash(substr(text, i, {size})) >> 32 AS shingle
            FROM (SELECT id, text, unnest(range(1, greatest(2, length(text) - {size} + 2))) AS i FROM {texts}) ORDER BY id""")
    bands, rows = lsh_bands(threshold)
    rng = np.random.default_rng(1)
    a, b = (rng.integers(1, 1 << 64, bands * rows, dtype=np.uint64, endpoint=False) for _ in range(2))
    mix = rng.integers(1, 1 << 63, rows, dtype=np.uint64) | np.uint64(1)
    connection.execute("CREATE OR REPLACE TABLE buckets (id BIGINT, band INTEGER, bucket UBIGINT)")
    reading = connection.cursor()  # a second connection to the database: `connection` inserts while it reads
    reader = reading.sql("SELECT id, shingle FROM shingles ORDER BY id").to_arrow_reader(SHINGLES_PER_BLOCK)
    ids, hashes = np.empty(0, np.int64), np.empty(0, np.uint64)
    for batch in itertools.chain(reader, [None]):
        if batch is not None:
            ids = np.concatenate([ids, batch["id"].to_numpy()])
            hashes = np.concatenate([hashes, batch["shingle"].to_numpy()])
        last_id_start = int(np.searchsorted(ids, ids[-1])) if len(ids) else 0
        complete = len(ids) if batch is None else last_id_start  # the last id may continue in the next batch
        if complete:  # every shingle of ids[:complete] is here
            starts = np.flatnonzero(np.r_[True, ids[1:complete] != ids[: complete - 1]])
            values = np.multiply(hashes[:complete, None], a)  # in place from here: one (shingles × permutations) array
            values += b
            values >>= np.uint64(32)
            values = values.astype(np.uint32)
            signatures = np.minimum.reduceat(values, starts, axis=0).reshape(-1, bands, rows)
            keys = (signatures * mix).sum(axis=2, dtype=np.uint64)  # wraps mod 2⁶⁴: a hash of each band
            block = pa.table({"id": np.repeat(ids[starts], bands), "band": np.tile(np.arange(bands, dtype=np.int32), len(starts)),
                              "bucket": keys.reshape(-1)})
            connection.register("block", block)
            connection.execute("INSERT INTO buckets SELECT * FROM block")
            connection.unregister("block")
            ids, hashes = ids[complete:], hashes[complete:]
    reading.close()
    connection.execute(
        f"""CREATE OR REPLACE TABLE pairs AS
            WITH candidates AS (SELECT DISTINCT x.id AS earlier, y.id AS later FROM buckets x JOIN buckets y USING (band, bucket)
                           WHERE x.id < y.id),
                 sizes AS (SELECT id, count(*) AS n FROM shingles GROUP BY id),
                 shared AS (SELECT earlier, later, count(*) AS n FROM candidates
                            JOIN shingles x ON x.id = earlier JOIN shingles y ON y.id = later AND y.shingle = x.shingle
                            GROUP BY ALL)
            SELECT earlier, later, shared.n / (e.n + l.n - shared.n) AS jaccard
            FROM shared JOIN sizes e ON e.id = earlier JOIN sizes l ON l.id = later
            WHERE jaccard >= {threshold}""")


def later_similar(connection: duckdb.DuckDBPyConnection) -> pa.Table:
    """Walks table `pairs` (earlier, later, jaccard) by later, then earlier, a batch at a time: a text
    is dropped when it is similar to an earlier text that was not dropped. Returns (id, similar_to,
    jaccard) of the dropped texts, each with its most similar kept predecessor."""
    dropped: dict[int, tuple[int, float]] = {}
    for batch in connection.sql("SELECT earlier, later, jaccard FROM pairs ORDER BY later, earlier").to_arrow_reader(1 << 16):
        for earlier, later, jaccard in zip(*(batch[c].to_pylist() for c in ("earlier", "later", "jaccard"))):
            if earlier not in dropped and jaccard > dropped.get(later, (-1, 0.0))[1]:
                dropped[later] = (earlier, jaccard)
    return pa.table({"id": pa.array(list(dropped), pa.int64()), "similar_to": pa.array([e for e, _ in dropped.values()], pa.int64()),
                     "jaccard": pa.array([j for _, j in dropped.values()], pa.float64())})


def _similar_reasons(connection: duckdb.DuckDBPyConnection, order: str, threshold: float, size: int) -> None:
    """Tables `texts` (the distinct normalized prompts of `kept`, numbered by their first row in
    `order`, with that row's sample_id) and `similar_texts` (`later_similar` over them)."""
    connection.execute(
        f"""CREATE OR REPLACE TABLE texts AS
            SELECT row_number() OVER (ORDER BY first_row) AS id, normalized_prompt AS text, first_row.sample_id AS first_id
            FROM (SELECT normalized_prompt, min({{'key': ({order}), 'sample_id': sample_id}}) AS first_row FROM kept GROUP BY 1)""")
    similar_pairs(connection, "texts", threshold, size)
    similar = later_similar(connection)
    connection.register("similar_walk", similar)
    connection.execute("CREATE OR REPLACE TABLE similar_texts AS SELECT s.id, t.first_id AS similar_to, s.jaccard "
                       "FROM similar_walk s JOIN texts t ON t.id = s.similar_to")
    connection.unregister("similar_walk")


def _near_duplicates(connection: duckdb.DuckDBPyConnection, threshold: float, size: int) -> str:
    _similar_reasons(connection, "origin_rank, sample_id", threshold, size)
    return """SELECT k.sample_id, format('near duplicate of {} (Jaccard {:.2f})', s.similar_to, s.jaccard) AS reason
              FROM kept k JOIN texts t ON t.text = k.normalized_prompt JOIN similar_texts s USING (id)"""


def word_ngrams(column: str, n: int) -> str:
    """SQL: the word n-grams of `column`'s normalized text (a text shorter than n: the text itself),
    the decontamination rule's unit (also the harness overlap's, training/evals/harness.py)."""
    return f"""CASE WHEN len(string_split({normalized(column)}, ' ')) < {n} THEN [{normalized(column)}]
        ELSE list_transform(range(1, len(string_split({normalized(column)}, ' ')) - {n} + 2),
                            lambda i: array_to_string(string_split({normalized(column)}, ' ')[i:i + {n} - 1], ' ')) END"""


def _contaminated(connection: duckdb.DuckDBPyConnection, eval_prompts: list[str], n: int) -> str:
    connection.register("evals", pa.table({"prompt": pa.array(eval_prompts, pa.string())}))
    return f"""WITH eval_grams AS (SELECT DISTINCT unnest({word_ngrams('prompt', n)}) AS gram FROM evals),
                    row_grams AS (SELECT sample_id, unnest({word_ngrams('prompt', n)}) AS gram FROM kept)
               SELECT sample_id, format('shares "{{}}" with the eval split', first(gram ORDER BY gram)) AS reason
               FROM row_grams JOIN eval_grams USING (gram) GROUP BY sample_id"""


def _verifier(use: bool) -> str:
    return ("SELECT sample_id, format('the task verifier rejects the answer (expected {})', answer) AS reason "
            f"FROM kept WHERE {use} AND correct = false")


def _confidence(min_logprob: float, max_entropy: float) -> str:
    return f"""SELECT sample_id, CASE
                WHEN mean_token_logprob < {min_logprob} THEN format('mean token logprob {{:.3f}} < {min_logprob}', mean_token_logprob)
                WHEN mean_topk_entropy > {max_entropy} THEN format('mean top-k entropy {{:.3f}} > {max_entropy}', mean_topk_entropy)
            END AS reason FROM kept WHERE reason IS NOT NULL"""


def _select(connection: duckdb.DuckDBPyConnection, target: int | None, similarity: float, size: int) -> str:
    """Deita-style: best quality score first; a candidate whose prompt is too similar to a selected
    prompt is skipped (another response to a selected prompt is not); the rest up to `target` are kept."""
    if target is None or _fetch("SELECT count(*) FROM kept", connection)[0][0] <= target:
        return "SELECT sample_id, NULL::VARCHAR AS reason FROM kept WHERE false"
    _similar_reasons(connection, "-quality_score, sample_id", similarity, size)
    return f"""WITH ranked AS (
                   SELECT k.sample_id, k.quality_score, s.similar_to, s.jaccard, s.id IS NOT NULL AS skipped,
                          coalesce(sum(CASE WHEN s.id IS NULL THEN 1 ELSE 0 END) OVER (
                              ORDER BY k.quality_score DESC, k.sample_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                              AS selected_before
                   FROM kept k JOIN texts t ON t.text = k.normalized_prompt LEFT JOIN similar_texts s USING (id))
               SELECT sample_id, CASE
                   WHEN selected_before >= {target} THEN format('below the selection cut (quality score {{}})',
                                                                coalesce(printf('%.3f', quality_score), 'none'))
                   WHEN skipped THEN format('too similar to selected {{}} (Jaccard {{:.2f}})', similar_to, jaccard)
               END AS reason FROM ranked WHERE reason IS NOT NULL"""

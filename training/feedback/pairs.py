"""Preference pairs and ranked lists from judgments (judgments.py), for the ranking objectives
(training/trainer/ranking.py).

A pair policy picks, per prompt, chosen/rejected responses among its judged candidates:

    best_vs_worst   the best-scored against the worst (Zephyr's dDPO on UltraFeedback: best vs a random other;
                    this is its sharpest variant)
    best_vs_random  the best against lower-scored ones drawn at random (seeded), up to `max_pairs_per_prompt`
    all             every (higher, lower) combination, largest margins first, up to `max_pairs_per_prompt`

A pair needs margin = score_chosen − score_rejected > `min_margin` (ties never pair) and two
different responses (copies of one sample differ in likelihood by float noise alone). With
`corrections`, every teacher correction is also chosen against the response it corrects, whatever
their scores, unless the verifier rejects the correction too (corrective feedback). Each pair keeps
both responses' token ids, texts, sample ids, judgment ids and scores, its prompt's round, the
judging teacher, and the teacher's signal on both where the candidates carry it.

DPO's reference is the parent checkpoint π_ref: `with_reference_logprobs` stores
log π_ref(y | x) = Σ_t log π_ref(y_t | x, y_<t) (T = 1) of both responses, once, keyed by the
reference's weights hash, so training holds one model.
"""

from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa
from pydantic import BaseModel, Field

from training.data.labeling import score
from training.data.rollouts import PROMPT_COLUMNS, sequence_sums
from training.engines.base import Engine
from training.models.chat import prompt_rendering
from training.schema.tables import content_id, parquet

PROMPT = [*PROMPT_COLUMNS, "prompt_token_ids", "prompt_rendering", "round"]  # a pair's prompt columns (and its round)
RESPONSE_SIGNAL = ["topk_ids", "topk_logprobs", "tail_mass"]  # chosen_/rejected_ columns where the candidates carry the signal
SIGNAL_STAMPS = ["k", "temperature", "logprob_mode", "codec"]  # one value for a whole judgments dataset (judge's SignalSettings)


class PairPolicy(BaseModel):
    """How judged candidates become chosen/rejected pairs (module docstring)."""

    strategy: Literal["best_vs_worst", "best_vs_random", "all"] = Field("best_vs_worst", description="which pairs per prompt")
    min_margin: float = Field(0.0, ge=0, description="a pair needs score_chosen − score_rejected above this (ties never pair)")
    max_pairs_per_prompt: int = Field(1, ge=1, description="at most this many pairs per prompt (corrections aside)")
    corrections: bool = Field(True, description="each teacher correction chosen against the response it corrects")
    seed: int = Field(0, description="draws best_vs_random's rejected responses")

    def name(self) -> str:
        return self.model_dump_json()


def pair_columns(judgments: list[str]) -> str:
    """SQL: the prompt columns, then chosen_/rejected_ columns of candidates `c` and `r`."""
    response = {"_token_ids": "completion_token_ids", "": "completion", "_sample_id": "sample_id", "_score": "score",
                "_judgment_id": "judgment_id"}
    response |= {f"_{name}": name for name in RESPONSE_SIGNAL if name in judgments}
    shared = [f"c.{name}" for name in [*PROMPT, "judge_weights_hash", *SIGNAL_STAMPS] if name in judgments]
    sides = [f"{side[0]}.{column} AS {side}{suffix}" for side in ("chosen", "rejected") for suffix, column in response.items()
             if column in judgments]
    return ", ".join(shared + sides)


def judged(connection: "duckdb.DuckDBPyConnection", judgments: pa.Table | list[Path]) -> list[str]:  # a string: storage/catalog.py
    """Makes `judgments` (a table, or the Parquet shards of a judgments dataset) the view `judgments`; returns its columns."""
    if isinstance(judgments, pa.Table):
        connection.register("judgments", judgments)
    else:
        connection.sql(f"CREATE VIEW judgments AS SELECT * FROM {parquet(judgments)}")
    return connection.sql("SELECT * FROM judgments LIMIT 0").columns


def pairs_relation(connection: "duckdb.DuckDBPyConnection", judgments: pa.Table | list[Path], policy: PairPolicy):
    """The pairs `policy` picks from `judgments` (one row per judged candidate: `score`, `corrects`,
    `verifier`, `judgment_id`), as a DuckDB relation of `connection` (stream it to a file: memory stays
    DuckDB's): one row per pair with `margin`, `kind` ('judged' or 'correction'), `policy` and
    `pair_id`, in a fixed order. A correction is paired against the response it corrects only as a
    correction (never twice), and only when the verifier does not reject it."""
    columns = judged(connection, judgments)
    if "topk_ids" in columns:
        stamps = connection.sql(f"SELECT count(DISTINCT ({', '.join(SIGNAL_STAMPS)})) FROM judgments WHERE topk_ids IS NOT NULL")
        if stamps.fetchall()[0][0] > 1:
            raise ValueError("these judgments carry the teacher's signal at more than one (k, temperature): judge them again in "
                             "one run (the judgments asset scores every candidate alike)")
    first = {"best_vs_worst": "c.score DESC, r.score ASC", "all": "c.score - r.score DESC",
             "best_vs_random": "hash(c.sample_id || r.sample_id || $seed)"}[policy.strategy]
    best_only = "AND c.place = 1" if policy.strategy != "all" else ""
    own_original = "AND NOT coalesce(c.corrects = r.sample_id, false)" if policy.corrections else ""
    select = pair_columns(columns)
    return connection.sql(
        f"""WITH judged AS (SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY score DESC, sample_id) AS place
                            FROM judgments WHERE score IS NOT NULL AND NOT isnan(score)),
                 ranked AS (SELECT {select}, c.score - r.score AS margin, 'judged' AS kind,
                                   row_number() OVER (PARTITION BY c.prompt_id ORDER BY {first}, c.sample_id, r.sample_id) AS pick
                            FROM judged c JOIN judged r ON c.prompt_id = r.prompt_id AND c.score - r.score > $margin {best_only}
                                                           AND c.completion_token_ids <> r.completion_token_ids {own_original}),
                 corrected AS (SELECT {select}, c.score - r.score AS margin, 'correction' AS kind, 1 AS pick
                               FROM judgments c JOIN judgments r ON c.corrects = r.sample_id
                               WHERE $corrections AND coalesce(c.verifier, 1) > 0),
                 pairs AS (SELECT * EXCLUDE (pick) FROM ranked WHERE pick <= $m
                           UNION ALL BY NAME SELECT * EXCLUDE (pick) FROM corrected)
            SELECT *, {content_id(["chosen_sample_id", "rejected_sample_id", "policy"])} AS pair_id
            FROM (SELECT *, $policy AS policy FROM pairs)
            ORDER BY prompt_id, kind, margin DESC, chosen_sample_id, rejected_sample_id""",
        params={"margin": policy.min_margin, "m": policy.max_pairs_per_prompt, "corrections": policy.corrections,
                "policy": policy.name(), **({"seed": str(policy.seed)} if policy.strategy == "best_vs_random" else {})},
    )


def pair_figures(connection: "duckdb.DuckDBPyConnection", pairs: str) -> dict:
    """What a pairing gave, from the SQL relation `pairs` and the view `judgments`."""
    (count, with_pairs, corrected, margin), = connection.sql(
        f"SELECT count(*), count(DISTINCT prompt_id), count(*) FILTER (kind = 'correction'), avg(margin) FROM {pairs}").fetchall()
    prompts = connection.sql("SELECT count(DISTINCT prompt_id) FROM judgments").fetchall()[0][0]
    return {"pairs": count, "prompts": prompts, "prompts_with_pairs": with_pairs, "correction_pairs": corrected, "mean_margin": margin}


def preference_pairs(judgments: pa.Table | list[Path], policy: PairPolicy) -> tuple[pa.Table, dict]:
    """`pairs_relation` in memory, with its figures (tests, benchmarks; the assets stream it to a file)."""
    with duckdb.connect() as connection:
        pairs = pairs_relation(connection, judgments, policy).to_arrow_table()
        connection.register("pairs", pairs)
        return pairs, pair_figures(connection, "pairs")


def pair_responses(pairs: pa.Table) -> pa.Table:
    """The 2P responses of P pairs as a token table (chosen first, then rejected): prompt_token_ids,
    prompt_rendering and the prompt columns, completion_token_ids, and the teacher's signal
    (topk_ids, topk_logprobs, tail_mass, k, temperature) where the pairs carry it."""
    shared = [c for c in [*PROMPT, *SIGNAL_STAMPS] if c in pairs.column_names]
    sides = []
    for side in ("chosen", "rejected"):
        renamed = {f"{side}_token_ids": "completion_token_ids",
                   **{f"{side}_{s}": s for s in RESPONSE_SIGNAL if f"{side}_{s}" in pairs.column_names}}
        sides.append(pa.table({**{c: pairs[c] for c in shared}, **{new: pairs[old] for old, new in renamed.items()}}))
    return pa.concat_tables(sides)


def with_reference_logprobs(reference: Engine, pairs: pa.Table, weights_hash: str) -> pa.Table:
    """`pairs` with reference_chosen_logprob and reference_rejected_logprob, Σ_t log π_ref(y_t | x, y_<t)
    at T = 1 by `reference` (the prompts rendered with its template), `reference_weights_hash` and
    `reference_rendering` (its template: training must render the prompts alike)."""
    responses = pair_responses(pairs)
    token_logprob = score(reference, responses, 1)[0]["token_logprob"]
    sums = sequence_sums(token_logprob)
    return pairs.append_column("reference_chosen_logprob", sums.slice(0, pairs.num_rows)) \
        .append_column("reference_rejected_logprob", sums.slice(pairs.num_rows)) \
        .append_column("reference_weights_hash", pa.repeat(pa.scalar(weights_hash), pairs.num_rows)) \
        .append_column("reference_rendering", pa.repeat(pa.scalar(prompt_rendering(reference.tokenizer)), pairs.num_rows))


def ranked_lists(connection: "duckdb.DuckDBPyConnection", judgments: pa.Table | list[Path]):
    """One row per prompt with at least two scored candidates, as a DuckDB relation of `connection`:
    the prompt columns, responses_token_ids (best first), their scores and sample_ids (RRHF's listwise input)."""
    columns = judged(connection, judgments)
    prompt = ", ".join(f"any_value({c}) AS {c}" for c in PROMPT if c in columns and c != "prompt_id")
    order = "ORDER BY score DESC, sample_id"
    return connection.sql(
        f"""SELECT prompt_id, {prompt}, list(completion_token_ids {order}) AS responses_token_ids, list(score {order}) AS scores,
                   list(sample_id {order}) AS sample_ids
            FROM judgments WHERE score IS NOT NULL AND NOT isnan(score) GROUP BY prompt_id HAVING count(*) >= 2
            ORDER BY prompt_id""")

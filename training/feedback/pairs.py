"""Preference pairs and ranked lists from judgments (judgments.py), for the ranking objectives
(training/trainer/ranking.py).

A pair policy picks, per prompt, chosen/rejected responses among its judged candidates:

    best_vs_worst   the best-scored against the worst (Zephyr's dDPO on UltraFeedback: best vs a random other;
                    this is its sharpest variant)
    best_vs_random  the best against lower-scored ones drawn at random (seeded), up to `max_pairs_per_prompt`
    all             every (higher, lower) combination, largest margins first, up to `max_pairs_per_prompt`

A pair needs margin = score_chosen − score_rejected > `min_margin` (ties never pair). With
`corrections`, every teacher correction is also chosen against the response it corrects, whatever
their scores (corrective feedback). Each pair keeps both responses' token ids, texts, sample ids and
scores, and the teacher's signal on both where the candidates carry it.

DPO's reference is the parent checkpoint π_ref: `with_reference_logprobs` stores
log π_ref(y | x) = Σ_t log π_ref(y_t | x, y_<t) (T = 1) of both responses, once, keyed by the
reference's weights hash, so training holds one model.
"""

from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from training.data.labeling import score
from training.data.rollouts import sequence_sums
from training.engines.base import Engine
from training.schema.tables import parquet, with_constants, with_content_id

PROMPT = ["prompt_id", "prompt", "messages", "system_prompt", "answer", "prompt_token_ids", "prompt_rendering"]
SIGNAL = ["topk_ids", "topk_logprobs", "tail_mass"]  # chosen_/rejected_ columns where the candidates carry the signal


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
    response = {"_token_ids": "completion_token_ids", "": "completion", "_sample_id": "sample_id", "_score": "score"}
    response |= {f"_{name}": name for name in SIGNAL if name in judgments}
    prompt = ", ".join(f"c.{name}" for name in PROMPT if name in judgments)
    sides = ", ".join(f"{side[0]}.{column} AS {side}{suffix}" for side in ("chosen", "rejected") for suffix, column in response.items())
    extra = ", c.k, c.temperature" if "topk_ids" in judgments else ""
    return f"{prompt}, {sides}{extra}"


def judged(connection: "duckdb.DuckDBPyConnection", judgments: pa.Table | list[Path]) -> list[str]:  # a string: storage/catalog.py
    """Makes `judgments` (a table, or the Parquet shards of a judgments dataset) the view `judgments`; returns its columns."""
    if isinstance(judgments, pa.Table):
        connection.register("judgments", judgments)
    else:
        connection.sql(f"CREATE VIEW judgments AS SELECT * FROM {parquet(judgments)}")
    return connection.sql("SELECT * FROM judgments LIMIT 0").columns


def preference_pairs(judgments: pa.Table | list[Path], policy: PairPolicy) -> tuple[pa.Table, dict]:
    """The pairs `policy` picks from `judgments` (one row per judged candidate; `score`, `origin`,
    `corrects`): one row per pair with `margin`, `pair_id` and `policy`; and figures."""
    first = {"best_vs_worst": "c.score DESC, r.score ASC", "all": "c.score - r.score DESC",
             "best_vs_random": "hash(c.sample_id || r.sample_id || $seed)"}[policy.strategy]
    best_only = "AND c.place = 1" if policy.strategy != "all" else ""
    with duckdb.connect() as connection:
        columns = pair_columns(judged(connection, judgments))
        pairs = connection.sql(
            f"""WITH judged AS (SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY score DESC, sample_id) AS place
                                FROM judgments WHERE score IS NOT NULL AND NOT isnan(score)),
                     ranked AS (SELECT {columns}, c.score - r.score AS margin, 'judged' AS kind,
                                       row_number() OVER (PARTITION BY c.prompt_id ORDER BY {first}, c.sample_id, r.sample_id) AS pick
                                FROM judged c JOIN judged r ON c.prompt_id = r.prompt_id AND c.score - r.score > $margin {best_only}),
                     corrected AS (SELECT {columns}, c.score - r.score AS margin, 'correction' AS kind, 1 AS pick
                                   FROM judgments c JOIN judgments r ON c.corrects = r.sample_id
                                   WHERE $corrections AND coalesce(c.verifier, 1) > 0)
                SELECT * EXCLUDE (pick) FROM ranked WHERE pick <= $m
                UNION ALL BY NAME SELECT * EXCLUDE (pick) FROM corrected
                ORDER BY prompt_id, kind, margin DESC""",
            params={"margin": policy.min_margin, "m": policy.max_pairs_per_prompt, "corrections": policy.corrections,
                    **({"seed": str(policy.seed)} if policy.strategy == "best_vs_random" else {})},
        ).to_arrow_table()
        prompts = connection.sql("SELECT count(DISTINCT prompt_id) FROM judgments").fetchall()[0][0]
    pairs = with_constants(pairs, policy=policy.name())
    pairs = with_content_id(pairs, "pair_id", ["chosen_sample_id", "rejected_sample_id", "policy"])
    figures = {"pairs": pairs.num_rows, "prompts": prompts, "prompts_with_pairs": len(set(pairs["prompt_id"].to_pylist())),
               "correction_pairs": sum(k == "correction" for k in pairs["kind"].to_pylist()),
               "mean_margin": pc.mean(pairs["margin"]).as_py()}
    return pairs, figures


def pair_responses(pairs: pa.Table) -> pa.Table:
    """The 2P responses of P pairs as a token table (chosen first, then rejected): prompt_token_ids,
    prompt_rendering and the prompt columns, completion_token_ids, and the teacher's signal
    (topk_ids, topk_logprobs, tail_mass, k, temperature) where the pairs carry it."""
    shared = [c for c in [*PROMPT, "k", "temperature"] if c in pairs.column_names]
    sides = []
    for side in ("chosen", "rejected"):
        renamed = {f"{side}_token_ids": "completion_token_ids", **{f"{side}_{s}": s for s in SIGNAL if f"{side}_{s}" in pairs.column_names}}
        sides.append(pa.table({**{c: pairs[c] for c in shared}, **{new: pairs[old] for old, new in renamed.items()}}))
    return pa.concat_tables(sides)


def with_reference_logprobs(reference: Engine, pairs: pa.Table, weights_hash: str) -> pa.Table:
    """`pairs` with reference_chosen_logprob and reference_rejected_logprob, Σ_t log π_ref(y_t | x, y_<t)
    at T = 1 by `reference` (the prompts rendered with its template), and `reference_weights_hash`."""
    responses = pair_responses(pairs)
    token_logprob = score(reference, responses, 1)[0]["token_logprob"]
    sums = sequence_sums(token_logprob)
    return pairs.append_column("reference_chosen_logprob", sums.slice(0, pairs.num_rows)) \
        .append_column("reference_rejected_logprob", sums.slice(pairs.num_rows)) \
        .append_column("reference_weights_hash", pa.repeat(pa.scalar(weights_hash), pairs.num_rows))


def ranked_lists(judgments: pa.Table | list[Path]) -> pa.Table:
    """One row per prompt with at least two scored candidates: the prompt columns,
    responses_token_ids (best first) and their scores (RRHF's listwise input)."""
    with duckdb.connect() as connection:
        columns = judged(connection, judgments)
        prompt = ", ".join(f"any_value({c}) AS {c}" for c in PROMPT if c in columns and c != "prompt_id")
        return connection.sql(
            f"""SELECT prompt_id, {prompt}, list(completion_token_ids ORDER BY score DESC, sample_id) AS responses_token_ids,
                       list(score ORDER BY score DESC, sample_id) AS scores
                FROM judgments WHERE score IS NOT NULL AND NOT isnan(score) GROUP BY prompt_id HAVING count(*) >= 2
                ORDER BY prompt_id""").to_arrow_table()

"""On-policy rollouts (GKD): the student samples, the teacher scores the student's own tokens.

The student q samples y ~ q(· | x) on prompts drawn from the training data. The teacher p scores
every sampled token into the sparse signal (top-k, the token's logprob, tail mass), and the student
scores the same tokens, so that per sequence

    log_ratio_sum = Σ_t [log q(y_t | x, y_<t) − log p(y_t | x, y_<t)]

is a one-sample Monte-Carlo estimate of the sequence-level reverse KL(q‖p) (its mean over samples
converges to it, since y ~ q). Both sides are at the signal temperature (1, the raw model, by default).
The student's side, log q(y_t | …), is kept from sampling (the engine's raw logprob of the token it
drew), so scoring takes no second student pass; only rollouts stored without it, or a signal
temperature other than 1, have the student score its tokens again.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.labeling import finished_share, mixed, routed, sample, score, with_columns
from training.engines.base import Engine
from training.engines.sampling import Sampling
from training.models.alignment import CrossTokenizer
from training.models.chat import prompt_ids_for, prompt_rendering, with_conversation_columns
from training.models.token_bytes import TokenBytes
from training.models.tokenizer import tokenizer_hash
from training.schema.cards import ModelCard
from training.schema.figures import combine_figures
from training.schema.signal import STUDENT_LOGPROB, SignalSettings, signal_statistics, signals_from_columns
from training.schema.tables import join_prompts, parquet, with_constants, with_content_id

if TYPE_CHECKING:
    from training.tasks import Task


PROMPT_COLUMNS = ["prompt_id", "prompt", "messages", "system_prompt", "answer"]


def draw_prompts(paths: list[Path], n: int, seed: str) -> pa.Table:
    """n distinct prompts (PROMPT_COLUMNS) of the Parquet shards `paths`, ordered by
    sha256(prompt_id ‖ seed): the ids are drawn first, then only their rows are read, so memory is
    bounded by the n prompts (DuckDB spills the distinct ids of a big dataset to disk)."""
    values = ", ".join(f"any_value({c}) AS {c}" for c in PROMPT_COLUMNS[1:])
    with duckdb.connect() as connection:
        drawn = connection.sql(
            f"""WITH drawn AS (SELECT prompt_id, sha256(prompt_id || $seed) AS draw FROM (SELECT DISTINCT prompt_id FROM {parquet(paths)})
                               ORDER BY draw LIMIT $n)
                SELECT prompt_id, {values} FROM {parquet(paths)} JOIN drawn USING (prompt_id)
                GROUP BY prompt_id, draw ORDER BY draw""", params={"seed": seed, "n": n}).to_arrow_table()
    return with_conversation_columns(drawn)


def sample_rollouts(student: Engine, prompts: pa.Table, sampling: Sampling, identity: dict) -> tuple[pa.Table, dict]:
    """n samples per prompt from the student, each token's logprob as sampled (`student_token_logprob`),
    with the prompt columns and `identity` (student, weights and tokenizer hashes, round, run) stamped on
    every row; returns (table, metrics)."""
    samples, dropped, _ = sample(student, prompts, sampling, "drop", logprob_column=STUDENT_LOGPROB)
    table = with_constants(join_prompts(samples, prompts), **identity, sampling=sampling.as_json())
    table = with_content_id(table, "sample_id", ["prompt_id", "sample_index", "completion_token_ids", "student_weights_hash", "sampling"])
    metrics = {
        "prompts": prompts.num_rows, "rollouts": table.num_rows, "dropped_overlong_prompts": dropped,
        "mean_tokens": pc.mean(table["num_tokens"]).as_py(), "stopped_share": finished_share(table),
    }
    return table, metrics


def sequence_sums(per_token: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Σ over each list of a list<float> column, vectorized (empty lists sum to 0)."""
    per_token = per_token.combine_chunks() if isinstance(per_token, pa.ChunkedArray) else per_token
    lengths = pc.list_value_length(per_token).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(per_token).to_numpy(zero_copy_only=False).astype(np.float64)
    running = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.cumsum(lengths)
    return pa.array(running[ends] - running[ends - lengths], pa.float64())


def student_scored_again(rollouts: pa.Table, settings: SignalSettings) -> bool:
    """Whether scoring `rollouts` needs a student pass: when they were stored without the logprobs
    they were sampled with, or the signal temperature is not the raw model's (sampled logprobs are at T = 1)."""
    return STUDENT_LOGPROB not in rollouts.column_names or settings.signal_temperature != 1.0


def score_rollouts(teacher: Engine, student: Engine | None, rollouts: pa.Table, settings: SignalSettings,
                   to_teacher: CrossTokenizer | None = None) -> tuple[pa.Table, dict]:
    """The teacher's sparse signal on every rollout token, the student's logprob of each token
    (`student_token_logprob`: as sampled, else scored by `student`), and the per-sequence
    `log_ratio_sum`, as a table of columns to add to the rollouts (the sampled logprobs stay where
    they are); and statistics. A teacher of another tokenizer (`to_teacher`: the student's tokens to
    the teacher's) scores the samples' text in its own tokens: the columns then also replace
    `completion_token_ids`, `prompt_token_ids`, `prompt_rendering` and `tokenizer_hash` with the
    teacher's (the signal's ids; the training aligns them back, training/models/alignment.py) and keep
    the sampled ids as `student_completion_token_ids`; `log_ratio_sum` is then log q(y) − log p(y) of
    the whole text, each model over its own tokens."""
    k, temperature = settings.k, settings.signal_temperature
    if k > len(teacher.tokenizer):
        raise ValueError(f"k={k} is larger than the teacher's vocabulary ({len(teacher.tokenizer)} tokens); lower k")
    scored = rollouts if to_teacher is None else in_teacher_tokens(rollouts, to_teacher, teacher)
    columns, statistics = score(teacher, scored, k, temperature, settings.logprob_dtype)
    if student_scored_again(rollouts, settings):
        if student is None:
            raise ValueError(f"these rollouts need the student to score them again (no {STUDENT_LOGPROB}, or signal "
                             f"temperature {temperature} ≠ 1): pass the student engine")
        student_logprob = score(student, rollouts, 1, temperature)[0]["token_logprob"].combine_chunks()  # q at p's temperature
        columns = columns.append_column(STUDENT_LOGPROB, student_logprob)
    else:
        student_logprob = rollouts[STUDENT_LOGPROB].combine_chunks()
    if to_teacher is None:
        log_ratio = pc.subtract(pc.list_flatten(student_logprob), pc.list_flatten(columns["token_logprob"].combine_chunks()))
        log_ratio_sum = sequence_sums(pa.ListArray.from_arrays(student_logprob.offsets, log_ratio))
    else:
        log_ratio_sum = pc.subtract(sequence_sums(student_logprob), sequence_sums(columns["token_logprob"]))
        columns = with_columns(columns, scored.select(["completion_token_ids", "student_completion_token_ids", "prompt_token_ids",
                                                      "prompt_rendering", "tokenizer_hash"]))
    columns = columns.append_column("log_ratio_sum", log_ratio_sum)
    statistics["reverse_kl_per_token"] = float(pc.sum(log_ratio_sum).as_py() or 0.0) / max(1, len(pc.list_flatten(student_logprob)))
    return columns, statistics


def in_teacher_tokens(rollouts: pa.Table, to_teacher: CrossTokenizer, teacher: Engine) -> pa.Table:
    """The samples as a teacher of another tokenizer reads them: their text (bytes) re-tokenized by it,
    the student's end of turn as the teacher's, the prompt in its template; the sampled ids kept as
    `student_completion_token_ids`."""
    rows = to_teacher(rollouts).append_column("student_completion_token_ids", rollouts["completion_token_ids"])
    rendered = pa.table({"prompt_token_ids": prompt_ids_for(teacher.tokenizer, rows),
                         "prompt_rendering": pa.repeat(pa.scalar(prompt_rendering(teacher.tokenizer)), rows.num_rows),
                         "tokenizer_hash": pa.repeat(pa.scalar(tokenizer_hash(teacher.tokenizer)), rows.num_rows)})
    return with_columns(rows, rendered)


def to_teacher_tokens(student_tokenizer, student_end_ids: list[int], teacher: Engine) -> CrossTokenizer | None:
    """The student's tokens to `teacher`'s when their tokenizers differ (by `tokenizer_hash`), else None."""
    if tokenizer_hash(student_tokenizer) == tokenizer_hash(teacher.tokenizer):
        return None
    return CrossTokenizer.between(TokenBytes.of(student_tokenizer), student_end_ids, teacher.tokenizer, teacher.end_of_turn_ids,
                                  tokenizer_hash(student_tokenizer))


def group_baselines(prompt_ids: pa.ChunkedArray, rewards: pa.Array) -> pa.Array:
    """Each row's baseline: the mean reward of its prompt's samples in the table (GRPO's group mean,
    without dividing by the group's deviation, as Dr. GRPO argues; null where none has a reward)."""
    table = pa.table({"prompt_id": prompt_ids, "reward": rewards})
    means = table.group_by("prompt_id").aggregate([("reward", "mean")])
    return means["reward_mean"].take(pc.index_in(table["prompt_id"], means["prompt_id"]))


def check_rewards(paths: list[str]) -> None:
    """Fails before training when the scored samples in `paths` give a reward's policy gradient
    nothing: no reward at all, or one sample per prompt (its baseline is its own reward)."""
    if "advantage" not in duckdb.sql(f"SELECT * FROM {parquet(paths)} LIMIT 0").columns:
        raise ValueError("these samples were scored before rewards had baselines (no `advantage` column): materialize their "
                         "teacher_feedback again")
    rewarded, largest = duckdb.sql(f"SELECT sum(rewarded), max(samples) FROM (SELECT count(reward) AS rewarded, count(*) AS samples "
                                   f"FROM {parquet(paths)} GROUP BY prompt_id)").fetchall()[0]
    if not rewarded:
        raise ValueError("reward_weight weighs the task reward, and these samples have none (no verifier: the prompts carry no "
                         "reference answers): set reward_weight 0, or sample prompts that have answers")
    if largest < 2:
        raise ValueError("every prompt has one sample, so its baseline (the mean reward of the prompt's samples) is its own "
                         "reward and every advantage is 0: sample n ≥ 2 per prompt (student_rollouts sampling.n)")


def accepted_samples(paths: list[Path], least: float, out: Path, judgments: list[Path] = ()) -> tuple[int, int]:
    """Writes to `out` the scored samples of `paths` that were accepted: the verifier's reward ≥ `least`,
    or with `judgments` (a round's round_judgments) the judged score ≥ `least`; in DuckDB (memory
    bounded), whole or not at all: what rejection-sampling fine-tuning trains on. Returns (kept,
    scored). Fails with what to do when no sample has a reward (a score) or none is accepted."""
    source = parquet(paths)
    if judgments:  # the judges' combined score of each sample (round_judgments: one row per candidate)
        source = (f"(SELECT s.*, j.score AS accepted_by FROM {source} AS s LEFT JOIN (SELECT sample_id, score FROM "
                  f"{parquet(judgments)} WHERE origin = 'student') AS j USING (sample_id))")
    else:
        source = f"(SELECT *, reward AS accepted_by FROM {source})"
    rated, kept, scored = duckdb.sql(f"SELECT count(accepted_by), count(*) FILTER (WHERE accepted_by >= $least), count(*) "
                                     f"FROM {source}", params={"least": least}).fetchall()[0]
    what = "judged score" if judgments else "reward"
    if not rated:
        raise ValueError("these samples have no judged score: materialize round_judgments for the round first" if judgments else
                         "keep 'rewarded' keeps the samples the task's verifier accepts, and these have no reward (no verifier: "
                         "the prompts carry no reference answers): keep 'judged' (round_judgments), or 'all'")
    if not kept:
        raise ValueError(f"none of the round's {scored} samples has {what} ≥ {least}: sample more (student_rollouts "
                         f"num_prompts or n), or lower min_{'score' if judgments else 'reward'}")
    partial = out.with_name(out.name + ".partial")
    target = str(partial).replace("'", "''")
    duckdb.sql(f"COPY (SELECT * EXCLUDE (accepted_by) FROM {source} WHERE accepted_by >= {float(least)!r}) TO '{target}' "
               "(FORMAT parquet, COMPRESSION zstd)")
    os.replace(partial, out)
    return kept, scored


def feedback_table(teacher: Engine, student: Engine | None, rollouts: pa.Table, settings: SignalSettings, teacher_card: ModelCard,
                   task: "Task", to_teacher: CrossTokenizer | None = None) -> tuple[pa.Table, dict]:
    """The rollouts with the teacher's feedback: the columns of `score_rollouts`, the task's `reward`
    (null without a reference answer) with its `baseline` and `advantage` (r − baseline, for the
    policy-gradient objectives; the samples of a prompt are scored together) and the teacher's
    identity; returns (table, metrics)."""
    columns, statistics = score_rollouts(teacher, student, rollouts, settings, to_teacher)
    reward = pc.cast(task.verify(rollouts["completion"], rollouts["answer"]), pa.float64())
    baseline = group_baselines(rollouts["prompt_id"], reward)
    table = with_columns(rollouts, columns).append_column("reward", reward)
    table = table.append_column("baseline", baseline).append_column("advantage", pc.subtract(reward, baseline))
    table = with_constants(table, teacher=teacher_card.name, teacher_weights_hash=teacher_card.weights_hash)
    metrics = {**statistics, "mean_reward": pc.mean(reward).as_py(), "mean_log_ratio_sum": pc.mean(table["log_ratio_sum"]).as_py()}
    return table, metrics


def panel_feedback(engines: dict[str, Engine], student: Engine | None, rollouts: pa.Table, settings: SignalSettings,
                   cards: dict[str, ModelCard], task: "Task", mixture: dict[str, float] | None = None,
                   to_teacher: CrossTokenizer | None = None) -> tuple[pa.Table, dict]:
    """`feedback_table` by several teachers (teacher id → engine and card): with `mixture`, each of its
    teachers scores every sample and the rows store the mixture of their distributions (`labeling.mixed`;
    `log_ratio_sum` against it); else each prompt's samples go to one teacher, round-robin by the prompt's
    id (`labeling.routed`, as routing 'round_robin' labeled them)."""
    if not mixture:
        parts = [feedback_table(engines[t], student, share, settings, cards[t], task, to_teacher)
                 for t, share in routed(rollouts, list(cards), "round_robin").items()]
        return pa.concat_tables([table for table, _ in parts]), combine_figures([m for _, m in parts], [t.num_rows for t, _ in parts])
    scored = {t: feedback_table(engines[t], student, rollouts, settings, cards[t], task, to_teacher) for t in mixture}
    table = mixed({t: table for t, (table, _) in scored.items()}, mixture, settings.logprob_dtype)
    log_ratio_sum = pc.subtract(sequence_sums(table[STUDENT_LOGPROB]), sequence_sums(table["token_logprob"]))
    table = with_columns(table, pa.table({"log_ratio_sum": log_ratio_sum}))
    tokens = len(pc.list_flatten(table[STUDENT_LOGPROB]))
    metrics = {**next(iter(scored.values()))[1], **signal_statistics(signals_from_columns(table)),
               "mean_log_ratio_sum": pc.mean(log_ratio_sum).as_py(), "reverse_kl_per_token": pc.sum(log_ratio_sum).as_py() / max(1, tokens)}
    return table, metrics

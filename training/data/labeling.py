"""Labeling: the teacher answers prompts, then scores its own answers into the sparse signal.

Generation and scoring are separate engine calls, so the stored logprobs are always the raw model
distribution at `signal_temperature`, whatever temperature or top_p sampled the response.
"""

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from training.engines.base import Engine
from training.engines.sampling import Sampling
from training.models.chat import prompt_ids_for, prompt_rendering, render
from training.schema.cards import ModelCard
from training.schema.figures import combine_figures
from training.schema.signal import (
    CODECS,
    LOGPROB_MODE,
    SignalSettings,
    flat_signal,
    flat_signal_columns,
    mixed_signal,
    signal_columns,
    signal_statistics,
)
from training.schema.tables import join_prompts, with_constants, with_content_id

if TYPE_CHECKING:
    from training.tasks import Task


class LabelingSettings(SignalSettings):
    """How the teacher answers prompts (and, inherited, what of its distribution is stored)."""

    sampling: Sampling = Field(Sampling(temperature=0.0, max_new_tokens=96),
                               description="how the responses are sampled (greedy by default; the longest embedded solution is "
                               "~75 tokens); each shard of the inputs samples with its own seed (derived_seed)")
    overlong_prompts: Literal["drop", "truncate"] = Field(
        "drop", description="prompts that leave no room for max_new_tokens: drop them, or keep their last tokens"
    )


TEACHER_ID = "teacher"  # teacher_model's own teacher, the first; the others are named in its `others`
MIXTURE_ID = "mixture"  # the rows that store the mixture of several teachers' distributions


class TeacherPanel(BaseModel):
    """How several teachers (teacher_model and its `others`) share the labeling: who answers each
    prompt, who scores each response, and which mixture of their distributions is stored too."""

    routing: Literal["first", "round_robin", "column", "every"] = Field(
        "first", description="who answers each prompt: 'first', teacher_model's own teacher; 'round_robin', one teacher per "
        "prompt, by its prompt_id; 'column', the teacher the prompt's `teacher_id` names (seed_prompts' teacher_column); "
        "'every', each teacher answers every prompt")
    scoring: Literal["author", "every"] = Field(
        "author", description="whose signal is stored on each response: 'author', the teacher who wrote it; 'every', each "
        "teacher's (one row per response and teacher; the teachers must share a tokenizer)")
    mixture: dict[str, float] = Field(
        {}, description="with scoring 'every': also store, per response, the mixture Σ w_j p_j of these teachers' "
        "distributions over the union of their top-k (teacher id → weight w_j, normalized), as rows of teacher_id "
        "'mixture'; train on them with offline_student's `teachers: [mixture]`")

    @model_validator(mode="after")
    def _mixture_needs_every_score(self):
        if self.mixture and self.scoring != "every":
            raise ValueError("a mixture needs every teacher's distribution on each response: set scoring 'every'")
        if bad := {t: w for t, w in self.mixture.items() if not w > 0}:
            raise ValueError(f"mixture weights must be > 0: {bad}")
        return self

    def check(self, teachers: dict[str, ModelCard]) -> None:
        """Fails before any work: a mixture of teachers that are not in the panel, or scores across tokenizers."""
        if unknown := sorted(set(self.mixture) - set(teachers)):
            raise ValueError(f"mixture names {unknown}, which are not teachers: the teachers are {sorted(teachers)} "
                             "(teacher_model's teacher_id and its others)")
        if len(self.mixture) == 1:
            raise ValueError(f"a mixture of one teacher ({list(self.mixture)}) is that teacher: name two or more, or train on "
                             "its own rows")
        if self.scoring == "every" and len({card.tokenizer_hash for card in teachers.values()}) > 1:
            raise ValueError("scoring 'every' stores each teacher's signal on every response, in the response's token ids, so "
                             "the teachers must share a tokenizer; these do not: route each prompt to one teacher (scoring "
                             "'author') and train on one tokenizer's rows at a time")


def routed(prompts: pa.Table, teacher_ids: list[str], routing: str) -> dict[str, pa.Table]:
    """The prompts each teacher answers (`TeacherPanel.routing`); round-robin by the prompt's id, so a
    prompt goes to the same teacher in every shard, run and resume."""
    if routing == "every":
        return dict.fromkeys(teacher_ids, prompts)
    if routing == "first" or len(teacher_ids) == 1 and routing != "column":
        return {teacher_ids[0]: prompts}
    if routing == "round_robin":
        chosen = pa.array([teacher_ids[int(prompt_id[:8], 16) % len(teacher_ids)] for prompt_id in prompts["prompt_id"].to_pylist()])
    else:
        chosen = prompts["teacher_id"]
        if unknown := sorted(set(pc.unique(chosen).to_pylist()) - set(teacher_ids), key=str):
            raise ValueError(f"prompts name teachers {unknown}, which are not teachers: the teachers are {teacher_ids}")
    return {t: prompts.filter(pc.equal(chosen, t)) for t in teacher_ids if pc.any(pc.equal(chosen, t)).as_py()}


@dataclass
class Labeled:
    table: pa.Table  # one row per response: prompt_index, sample_index, ids, text, signal columns
    dropped_overlong: int
    truncated_overlong: int
    statistics: dict


def fit_prompts(engine: Engine, prompts: pa.Table, max_new_tokens: int, overlong: str):
    """Token ids per prompt row, rendered for the engine's model (`training.chat.render`), with room
    for `max_new_tokens` in the context; overlong ones are dropped (None) or keep their last tokens.
    Returns (ids or None per prompt, dropped, truncated)."""
    budget = engine.context_length - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{engine.context_length}-token context; lower max_new_tokens"
        )
    encoded = render(engine.tokenizer, prompts)
    lengths = np.array([len(ids) for ids in encoded])
    overlong_rows = lengths > budget
    if overlong == "drop":
        fitted = [None if too_long else ids for ids, too_long in zip(encoded, overlong_rows)]
        return fitted, int(overlong_rows.sum()), 0
    fitted = [ids[-budget:] for ids in encoded]
    return fitted, 0, int(overlong_rows.sum())


def sample(engine: Engine, prompts: pa.Table, sampling: Sampling, overlong: str = "drop", logprob_column: str | None = None):
    """n completions per prompt row (`prompt`, optionally `messages`, `system_prompt`) from `engine`,
    as token ids. Returns (table, dropped, truncated); the table has one row per completion:
    prompt_index (into `prompts`), sample_index, prompt_token_ids (as the model saw them),
    prompt_rendering, completion_token_ids, completion, finish_reason, num_tokens; with
    `logprob_column`, also each sampled token's raw logprob (T = 1) as the engine sampled it, under that name."""
    fitted, dropped, truncated = fit_prompts(engine, prompts, sampling.max_new_tokens, overlong)
    kept = [i for i, ids in enumerate(fitted) if ids is not None]
    prompt_ids = [fitted[i] for i in kept]
    generations = engine.generate(prompt_ids, sampling, logprobs=1 if logprob_column else 0) if prompt_ids else []
    columns = {
        "prompt_index": pa.array([kept[g.prompt_index] for g in generations], pa.int64()),
        "sample_index": pa.array([g.sample_index for g in generations], pa.int32()),
        "prompt_token_ids": pa.array([prompt_ids[g.prompt_index] for g in generations], pa.list_(pa.int32())),
        "prompt_rendering": pa.array([prompt_rendering(engine.tokenizer)] * len(generations), pa.string()),
        "completion_token_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
        "completion": pa.array([g.text for g in generations], pa.string()),
        "finish_reason": pa.array([g.finish_reason for g in generations], pa.string()),
        "num_tokens": pa.array([len(g.completion_ids) for g in generations], pa.int32()),
    }
    if logprob_column:
        columns[logprob_column] = pa.array([g.signal.token_logprob for g in generations], pa.list_(pa.float32()))
    return pa.table(columns), dropped, truncated


def score(
    engine: Engine, sequences: pa.Table, k: int, signal_temperature: float = 1.0, logprob_dtype: str = "float32"
) -> tuple[pa.Table, dict]:
    """`engine`'s sparse signal on every completion token of `sequences` (prompt_token_ids,
    completion_token_ids; the prompts rendered anew when another template rendered them, see
    `training.chat.prompt_ids_for`): a table of the signal columns plus k, temperature, logprob_mode
    and codec, one row per sequence, and statistics."""
    signals = engine.score(
        prompt_ids_for(engine.tokenizer, sequences).to_pylist(), sequences["completion_token_ids"].to_pylist(), k, signal_temperature
    )
    table = with_constants(
        pa.table(signal_columns(signals, logprob_dtype)), k=pa.scalar(k, pa.int32()),
        temperature=pa.scalar(signal_temperature, pa.float32()), logprob_mode=LOGPROB_MODE, codec=CODECS[logprob_dtype],
    )
    return table, signal_statistics(signals)


def with_columns(table: pa.Table, columns: pa.Table) -> pa.Table:
    """`table` with every column of `columns` (as many rows) appended, or put in place of its namesake."""
    for name in columns.column_names:
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, columns[name]) if index >= 0 else table.append_column(name, columns[name])
    return table


def label(
    engine: Engine,
    prompts: pa.Table,
    sampling: Sampling,
    k: int,
    signal_temperature: float = 1.0,
    overlong: str = "drop",
    logprob_dtype: str = "float32",
) -> Labeled:
    """n responses per prompt row with the teacher's top-k signal on every response token."""
    if k > len(engine.tokenizer):
        raise ValueError(f"k={k} is larger than the vocabulary ({len(engine.tokenizer)} tokens); lower k")
    engine.check_signal(k, signal_temperature)
    responses, dropped, truncated = sample(engine, prompts, sampling, overlong)
    signal, statistics = score(engine, responses, k, signal_temperature, logprob_dtype)
    return Labeled(with_columns(responses, signal), dropped, truncated, statistics)


def teacher_stamps(card: ModelCard, teacher_id: str) -> dict:
    """The columns that say which teacher scored a row."""
    return dict(teacher=card.name, teacher_revision=card.revision, teacher_weights_hash=card.weights_hash,
                tokenizer_hash=card.tokenizer_hash, teacher_id=teacher_id)


def label_table(engine: Engine, prompts: pa.Table, settings: LabelingSettings, card: ModelCard, task: "Task", run_id: str,
                id_columns: tuple = (), shard: int = 0, teacher_id: str | None = None) -> tuple[pa.Table, dict]:
    """Teacher responses to `prompts` (prompt_id, prompt, answer, and any extra columns, carried onto
    each response) with the sparse signal, the task's verdict (`correct`) and the teacher's identity
    (`teacher_id`, who scored it, and `written_by`, who wrote it: here the same); returns (table,
    metrics). `sample_id` hashes the prompt, the response, the teacher, the sampling and `id_columns`.
    `shard` numbers the slice of a dataset `prompts` is (its own seed: derived_seed). `teacher_id`:
    the card's own (teacher_model's), unless given."""
    teacher_id = teacher_id or card.teacher_id or TEACHER_ID
    sampling = settings.sampling.derived(part=shard)
    labeled = label(engine, prompts, sampling, settings.k, settings.signal_temperature,
                    settings.overlong_prompts, settings.logprob_dtype)
    carried = prompts.drop_columns([c for c in ("task", "source", "run_id", "teacher_id") if c in prompts.column_names])
    table = join_prompts(labeled.table, carried)
    table = table.append_column("correct", task.verify(table["completion"], table["answer"]))
    table = with_constants(table, **teacher_stamps(card, teacher_id), written_by=teacher_id, sampling=sampling.as_json(), run_id=run_id)
    identity = ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash", "sampling", *id_columns]
    table = with_content_id(table, "sample_id", identity)
    correct = table["correct"].drop_null()
    metrics = {
        **labeled.statistics,
        "responses": table.num_rows,
        "dropped_overlong_prompts": labeled.dropped_overlong,
        "truncated_overlong_prompts": labeled.truncated_overlong,
        "teacher_accuracy": pc.mean(pc.cast(correct, pa.float64())).as_py() if len(correct) else None,
        "stopped_share": finished_share(table),
        "engine": engine.backend,
        "cache_hit_rate": getattr(engine, "hit_rate", None),
    }
    return table, metrics


def finished_share(table: pa.Table) -> float | None:
    """The share of completions that ended at an end-of-turn id or stop string (finish_reason 'stop')
    rather than at the length limit."""
    return pc.mean(pc.cast(pc.equal(table["finish_reason"], "stop"), pa.float64())).as_py()


def scored_by(engine: Engine, labeled: pa.Table, settings: LabelingSettings, card: ModelCard, teacher_id: str,
              identity: list[str]) -> pa.Table:
    """Another teacher's responses (`label_table`'s rows) with this teacher's signal instead, the
    prompt as its template renders it, and its stamps; `written_by` still names the author."""
    signal, _ = score(engine, labeled, settings.k, settings.signal_temperature, settings.logprob_dtype)
    rendered = pa.table({"prompt_token_ids": prompt_ids_for(engine.tokenizer, labeled),
                         "prompt_rendering": pa.repeat(pa.scalar(prompt_rendering(engine.tokenizer)), labeled.num_rows)})
    table = with_columns(with_columns(labeled.drop_columns(["sample_id"]), signal), rendered)
    table = with_columns(table, with_constants(labeled.select([]), **teacher_stamps(card, teacher_id)))
    return with_content_id(table, "sample_id", identity)


def mixed(scored: dict[str, pa.Table], weights: dict[str, float], logprob_dtype: str) -> pa.Table:
    """The rows of `scored` (teacher id → the same rows, each with that teacher's signal and
    teacher_weights_hash) with the mixture of the `weights`' teachers' signals (`mixed_signal`, the
    weights normalized), stamped teacher 'mixture(…)', teacher_id 'mixture', no revision, and a weights
    hash over the members' weights hashes and weights."""
    total = sum(weights.values())
    members = {t: weights[t] / total for t in sorted(weights)}
    flat = [flat_signal(scored[t]) for t in members]
    mixture = mixed_signal([signal for signal, _ in flat], np.array(list(members.values())))
    rows, lengths = scored[next(iter(members))], flat[0][1]
    recipe = json.dumps({t: [scored[t]["teacher_weights_hash"][0].as_py(), w] for t, w in members.items()}, sort_keys=True)
    stamps = dict(teacher=f"mixture({', '.join(f'{t}={w:.3g}' for t, w in members.items())})", teacher_revision=None,
                  teacher_weights_hash=hashlib.sha256(recipe.encode()).hexdigest(), teacher_id=MIXTURE_ID)
    columns = pa.table(flat_signal_columns(mixture, lengths, logprob_dtype))
    return with_columns(with_columns(rows, columns), with_constants(rows.select([]), **stamps))


def panel_table(engines: dict[str, Engine], prompts: pa.Table, settings: LabelingSettings, panel: TeacherPanel,
                cards: dict[str, ModelCard], task: "Task", run_id: str, shard: int = 0) -> tuple[pa.Table, dict]:
    """`label_table` by several teachers (`cards`, teacher id → card, the first teacher_model's own):
    each routed share of `prompts` answered by its teacher, then scored by every teacher and mixed as
    `panel` says. One teacher: exactly `label_table`. Metrics: the authors' combined (`combine_figures`),
    each teacher's responses and accuracy, and the rows with every teacher's signal."""
    if len(cards) == 1:
        (teacher_id, card), = cards.items()
        return label_table(engines[teacher_id], prompts, settings, card, task, run_id, shard=shard, teacher_id=teacher_id)
    identity = ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash", "sampling", "teacher_id", "written_by"]
    tables, parts, per_teacher = [], [], {}
    for author, share in routed(prompts, list(cards), panel.routing).items():
        labeled, figures = label_table(engines[author], share, settings, cards[author], task, run_id, identity[5:], shard, author)
        parts.append(figures)
        per_teacher |= {f"responses[{author}]": figures["responses"], f"teacher_accuracy[{author}]": figures["teacher_accuracy"]}
        if not labeled.num_rows:  # every prompt of the share dropped (overlong): nothing to score or mix
            continue
        scored = {author: labeled}
        if panel.scoring == "every":
            scored |= {t: scored_by(engines[t], labeled, settings, cards[t], t, identity) for t in cards if t != author}
        if panel.mixture:
            scored[MIXTURE_ID] = with_content_id(mixed(scored, panel.mixture, settings.logprob_dtype).drop_columns(["sample_id"]),
                                                 "sample_id", identity)
        tables += scored.values()
    table = pa.concat_tables(tables, promote_options="default") if tables else labeled
    return table, {**combine_figures(parts, [max(1, part["responses"]) for part in parts]), **per_teacher, "rows": table.num_rows}

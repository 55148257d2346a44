"""Where the loop's batches come from. A source is called with the step and returns that step's
rows, checked (`RowCheck`) before the loop sees them:

    ShuffledBatches  stored rows (a table or Parquet files) shuffled a window at a time (shuffle.py),
                     checked a window at a time as it is loaded: curated data, a round's teacher_feedback
    FreshBatches     a function of the step: the embedded models' fresh problems, or an online round's
                     fresh samples of the student as it is at that step (training/rounds/online.py)

`Batches` holds the fixed source, the on-policy one (drawn with probability λ) and the temperature
the stored signal was scored at, which the loss must use.
"""

from dataclasses import dataclass
from typing import Callable, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.models.alignment import CrossTokenizer
from training.models.chat import prompt_ids_for, render
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.models.token_bytes import TokenBytes, token_table
from training.models.tokenizer import tokenizer_hash
from training.trainer.objectives import batch_kind, check_takes
from training.trainer.settings import TrainingSettings
from training.trainer.shuffle import ShuffledBatches, blocks_of

Rows = pa.Table | list[str] | Callable[[int], pa.Table]  # stored rows, Parquet files, or a function of the step


class BatchSource(Protocol):
    def __call__(self, step: int) -> pa.Table:
        """The batch of `step`."""

    def resumed_at(self, step: int) -> None:
        """The training resumed at `step` (after a kill): what was drawn for later steps is gone."""


class FreshBatches:
    """A batch made for each step by `batch(step)`, checked as it comes; `on_resume(step)` forgets
    what was made for `step` and later (an online round's written batches)."""

    def __init__(self, batch: Callable[[int], pa.Table], check: Callable[[pa.Table], pa.Table],
                 on_resume: Callable[[int], None] | None = None):
        self.batch, self.check, self.on_resume = batch, check, on_resume

    def __call__(self, step: int) -> pa.Table:
        return self.check(self.batch(step))

    def resumed_at(self, step: int) -> None:
        if self.on_resume is not None:
            self.on_resume(step)


def check_compatible(table: pa.Table, student_vocab_size: int, k: int | None) -> None:
    """Fails before training: stored ids the student does not have, k > stored. (Whether the teacher
    shares the student's tokenizer is decided from the tokenizers' contents: `cross_tokenizer`.)"""
    stored_k = pc.min(table["k"]).as_py()
    if k is not None and k > stored_k:
        raise ValueError(f"k={k} is larger than the stored top-{stored_k}: lower k or relabel with a larger k")
    per_token = pc.list_flatten(table["topk_ids"])
    ids = pc.list_flatten(per_token).to_numpy()
    beyond = ids >= student_vocab_size
    if beyond.any():
        first = int(beyond.argmax())
        token = pc.list_parent_indices(per_token).to_numpy()[first]
        row = int(pc.list_parent_indices(table["topk_ids"]).to_numpy()[token])
        raise ValueError(
            f"sample {table['sample_id'][row].as_py()} stores token id {ids[first]}, beyond the student's "
            f"vocabulary of {student_vocab_size}: if the teacher has another tokenizer, name it (`teacher`) so that its "
            "signal is aligned to the student's tokens"
        )


@dataclass
class RowCheck:
    """What every batch passes before training: its prompts rendered with the student's own chat
    template, an objective that takes its kind, and a signal the student can use (a response's, or
    both of a pair's), scored at the fixed data's temperature; kd_weight only on pairs that carry it."""

    tokenizer: object
    vocab_size: int
    cross: CrossTokenizer | None  # a teacher with another tokenizer: its rows are aligned to the student's tokens
    signal_tokenizer: str  # the tokenizer_hash of the ids the rows' signal must be in: the student's, or `cross`'s teacher's
    settings: TrainingSettings
    temperature: float
    source: str  # "fixed" or "on-policy", for the messages

    def __call__(self, rows: pa.Table) -> pa.Table:
        prompt_ids = prompt_ids_for(self.tokenizer, rows) if self.cross is None else pa.array(render(self.tokenizer, rows),
                                                                                                rows["prompt_token_ids"].type)
        rows = rows.set_column(rows.schema.get_field_index("prompt_token_ids"), "prompt_token_ids", prompt_ids)
        check_takes(self.settings.objective, rows, self.source)
        signals = stored_signals(rows)
        if signals and "tokenizer_hash" in rows.column_names:
            check_signal_tokenizer(set(pc.unique(rows["tokenizer_hash"]).to_pylist()), self.signal_tokenizer, self.source)
        if self.cross is not None:
            rows = self.cross(rows)
        for signal in stored_signals(rows):
            check_compatible(signal, self.vocab_size, self.settings.k)
        if signals and (found := float(rows["temperature"][0].as_py())) != self.temperature:
            raise ValueError(f"{self.source} rows store the teacher at temperature {found}, the fixed data at "
                             f"{self.temperature}: score them alike")
        if batch_kind(rows) == "pairs" and self.settings.kd_weight > 0 and not signals:
            raise ValueError(f"kd_weight {self.settings.kd_weight} adds the teacher's divergence on the responses, but the "
                             f"{self.source} pairs carry no teacher signal (chosen_topk_ids, rejected_topk_ids): "
                             "score both responses with the teacher, or set kd_weight 0")
        if batch_kind(rows) == "ranked":
            responses = pc.list_value_length(rows["responses_token_ids"])
            if not pc.all(pc.equal(responses, pc.list_value_length(rows["scores"]))).as_py() or pc.min(responses).as_py() < 1:
                raise ValueError(f"{self.source} ranked rows need responses, and one score for each (scores as long as "
                                 "responses_token_ids)")
        return rows


def check_signal_tokenizer(found: set[str], expected: str, source: str) -> None:
    """The rows' signals are in the token ids of `expected` (their `tokenizer_hash`es, `found`)."""
    if found - {expected}:
        raise ValueError(f"{source} rows store signals in the token ids of tokenizers {sorted(found)}, and this training reads "
                         f"those of {expected} (the student's, or the named `teacher`'s): train on one teacher's tokenizer at a "
                         "time (`teachers`), naming that teacher")


def stored_signals(rows: pa.Table) -> list[pa.Table]:
    """The teacher's signals the rows store, each as a table `check_compatible` reads (topk_ids, k,
    sample_id): a response's own, or a pair's on its chosen and on its rejected response."""
    if "topk_ids" in rows.column_names:
        return [rows]
    return [pa.table({"topk_ids": rows[f"{side}_topk_ids"], "k": rows["k"], "sample_id": rows[f"{side}_sample_id"]})
            for side in ("chosen", "rejected") if f"{side}_topk_ids" in rows.column_names]


@dataclass
class Batches:
    fixed: BatchSource
    on_policy: BatchSource | None
    temperature: float  # of the stored teacher signal: the loss rescales it to its own τ
    cross: CrossTokenizer | None = None  # a teacher with another tokenizer: the alignment, and its coverage so far


def stored_temperature(rows: Rows) -> float | None:
    """The temperature the first stored row was scored at (one column of one row group), if any."""
    if callable(rows):
        return None
    first = blocks_of(rows)[0]
    return float(first.read(["temperature"])["temperature"][0].as_py()) if "temperature" in first.column_names() else None


def cross_tokenizer(teacher: str | None, student, tokenizer, settings: TrainingSettings) -> CrossTokenizer | None:
    """The alignment for `teacher` (its checkpoint, or its stored token table) whose token ids the rows store, when its tokenizer is
    not the student's (decided by `tokenizer_hash`, their vocabularies and special tokens, never by sizes: a
    padded embedding makes sizes differ for one tokenizer); None when they are the same or no teacher is named."""
    if teacher is None:
        return None
    tokens = teacher_token_table(teacher)
    if tokens["tokenizer_hash"][0].as_py() == tokenizer_hash(tokenizer):
        return None
    if settings.objective not in ("sft", "supervised_kd"):
        raise ValueError(f"objective {settings.objective!r} is not aligned across tokenizers yet: with a teacher of another "
                         "tokenizer use 'supervised_kd' (or 'sft')")
    if settings.objective == "supervised_kd" and settings.tail_policy == "renormalize":
        raise ValueError("across tokenizers the student's mass on its own tokens outside the teacher's mapped top-k (its longer "
                         "tokens) must count: with tail_policy 'renormalize' nothing holds it, and the student got worse "
                         "(bench/cross_tokenizer.py: 0.083 → 0.043 exact match); set tail_policy 'bucket'")
    return CrossTokenizer.between(*TokenBytes.from_table(tokens), tokenizer, end_of_turn_ids(student.generation_config, tokenizer),
                                  tokens["tokenizer_hash"][0].as_py())


def teacher_token_table(teacher: str) -> pa.Table:
    """The teacher's tokens (`token_bytes.token_table`): as stored beside its signal (a `token_texts` file,
    `….parquet`), or made from its checkpoint."""
    if teacher.endswith(".parquet"):
        return pq.read_table(teacher)
    teacher_tokenizer = load_tokenizer(teacher)
    return token_table(teacher_tokenizer, end_of_turn_ids(load_generation_config(teacher), teacher_tokenizer))


def batches_for(model, tokenizer, settings: TrainingSettings, fixed: Rows, on_policy: Rows | None = None,
                teacher: str | None = None, on_resume: Callable[[int], None] | None = None) -> Batches:
    """The loop's sources for `model` (its vocabulary bounds the stored ids): stored rows are shuffled
    (seeded by `settings.seed`, the on-policy ones by seed + 1), functions of the step are called at
    each step; all checked by one `RowCheck`. `teacher`: the checkpoint whose token ids the rows store,
    aligned to the student's tokens when its tokenizer differs (training/models/alignment.py)."""
    temperature = stored_temperature(fixed) or settings.temperature
    cross = cross_tokenizer(teacher, model, tokenizer, settings)
    signal_tokenizer = cross.teacher_tokenizer_hash if cross is not None else tokenizer_hash(tokenizer)

    def source(rows: Rows, name: str, seed: int) -> BatchSource:
        check = RowCheck(tokenizer, model.config.vocab_size, cross, signal_tokenizer, settings, temperature, name)
        if callable(rows):
            return FreshBatches(rows, check, on_resume if name == "on-policy" else None)
        blocks = blocks_of(rows, settings.teachers if name == "fixed" else ())
        if "tokenizer_hash" in blocks[0].column_names() and "topk_ids" in blocks[0].column_names():  # all of them, before training
            found = {h for block in blocks for h in pc.unique(block.read(["tokenizer_hash"])["tokenizer_hash"]).to_pylist()}
            check_signal_tokenizer(found, signal_tokenizer, name)
        return ShuffledBatches(blocks, settings.batch_size, seed, settings.shuffle_window, check)

    return Batches(source(fixed, "fixed", settings.seed),
                   None if on_policy is None else source(on_policy, "on-policy", settings.seed + 1), temperature, cross)

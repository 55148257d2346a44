"""What the round assets share (assets/rounds.py, and the preference round's in assets/feedback.py):
their partition and pool, the parent checkpoint of round r, the claim on the round while a run
writes it, and the shard step that samples the student (offline_student's samples too, as round 0)."""

from contextlib import contextmanager

import dagster as dg
import pyarrow as pa

from assets.inputs import CARD_OF, named_teachers, teacher_card
from assets.partitions import FIRST_PARENT, parent_round, round_number, rounds
from assets.runs import IN_PROGRESS, release_dead_runs
from storage.store import Store
from training.data.rollouts import sample_rollouts
from training.engines.sampling import Sampling
from training.schema.cards import ModelCard

ROUND = dict(partitions_def=rounds, group_name="rounds", pool="accelerator")


def parent_versions(parent: str, card: ModelCard) -> dict:
    """What every round asset records of its parent, which Dagster cannot declare (round r−1's key)."""
    return {"parent": parent, "parent_checkpoint": card.weights_hash}


def parent_checkpoint(store: Store, key: str) -> tuple[str, str | None, ModelCard]:
    """(parent name, parent round, parent card) of round `key`: offline_student for r001, else round
    r−1's student_checkpoint. A missing parent is an error naming the round to materialize first."""
    previous = parent_round(key)
    if previous is None:
        return FIRST_PARENT, None, store.read_card(FIRST_PARENT)
    if not store.card_path("student_checkpoint", previous).exists():
        raise FileNotFoundError(
            f"round {key} starts from round {previous}'s student_checkpoint, which does not exist: "
            f"run round {previous} first (job distill_round, partition {previous})"
        )
    return f"student_checkpoint[{previous}]", previous, store.read_card("student_checkpoint", previous)


TEACHERS = ("teacher_model", "teacher_model[<teacher id>]", "round_robin", "mixture", "parent", "offline_student",
            "student_checkpoint[r…]")  # who may score a round's samples


def round_teacher(store: Store, key: str, teacher: str) -> tuple[str, ModelCard]:
    """(name, card) of the model that scores round `key`'s samples (teacher_feedback's `teacher`): the
    teacher_model, the round's parent (self-distillation), or an earlier checkpoint by name, never
    round `key`'s own or a later one. Its card is named as the rows and the lineage name it."""
    if teacher == "parent":
        name, _, card = parent_checkpoint(store, key)
        return name, card.extended(name=name)
    asset, _, partition = teacher.removesuffix("]").partition("[")
    if asset == "teacher_model":
        return teacher, teacher_card(store, teacher)
    if asset not in ("offline_student", "student_checkpoint") or bool(partition) != (asset == "student_checkpoint"):
        raise ValueError(f"teacher {teacher!r} is none of {', '.join(TEACHERS)}")
    if partition and round_number(partition) >= round_number(key):
        raise ValueError(f"round {key} cannot be scored by {teacher}, its own or a later round's checkpoint: name an earlier "
                         "round's, or 'parent'")
    return teacher, store.read_card(CARD_OF[asset], partition or None).extended(name=teacher)


def round_teachers(store: Store, key: str, teacher: str, mixture: dict[str, float]) -> tuple[str, dict[str, ModelCard]]:
    """(name, teacher id → card) of who scores round `key`'s samples (teacher_feedback's `teacher`): one
    (`round_teacher`), every teacher of teacher_model, each on its prompts' samples ('round_robin'), or
    the teachers of `mixture` ('mixture'). Several must share a tokenizer: the round trains on one."""
    if teacher not in ("round_robin", "mixture"):
        name, card = round_teacher(store, key, teacher)
        return name, {name: card}
    panel = named_teachers(store)
    if unknown := sorted(set(mixture) - set(panel)):
        raise ValueError(f"mixture names {unknown}, which are not teachers: the teachers are {sorted(panel)}")
    chosen = panel if teacher == "round_robin" else {t: panel[t] for t in sorted(mixture)}
    if len({card.tokenizer_hash for card in chosen.values()}) > 1:
        raise ValueError(f"teacher {teacher!r} has several teachers score one round, which trains on one tokenizer's signal: "
                         f"{sorted(chosen)} have different tokenizers; name one of them (teacher_model[<teacher id>])")
    return teacher, chosen


@contextmanager
def claim_round(context: dg.AssetExecutionContext):
    """The round is this run's while the block runs: fails clearly while another run of the round is in
    progress, after releasing dead runs (what in progress and dead mean: assets/runs.py), so two
    launches of one round never mix their data and a killed one never holds the round."""
    key = context.partition_key
    release_dead_runs(context.instance)
    others = [
        record.dagster_run.run_id
        for record in context.instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS, tags={"dagster/partition": key}))
        if record.dagster_run.run_id != context.run.run_id
    ]
    if others:
        raise RuntimeError(
            f"round {key} is already being run by run {others[0]}: wait for it to finish (or cancel it in the UI), "
            "then re-run this round"
        )
    yield


def rollout_shard(engines: dict, prompts: pa.Table, index: int, *, sampling: Sampling, round_number: int, identity: dict):
    return sample_rollouts(engines["student"], prompts, sampling.derived(round_number, index), identity)

"""What an asset reads, declared once. One `Inputs` per asset gives Dagster its deps, reads the model
cards and datasets from the store, and records their versions in the asset's lineage, so the three
never disagree:

    TEACHER_LABELED = Inputs(cards=["teacher_model"], datasets=["seed_prompts"])

    @dg.asset(deps=TEACHER_LABELED.deps, ...)
    def teacher_labeled(...):
        read = TEACHER_LABELED.read(store)
        read.cards["teacher_model"], read.versions          # the card; {asset: weights hash or data version}

A model asset's card is stored under the model's own name (`CARD_OF`). A round's datasets of the same
round (student_rollouts[r] for teacher_feedback[r]) are read at the context's partition. What Dagster
cannot declare, the parent checkpoint of round r (round r−1's, read by key), is recorded by the
round assets themselves (see assets/rounds.py).
"""

from dataclasses import dataclass, field

import pyarrow as pa

from assets.config import TRAINING_DATA
from storage.store import Store
from training.data.labeling import TEACHER_ID
from training.schema.cards import ModelCard

CARD_OF = {"teacher_model": "teacher", "student_model": "student", "offline_student": "offline_student",
           "student_checkpoint": "student_checkpoint"}  # a model asset → the name its card is stored under


OTHER_TEACHERS = "teachers"  # teacher_model's other teachers' cards: teachers/<teacher id>


def teacher_panel(store: Store, teacher: ModelCard) -> dict[str, ModelCard]:
    """Every teacher teacher_model holds, by teacher id, its own first (training/data/labeling.py's TeacherPanel)."""
    others = {teacher_id: store.read_card(f"{OTHER_TEACHERS}/{teacher_id}") for teacher_id in teacher.other_teachers or {}}
    return {teacher.teacher_id or TEACHER_ID: teacher, **others}


def signal_teacher(store: Store, teacher: ModelCard, teachers: list[str]) -> ModelCard:
    """The teacher whose token ids a training's rows store: the first of `teachers` (the training's
    `teachers` setting) that is one of teacher_model's, else teacher_model's own (a mixture's
    teachers share its tokenizer)."""
    panel = teacher_panel(store, teacher) if teachers else {}
    return next((panel[t] for t in teachers if t in panel), teacher)


def named_teachers(store: Store) -> dict[str, ModelCard]:
    """`teacher_panel` of the stored teacher_model, each of its other teachers named 'teacher_model[<teacher id>]',
    as the rows and lineage of what it scores or judges name it."""
    teacher = store.read_card(CARD_OF["teacher_model"])
    return {t: card if card is teacher else card.extended(name=f"teacher_model[{t}]") for t, card in teacher_panel(store, teacher).items()}


def teacher_card(store: Store, name: str) -> ModelCard:
    """'teacher_model', teacher_model's own teacher, or 'teacher_model[<teacher id>]', one of its teachers."""
    panel = named_teachers(store)
    teacher_id = name.removeprefix("teacher_model").removeprefix("[").removesuffix("]") or next(iter(panel))
    if teacher_id not in panel:
        raise ValueError(f"{name!r} is not one of teacher_model's teachers: they are {sorted(panel)} (name one as "
                         "'teacher_model[<teacher id>]')")
    return panel[teacher_id]


def not_chosen(train_on: str) -> tuple[str, ...]:
    """The declared training data sources a run does not read."""
    return tuple(name for name in TRAINING_DATA if name != train_on)


@dataclass(frozen=True)
class Read:
    cards: dict[str, ModelCard]  # model asset → its card
    versions: dict[str, str]  # every input → its weights hash or data version, for lineage


@dataclass(frozen=True)
class Inputs:
    cards: list[str] = field(default_factory=list)  # model assets whose card is read
    datasets: list[str] = field(default_factory=list)  # datasets read whole (or as the training data source)
    round_datasets: list[str] = field(default_factory=list)  # datasets of the same round partition

    @property
    def deps(self) -> list[str]:
        return [*self.cards, *self.datasets, *self.round_datasets]

    def read(self, store: Store, partition: str | None = None, skip: tuple[str, ...] = ()) -> Read:
        """The cards, and the versions of every input but `skip` (declared inputs this run does not
        read: the training data source not chosen, a written dataset not built). A missing input is
        the store's clear error naming the asset to materialize first."""
        cards = {name: store.read_card(CARD_OF[name], partition if name == "student_checkpoint" else None) for name in self.cards}
        versions = {name: card.weights_hash for name, card in cards.items()}
        versions |= {name: store.dataset_version(name) for name in self.datasets if name not in skip}
        versions |= {name: store.dataset_version(name, partition) for name in self.round_datasets if name not in skip}
        return Read(cards, versions)


def training_prompts(store: Store) -> pa.Array | None:
    """The prompts of the training data (curated, else teacher_labeled), which the harness's prompts
    are checked against; None when neither is materialized."""
    name = next((name for name in TRAINING_DATA if store.has_dataset(name)), None)
    return store.read_dataset(name, columns=["prompt"])["prompt"].combine_chunks() if name else None

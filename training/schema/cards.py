"""The model card: what identifies a model in lineage, where its checkpoint is, and what the asset that
made it adds."""

from pydantic import BaseModel, ConfigDict


class ModelCard(BaseModel):
    """A model's identity (built by `training.models.checkpoints.model_card`), where it loads from, and
    the figures its asset adds; the store writes and reads it as card.json (`Store.write_card`, `read_card`).

    Unknown keys are forbidden: every key a card holds is declared here, so a misspelt field fails
    where the card is built or read instead of being dropped or carried unread; the card.json files
    of existing stores load as they are, their keys being exactly these. A field never given stays
    out of card.json, lineage and metadata (`as_dict`), so every card keeps exactly the keys its
    asset gave it (a null `revision` included)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # identity: every card has these
    name: str  # a configured model's hub id or path, embedded-teacher / embedded-student, or the asset that trained it
    revision: str | None  # the hub revision; None: the default branch, or a checkpoint trained here
    weights_hash: str  # sha256 over the parameters: the model's version in lineage and Dagster
    num_parameters: int  # every parameter, embeddings included
    vocab_size: int  # rows of the output embedding: every top-k id is below it
    tokenizer_size: int  # len(tokenizer): the ids the tokenizer can produce
    tokenizer_hash: str  # over the vocabulary and special tokens: equal hashes, equal token ids
    chat_template_hash: str | None  # None: no chat template (raw text)
    path: str | None = None  # what loads it: a configured model's hub id or path; the store's directory for its checkpoints

    # teacher_model
    teacher_id: str | None = None  # the id its rows' `teacher_id` column names it by (labeling.TEACHER_ID when not given)
    other_teachers: dict[str, str] | None = None  # teacher_model's other teachers: id → weights hash (their cards: teachers/<id>)
    # teacher_model, student_model
    context_length: int | None = None  # max_position_embeddings, when the model's config states it
    # teacher_model, student_model: the embedded pair, trained here
    eval_exact_match: float | None = None  # greedy exact match on the eval problems after training
    task: str | None = None  # embedded: the task it was trained on
    train_steps: int | None = None  # SFT steps
    instruction_share: float | None = None  # share of each batch in the instruction language (writing new problems)
    correction_share: float | None = None  # share of the solutions that continue truly after a wrong step
    varied_steps: bool | None = None  # each step written short or long at random
    train_seconds: float | None = None
    final_loss: float | None = None  # the last step's loss

    # offline_student
    objective: str | None = None  # its training objective
    parent: str | None = None  # offline_student: student_model's weights hash; a round's checkpoint: its parent's name
    # student_checkpoint of a round
    round: str | None = None  # the round's key
    parent_round: str | None = None  # None: round 1, whose parent is offline_student
    parent_checkpoint: str | None = None  # the parent's weights hash
    mix: float | None = None  # λ: the share of batches drawn from the student's own samples
    online: bool | None = None  # sampled fresh at every on-policy step, else from the round's teacher_feedback
    alignment: dict[str, float] | None = None  # a teacher of another tokenizer: how much of its signal met the student's tokens
    teacher: str | None = None  # who scored its samples: the teacher's name, or a self round's checkpoint (e.g. offline_student)

    def as_dict(self) -> dict:
        """The card as card.json, lineage and metadata hold it: the fields it was given, no others."""
        return self.model_dump(exclude_unset=True)

    def extended(self, **fields) -> "ModelCard":
        """This card with `fields` added or replaced, validated (`model_copy(update=...)` is not: a
        misspelt field would vanish from card.json)."""
        return ModelCard(**{**self.as_dict(), **fields})

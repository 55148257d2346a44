"""`teacher_model` and `student_model`: the embedded pair, or a configured model recorded as is."""

import hashlib
import json

import dagster as dg

from assets.config import EMBEDDED, ModelConfig, StudentModelConfig, TeacherModelConfig
from assets.inputs import OTHER_TEACHERS
from assets.publish import metadata, record_lineage
from storage.store import Store
from training.data.labeling import TEACHER_ID
from training.embedded.pair import train_embedded
from training.launch.report import Reporter
from training.models.checkpoints import STUDENT_ARCHITECTURE, TEACHER_ARCHITECTURE, Architecture, load_model, model_card, save_model
from training.schema.cards import ModelCard
from training.tasks import get_task
from training.trainer.settings import TrainingSettings

EMBEDDED_WARMUP_STEPS = 50


def _record_configured(store: Store, name: str, config: ModelConfig, **fields) -> ModelCard:
    """A hub id or local path: load it (failing early if it cannot be), record its card, train nothing."""
    model, tokenizer = load_model(config.model, config.revision, config.trust_remote_code)
    card = model_card(config.model, model, tokenizer, config.revision).extended(
        path=config.model, context_length=getattr(model.config, "max_position_embeddings", None), **fields)
    store.write_card(name, card)
    return card


def _train_and_save(context, store: Store, name: str, config: TeacherModelConfig | StudentModelConfig,
                    architecture: Architecture, **fields) -> ModelCard:
    """Trains an embedded model from scratch with SFT on the task, evaluates it, saves it by content."""
    settings = TrainingSettings(objective="sft", steps=config.train_steps, batch_size=config.batch_size,
                                micro_batch_size=config.micro_batch_size, learning_rate=config.learning_rate,
                                warmup_steps=EMBEDDED_WARMUP_STEPS, seed=config.seed)
    model, tokenizer, curve, accuracy, seconds = train_embedded(
        architecture.resized(config.hidden_size, config.num_hidden_layers), settings, config.eval_problems,
        get_task(config.task).config, instruction_share=config.instruction_share,
        correction_share=config.correction_share, varied_steps=config.varied_steps,
        reporter=Reporter(context.log.info, lambda message: None),
    )
    card = model_card(f"embedded-{name}", model, tokenizer).extended(
        eval_exact_match=accuracy,
        task=config.task,
        train_steps=config.train_steps,
        instruction_share=config.instruction_share,
        correction_share=config.correction_share,
        varied_steps=config.varied_steps,
        train_seconds=round(seconds, 1),
        final_loss=curve[-1]["loss"],
        context_length=model.config.max_position_embeddings,
        **fields,
    )
    return store.save_model(name, card, lambda directory: save_model(model, tokenizer, directory))


def _model(context, store: Store, name: str, config, architecture: Architecture, **fields) -> ModelCard:
    """The embedded model trained and saved, or a configured one recorded, as `name`'s card (with `fields`)."""
    if config.model == EMBEDDED:
        return _train_and_save(context, store, name, config, architecture, **fields)
    return _record_configured(store, name, config, **fields)


def _published(context, store: Store, config, card: ModelCard, version: str) -> dg.MaterializeResult:
    record_lineage(context, store, config, {}, card.as_dict())
    path = {"path": dg.MetadataValue.path(card.path)} if card.path else {}
    return dg.MaterializeResult(metadata={**metadata(card.as_dict()), **path}, data_version=dg.DataVersion(version))


@dg.asset(group_name="models", pool="accelerator", kinds={"pytorch"})
def teacher_model(context: dg.AssetExecutionContext, config: TeacherModelConfig, store: dg.ResourceParam[Store]):
    """The teacher, or several (`others`). Embedded: a Llama trained from scratch on the arithmetic
    train split, to solve problems and, in a small instruction language, to write new ones (for
    `expanded`, `synthesized`)."""
    others = {}
    for other in config.others:  # an embedded one: this teacher's training with its own seed and learning rate
        settings = TeacherModelConfig(**{**config.model_dump(exclude={"others", "teacher_id"}),
                                         **other.model_dump(exclude={"teacher_id"}, exclude_unset=True)})
        others[other.teacher_id] = _model(context, store, f"{OTHER_TEACHERS}/{other.teacher_id}", settings, TEACHER_ARCHITECTURE,
                                          teacher_id=other.teacher_id)
    panel = {"other_teachers": {teacher_id: other.weights_hash for teacher_id, other in others.items()}} if others else {}
    card = _model(context, store, "teacher", config, TEACHER_ARCHITECTURE, teacher_id=config.teacher_id, **panel)
    renamed = others or config.teacher_id != TEACHER_ID  # the ids are in the rows: a new one makes them stale
    version = hashlib.sha256(json.dumps([card.weights_hash, config.teacher_id, card.other_teachers]).encode()).hexdigest() \
        if renamed else card.weights_hash
    return _published(context, store, config, card, version)


@dg.asset(group_name="models", pool="accelerator", kinds={"pytorch"})
def student_model(context: dg.AssetExecutionContext, config: StudentModelConfig, store: dg.ResourceParam[Store]):
    """The student before distillation. Embedded: a ~6× smaller Llama on the same tokenizer, with a
    short SFT warm start on ground-truth solutions, so that it starts well under the teacher."""
    card = _model(context, store, "student", config, STUDENT_ARCHITECTURE)
    return _published(context, store, config, card, card.weights_hash)

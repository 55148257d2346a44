"""`teacher_model` and `student_model`: the embedded pair, or a configured model recorded as is."""

import dagster as dg

from assets.config import EMBEDDED, ModelConfig, StudentModelConfig, TeacherModelConfig
from assets.publish import metadata, record_lineage
from storage.store import Store
from training.embedded.pair import train_embedded
from training.launch.report import Reporter
from training.models.checkpoints import STUDENT_ARCHITECTURE, TEACHER_ARCHITECTURE, Architecture, load_model, model_card, save_model
from training.trainer.settings import TrainingSettings

EMBEDDED_WARMUP_STEPS = 50


def _record_configured(context, store: Store, name: str, config: ModelConfig) -> dg.MaterializeResult:
    """A hub id or local path: load it (failing early if it cannot be), record its card, train nothing."""
    model, tokenizer = load_model(config.model, config.revision, config.trust_remote_code)
    card = model_card(config.model, model, tokenizer, config.revision).extended(
        path=config.model, context_length=getattr(model.config, "max_position_embeddings", None))
    store.write_card(name, card)
    record_lineage(context, store, config, {}, card.as_dict())
    return dg.MaterializeResult(metadata=metadata(card.as_dict()), data_version=dg.DataVersion(card.weights_hash))


def _train_and_save(context, store: Store, name: str, config: TeacherModelConfig | StudentModelConfig,
                    architecture: Architecture) -> dg.MaterializeResult:
    """Trains an embedded model from scratch with SFT on the task, evaluates it, saves it by content."""
    settings = TrainingSettings(objective="sft", steps=config.train_steps, batch_size=config.batch_size,
                                micro_batch_size=config.micro_batch_size, learning_rate=config.learning_rate,
                                warmup_steps=EMBEDDED_WARMUP_STEPS, seed=config.seed)
    model, tokenizer, curve, accuracy, seconds = train_embedded(
        architecture, settings, config.eval_problems, instruction_share=config.instruction_share,
        correction_share=config.correction_share, varied_steps=config.varied_steps,
        reporter=Reporter(context.log.info, lambda message: None),
    )
    card = model_card(f"embedded-{name}", model, tokenizer).extended(
        eval_exact_match=accuracy,
        train_steps=config.train_steps,
        instruction_share=config.instruction_share,
        correction_share=config.correction_share,
        varied_steps=config.varied_steps,
        train_seconds=round(seconds, 1),
        final_loss=curve[-1]["loss"],
        context_length=model.config.max_position_embeddings,
    )
    card = store.save_model(name, card, lambda directory: save_model(model, tokenizer, directory))
    record_lineage(context, store, config, {}, card.as_dict())
    return dg.MaterializeResult(
        metadata={**metadata(card.as_dict()), "path": dg.MetadataValue.path(card.path)},
        data_version=dg.DataVersion(card.weights_hash),
    )


@dg.asset(group_name="models", pool="accelerator", kinds={"pytorch"})
def teacher_model(context: dg.AssetExecutionContext, config: TeacherModelConfig, store: dg.ResourceParam[Store]):
    """The teacher. Embedded: a Llama trained from scratch on the arithmetic train split, to solve
    problems and, in a small instruction language, to write new ones (for `expanded`, `synthesized`)."""
    if config.model != EMBEDDED:
        return _record_configured(context, store, "teacher", config)
    return _train_and_save(context, store, "teacher", config, TEACHER_ARCHITECTURE)


@dg.asset(group_name="models", pool="accelerator", kinds={"pytorch"})
def student_model(context: dg.AssetExecutionContext, config: StudentModelConfig, store: dg.ResourceParam[Store]):
    """The student before distillation. Embedded: a ~6× smaller Llama on the same tokenizer, with a
    short SFT warm start on ground-truth solutions, so that it starts well under the teacher."""
    if config.model != EMBEDDED:
        return _record_configured(context, store, "student", config)
    return _train_and_save(context, store, "student", config, STUDENT_ARCHITECTURE)

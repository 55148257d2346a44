"""`offline_student` and `evals`: distill the student on the stored teacher signal, then measure
every model on the eval split."""

import dagster as dg

from assets.config import TRAINING_DATA, EvalsConfig, OfflineStudentConfig
from assets.inputs import CARD_OF, Inputs, not_chosen, signal_teacher, training_prompts
from assets.publish import metadata, publish_evals, record_lineage, rounded
from assets.student_runs import chat_templates, curve_metrics, distill_and_save, loss_curve
from storage.store import Store
from training.evals.evaluate import evaluate, evaluate_checkpoints
from training.evals.harness import check_harness, harness_results
from training.models.checkpoints import load_model
from training.tasks import task_of

OFFLINE_STUDENT = Inputs(cards=["student_model", "teacher_model"], datasets=[*TRAINING_DATA, "eval_set"])
EVALS = Inputs(cards=["teacher_model", "student_model", "offline_student"], datasets=["eval_set"])


@dg.asset(group_name="students", pool="accelerator", kinds={"pytorch"}, deps=OFFLINE_STUDENT.deps)
def offline_student(context: dg.AssetExecutionContext, config: OfflineStudentConfig, store: dg.ResourceParam[Store]):
    """The student after offline distillation on the stored teacher signal (SeqKD or supervised KD),
    trained by the command `python -m training.launch`."""
    read = OFFLINE_STUDENT.read(store, skip=not_chosen(config.train_on))
    student, teacher = read.cards["student_model"], signal_teacher(store, read.cards["teacher_model"], config.teachers)
    card, curve = distill_and_save(context, store, "offline_student", config, student, teacher, store.shard_paths(config.train_on),
                                   card_fields={"objective": config.objective, "parent": student.weights_hash})
    eval_rows = store.read_dataset("eval_set")
    results = evaluate(*load_model(card.path), eval_rows, task_of(eval_rows), seed=config.seed)
    metrics = {**curve_metrics(curve), **{f"eval_{name}": value for name, value in results.items()}}
    inputs = {**read.versions, **chat_templates(teacher, student)}
    record_lineage(context, store, config, inputs, {**card.as_dict(), **metrics})
    return dg.MaterializeResult(
        metadata={
            **metadata(metrics), "weights_hash": card.weights_hash, "path": dg.MetadataValue.path(card.path),
            "trained_on": config.train_on, "inputs": dg.MetadataValue.json(inputs),
            **({"alignment": dg.MetadataValue.json(card.alignment)} if card.alignment else {}),
            "loss_curve": loss_curve(curve, "offline_student training loss"),
        },
        data_version=dg.DataVersion(card.weights_hash),
    )


@dg.asset(group_name="students", pool="accelerator", kinds={"parquet"}, deps=EVALS.deps)
def evals(context: dg.AssetExecutionContext, config: EvalsConfig, store: dg.ResourceParam[Store]):
    """Exact match (greedy, sampled at T=1) on the eval split for the teacher, the initial student and
    the offline student, each student's reverse KL to the teacher on its own samples, and the
    lm-evaluation-harness tasks of `harness` on each."""
    check_harness(config.harness)
    eval_rows = store.read_dataset("eval_set")
    read = EVALS.read(store)
    cards = {CARD_OF[name]: card for name, card in read.cards.items()}
    results = evaluate_checkpoints(cards, cards["teacher"], eval_rows, task_of(eval_rows), config.seed, context.log.info)
    harness, overlaps = harness_results(cards, config.harness, config.seed, training_prompts(store), context.log.warning)
    path, rows = publish_evals(context, store, results, cards, None, harness)
    record_lineage(context, store, config, read.versions, {"rows": len(rows), **overlaps})
    lines = ["| model | metric | value |", "|---|---|---|"] + [f"| {r['model']} | {r['metric']} | {rounded(r['value'])} |" for r in rows]
    summary = metadata({f"{r['model']}/{r['metric']}": r["value"] for r in rows} | overlaps)
    return dg.MaterializeResult(metadata={**summary, "table": dg.MetadataValue.md("\n".join(lines)), "path": dg.MetadataValue.path(path)})

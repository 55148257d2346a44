"""`offline_student` and `evals`: distill the student on the stored teacher signal, then measure
every model on the eval split."""

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq

from assets.datasets import dataset_version, eval_set, teacher_labeled
from assets.models import student_model, teacher_model
from pipelines.publish import file_version, png_markdown, record_lineage
from pipelines.catalog import refresh_catalog
from pipelines.resources import DistillStore
from pipelines.settings import EvalsConfig, OfflineStudentConfig
from pipelines.store import Store
from training.distill import DistillConfig, check_compatible
from training.evaluate import evaluate
from training.models import load_model, model_card

MODELS = ["teacher", "student", "offline_student"]


def training_data(store: Store) -> str:
    """`curated` when it has been built, else `teacher_labeled`."""
    return "curated" if store.dataset_path("curated").exists() else "teacher_labeled"


def launch_distill(context: dg.AssetExecutionContext, run: DistillConfig, work: Path) -> tuple:
    """Runs `python -m training.distill --config run.json` as a subprocess (the plain command a
    multi-GPU launcher would start instead), logs its output, and fails with its stderr. Returns the
    trained (model, tokenizer) and its curve."""
    run.loss_objective()  # parameter errors before launching anything
    config_path = work / "run.json"
    config_path.write_text(json.dumps(asdict(run)))
    done = subprocess.run([sys.executable, "-m", "training.distill", "--config", config_path], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        context.log.info(line)
    if done.returncode != 0:
        raise RuntimeError(f"training.distill failed:\n{done.stderr[-3000:]}")
    model, tokenizer = load_model(run.output)
    return model, tokenizer, json.loads((Path(run.output) / "curve.json").read_text())


def curve_metrics(curve: list[dict]) -> dict:
    """The headline figures of a training curve."""
    seconds, tokens = curve[-1]["seconds"], sum(c["completion_tokens"] for c in curve)
    return {
        "final_loss": curve[-1]["loss"], "steps": len(curve), "train_seconds": round(seconds, 1),
        "completion_tokens": tokens, "completion_tokens_per_second": round(tokens / seconds),
    }


def write_evals(store: Store, rows: list[dict], run_id: str, round_key: str | None, file_name: str) -> Path:
    """Appends eval rows (model, checkpoint, split, metric, value) to `evals`, stamped with the round and run."""
    table = pa.Table.from_pylist(rows)
    n = table.num_rows
    table = table.append_column("round", pa.repeat(pa.scalar(round_key, pa.string()), n))
    table = table.append_column("run_id", pa.repeat(pa.scalar(run_id), n))
    table = table.append_column("created_at", pa.repeat(pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC")), n))
    return store.write_dataset("evals", table, file_name=file_name)


def loss_curve(curve: list[dict], title: str = "offline_student training loss") -> dg.MetadataValue:
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([c["step"] for c in curve], [c["loss"] for c in curve])
    axis.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    return png_markdown(figure, "loss")


@dg.asset(
    group_name="students", pool="accelerator", kinds={"pytorch"},
    deps=[student_model, teacher_model, teacher_labeled, "curated", eval_set],
)
def offline_student(context: dg.AssetExecutionContext, config: OfflineStudentConfig, store: DistillStore):
    """The student after offline distillation on the stored teacher signal (SeqKD or supervised KD),
    trained by the plain command `python -m training.distill`."""
    distill_store = store.open()
    student, teacher = distill_store.read_card("student"), distill_store.read_card("teacher")
    dataset = training_data(distill_store)
    data_path = distill_store.dataset_path(dataset)
    signal = pq.read_table(data_path, columns=["sample_id", "k", "topk_ids"])
    check_compatible(signal, student["vocab_size"], teacher["vocab_size"], config.k)  # before launching anything
    with tempfile.TemporaryDirectory(dir=distill_store.root) as work:
        run = DistillConfig(
            student=student["path"], data=[str(data_path)], output=f"{work}/checkpoint",
            teacher_vocab_size=teacher["vocab_size"], **config.distill_settings(),
        )
        model, tokenizer, curve = launch_distill(context, run, Path(work))
        card = {**model_card("offline_student", model, tokenizer), "objective": config.objective, "parent": student["weights_hash"]}
        # the whole output: weights, tokenizer, curve.json and the run's distill_config.json
        card = distill_store.save_model("offline_student", card, lambda directory: shutil.copytree(run.output, directory))
        eval_rows = distill_store.read_dataset("eval_set")
        results = evaluate(model, tokenizer, eval_rows["prompt"].to_pylist(), eval_rows["answer"].to_pylist(), seed=config.seed)
    metrics = {**curve_metrics(curve), **{f"eval_{name}": value for name, value in results.items()}}
    inputs = {dataset: file_version(data_path), "student_model": student["weights_hash"], "teacher_model": teacher["weights_hash"]}
    record_lineage(context, distill_store, config, inputs, {**card, **metrics})
    return dg.MaterializeResult(
        metadata={
            **metrics, "weights_hash": card["weights_hash"], "path": dg.MetadataValue.path(card["path"]),
            "trained_on": dataset, "inputs": dg.MetadataValue.json(inputs),
            "loss_curve": loss_curve(curve),
        },
        data_version=dg.DataVersion(card["weights_hash"]),
    )


@dg.asset(group_name="students", pool="accelerator", kinds={"parquet"}, deps=[teacher_model, student_model, offline_student, eval_set])
def evals(context: dg.AssetExecutionContext, config: EvalsConfig, store: DistillStore):
    """Exact match (greedy, sampled at T=1) on the eval split for the teacher, the initial student and
    the offline student, and each student's reverse KL to the teacher on its own samples."""
    distill_store = store.open()
    eval_rows = distill_store.read_dataset("eval_set")
    prompts, answers = eval_rows["prompt"].to_pylist(), eval_rows["answer"].to_pylist()
    teacher_card = distill_store.read_card("teacher")
    teacher, teacher_tokenizer = load_model(teacher_card["path"], teacher_card.get("revision"))
    rows = []
    for name in MODELS:
        card = distill_store.read_card(name)
        if name == "teacher":
            results = evaluate(teacher, teacher_tokenizer, prompts, answers, seed=config.seed)
        else:
            model, tokenizer = load_model(card["path"], card.get("revision"))
            results = evaluate(model, tokenizer, prompts, answers, teacher, config.seed)
        context.log.info(f"{name}: {results}")
        rows += [{"model": name, "checkpoint": card["weights_hash"], "split": "eval", "metric": metric, "value": value}
                 for metric, value in results.items()]
    path = write_evals(distill_store, rows, context.run_id, None, f"part-{context.run_id}.parquet")
    record_lineage(context, distill_store, config, {"eval_set": dataset_version(distill_store, "eval_set")}, {"rows": len(rows)})
    refresh_catalog(distill_store)
    summary = {f"{r['model']}/{r['metric']}": r["value"] for r in rows}
    lines = ["| model | metric | value |", "|---|---|---|"] + [f"| {r['model']} | {r['metric']} | {r['value']:.4f} |" for r in rows]
    return dg.MaterializeResult(metadata={**summary, "table": dg.MetadataValue.md("\n".join(lines)), "path": dg.MetadataValue.path(str(path))})

"""What `offline_student` and `student_checkpoint` share: one function that distills a student by the
training command, in a Dagster Pipes session, and saves it by content; the figures of its curve."""

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import dagster as dg
import duckdb
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.config import TrainingConfig
from assets.publish import png_markdown
from storage.store import Store
from training.feedback.pairs import ranked_lists
from training.launch.command import DistillCommand, command_line
from training.models.chat import RAW
from training.rounds.online import OnlineSettings
from training.schema.cards import ModelCard
from training.schema.tables import parquet
from training.trainer.objectives import OBJECTIVES
from training.trainer.settings import TrainingSettings
from training.trainer.sources import check_compatible


def _launch_distill(context: dg.AssetExecutionContext, run: DistillCommand, work: Path) -> tuple[list[dict], dict]:
    """Runs the training command with its launcher (`command_line`) in a Dagster Pipes session: rank
    0's progress lines stream into the run's log while it trains. Fails with the command's stderr.
    Returns the training curve and what rank 0 reported at the end (its weights hash)."""
    config_path = work / "run.json"
    config_path.write_text(run.model_dump_json())
    with warnings.catch_warnings():  # Dagster marks a getter that its own message handler calls as "preview"
        warnings.simplefilter("ignore", dg.PreviewWarning)
        with dg.open_pipes_session(context, dg.PipesEnvContextInjector(), dg.PipesTempFileMessageReader()) as session:
            done = subprocess.run(command_line(run, config_path), stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **session.get_bootstrap_env_vars()})
    if done.returncode != 0:
        raise RuntimeError(f"the training command failed:\n{done.stderr[-3000:]}")
    reported = {key: value for message in session.get_custom_messages() for key, value in message.items()}
    return json.loads((Path(run.output) / "curve.json").read_text()), reported


def distill_and_save(context: dg.AssetExecutionContext, store: Store, name: str, settings: TrainingConfig, start: ModelCard,
                     teacher: ModelCard, data: list[Path], rollouts: list[Path] = (), card_fields: dict | None = None,
                     partition: str | None = None, online: OnlineSettings | None = None) -> tuple[ModelCard, list[dict]]:
    """Distills the student `start` (a model card) on `data` (and `rollouts`, or with `online` fresh
    samples, drawn with probability `settings.mix`) by the training command, and saves the whole output
    (weights, tokenizer, card.json, curve.json, distill_config.json) by content as model `name` (a round's
    checkpoint with `partition`), its card extended by `card_fields`. Bad input stops before anything is
    launched. The work happens in work/<name>/<partition>/ under the store, kept when the training
    fails or is killed, so that with `checkpoint_every` a re-run with the same settings and inputs
    resumes it. Returns (card, curve)."""
    if settings.lora is not None and not settings.lora.merge:
        raise ValueError(f"{name} is evaluated and served as a whole checkpoint: keep lora.merge true")
    for path in [*data, *rollouts] if teacher.tokenizer_hash == start.tokenizer_hash else []:  # else aligned as drawn
        if "topk_ids" in pq.read_schema(path).names:  # pairs and ranked lists are checked as they are drawn (RowCheck)
            chosen = settings.teachers and path in data  # the rows of the named teachers only
            rows = pq.read_table(path, columns=["sample_id", "k", "topk_ids", *(["teacher_id"] if chosen else [])])
            rows = rows.filter(pc.is_in(rows["teacher_id"], pa.array(settings.teachers))) if chosen else rows
            if rows.num_rows:
                check_compatible(rows, start.vocab_size, settings.k)
    teacher_tokens = store.token_texts_path(teacher.tokenizer_hash)  # stored by teacher_labeled: no teacher checkpoint needed
    work = store.root / "work" / name / (partition or "all")  # stable: a killed training resumes from it
    shutil.rmtree(work / "checkpoint", ignore_errors=True)  # a killed run's partial output (its resumable state stays)
    work.mkdir(parents=True, exist_ok=True)
    run = DistillCommand(
        **settings.model_dump(include={*TrainingSettings.model_fields, "launch"}), student=start.path,
        data=[str(p) for p in data], rollouts=[str(p) for p in rollouts],
        output=str(work / "checkpoint"), teacher=str(teacher_tokens) if teacher_tokens.exists() else teacher.path, online=online,
    )
    curve, reported = _launch_distill(context, run, work)
    trained = ModelCard.model_validate_json((Path(run.output) / "card.json").read_text()).extended(name=name, **(card_fields or {}))
    if reported.get("weights_hash") != trained.weights_hash:
        raise RuntimeError(f"the training wrote weights {trained.weights_hash} but reported {reported.get('weights_hash')} "
                           "through Dagster Pipes (rank 0 reports them at the end): see the run's log for its output")
    saved = store.save_model(name, trained, lambda directory: shutil.copytree(run.output, directory), partition=partition)
    store.remove_work(work)
    return saved, curve


def ranking_data(store: Store, name: str, objective: str, pairs: str, judgments: str, start: ModelCard,
                 partition: str | None) -> list[Path]:
    """What a ranking objective trains `start` (as model `name`) on: the shards of the dataset `pairs`
    (their DPO reference must be `start`), or for a listwise objective the judged lists of `judgments`,
    written once per judgments version into the training's work directory (`distill_and_save` removes
    it once trained; a killed training resumes on the same file). Fails before training on pairs whose
    reference is another checkpoint."""
    if "ranked" in OBJECTIVES[objective].takes:
        path = store.root / "work" / name / (partition or "all") / f"ranked.{store.dataset_version(judgments, partition)}.parquet"
        if not path.exists():
            with duckdb.connect() as connection:
                lists = ranked_lists(connection, store.shard_paths(judgments, partition))
                store.write_work_file(lists, str(path.relative_to(store.root / "work")))
        if not pq.read_metadata(path).num_rows:
            raise ValueError(f"{judgments} has no prompt with two scored candidates to rank: sample more responses per prompt (n), "
                             "or add judges")
        return [path]
    paths = store.shard_paths(pairs, partition)
    found = duckdb.sql(f"SELECT DISTINCT reference_weights_hash, reference_rendering FROM {parquet(paths)}").fetchall()
    if found != [(start.weights_hash, start.chat_template_hash or RAW)]:
        where = f"{pairs}[{partition}]" if partition else pairs
        raise ValueError(f"{where} holds reference log-probs of (checkpoint, template) {sorted(found)}, but training starts from "
                         f"{start.weights_hash} with template {start.chat_template_hash or RAW}: materialize {pairs} again, so "
                         "that its reference is the checkpoint trained")
    return paths


def chat_templates(teacher: ModelCard, student: ModelCard) -> dict:
    """The two chat templates a distillation involves, for lineage: the teacher rendered the stored
    prompts with its own, the student trains on them rendered with its own (None: raw text)."""
    return {"teacher_chat_template": teacher.chat_template_hash, "student_chat_template": student.chat_template_hash}


def curve_metrics(curve: list[dict]) -> dict:
    """The headline figures of a training curve."""
    seconds, tokens = curve[-1]["seconds"], sum(c["completion_tokens"] for c in curve)
    return {
        "final_loss": curve[-1]["loss"], "steps": len(curve), "train_seconds": round(seconds, 1),
        "completion_tokens": tokens, "completion_tokens_per_second": round(tokens / seconds),
    }


def loss_curve(curve: list[dict], title: str) -> dg.MetadataValue:
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([c["step"] for c in curve], [c["loss"] for c in curve])
    axis.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    return png_markdown(figure, "loss")

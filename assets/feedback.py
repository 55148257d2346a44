"""Feedback: the teacher judges responses, the judgments become preference pairs, a student trains on
them with a ranking objective (training/feedback/, training/trainer/ranking.py).

Offline (group `feedback`), the dDPO path from offline_student:

    student_samples      offline_student samples n responses per prompt drawn from the training data
    teacher_judgments    the teacher judges every candidate: those samples and the teacher's own responses
                         to the same prompts (curated), by verifier, likelihood, LLM judge, corrections
    preference_pairs     chosen/rejected pairs by a pair policy, with offline_student's reference log-probs
    preference_student   offline_student trained on the pairs (DPO by default)

In a round (a partition of `rounds`, mode `preference`): round_judgments[r] judges the round's scored
rollouts (teacher_feedback[r]) and round_pairs[r] pairs them with the parent's reference log-probs;
student_checkpoint[r] trains on them (assets/rounds.py).
"""

import functools
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa

from assets.config import JudgmentsConfig, PairsConfig, PreferenceStudentConfig, RoundJudgmentsConfig, StudentRolloutsConfig
from assets.executor import ShardExecutor, ShardWork
from assets.inputs import Inputs, not_chosen, teacher_card
from assets.publish import metadata, publish_dataset, record_lineage
from assets.resources import ModelEngine
from assets.round_steps import ROUND, claim_round, parent_checkpoint, parent_versions, rollout_shard
from assets.student_runs import chat_templates, curve_metrics, distill_and_save, loss_curve, ranking_data
from storage.store import Store
from training.data.rollouts import draw_prompts
from training.engines.sampling import Sampling
from training.evals.evaluate import evaluate
from training.feedback.judge import check_rubric
from training.feedback.judgments import JudgmentSettings, by_prompt, judgments_table, offline_candidates, ungrouped, uniform_signal
from training.feedback.pairs import PairPolicy, pair_figures, pairs_relation, with_reference_logprobs
from training.models.checkpoints import load_model, load_tokenizer
from training.schema.cards import ModelCard
from training.schema.tables import parquet, with_constants
from training.tasks import task_of
from training.trainer.objectives import OBJECTIVES

FEEDBACK = dict(group_name="feedback", pool="accelerator")


def judge_shard(engines: dict, prompts: pa.Table, index: int, *, settings: JudgmentSettings, task, identity: dict):
    return judgments_table(engines["teacher"], ungrouped(prompts), settings, task, identity)


def pairs_shard(engines: dict, pairs: pa.Table, index: int, *, reference: ModelCard, run_id: str):
    with_reference = with_reference_logprobs(engines["reference"], pairs, reference.weights_hash)
    return with_constants(with_reference, pairs_run_id=run_id), {"pairs": pairs.num_rows}


def judge(context, store: Store, name: str, candidates: str, config: RoundJudgmentsConfig, model_engine: ModelEngine,
          shard_executor: ShardExecutor, inputs: dict, partition: str | None, parent_round: str | None):
    """`config.judged_by` judges the candidates of the SQL `candidates`, a shard of whole prompts at a
    time, and publishes them as `name`."""
    teacher = teacher_card(store, config.judged_by)
    inputs = {**inputs, "judge": config.judged_by, "judge_checkpoint": teacher.weights_hash}
    task = task_of(store.read_dataset("seed_prompts", columns=["task"]))
    identity = {"judge_model": teacher.name, "judge_weights_hash": teacher.weights_hash, "judgment_run_id": context.run.run_id,
                "round": partition}
    with duckdb.connect() as connection:
        asked = JudgmentSettings(**config.model_dump(exclude={"teacher_responses_from", "judged_by"}))
        settings = uniform_signal(connection, candidates, asked)
        if "judge" in settings.judges:  # the rubric's answer must be readable before any shard is judged
            check_rubric(load_tokenizer(teacher.path, teacher.revision, model_engine.trust_remote_code), settings.judge)
        source = store.write_work_file(by_prompt(connection, candidates), f"{name}.candidates.{partition or 'all'}.parquet")
    work = ShardWork(name, [source], {"teacher": model_engine.spec(teacher)},
                     functools.partial(judge_shard, settings=settings, task=task, identity=identity),
                     settings={"config": settings.model_dump(), "engine": model_engine.backend})
    shards, figures = shard_executor.run(context, store, work, partition, inputs)
    result = publish_dataset(context, store, name, shards, config=config, inputs=inputs, metrics={**figures, "prompts": figures["inputs"]},
                             parent_round=parent_round, preview=["origin", "completion", "verifier", "likelihood", "judge", "score"])
    source.unlink()
    return result


def pair(context, store: Store, name: str, judgments: list[Path], config: PairsConfig, model_engine: ModelEngine,
         shard_executor: ShardExecutor, reference: ModelCard, inputs: dict, partition: str | None, parent_round: str | None):
    """Pairs the judged candidates by the policy (streamed by DuckDB to a work file), adds the reference's
    log-probs shard by shard, publishes `name`."""
    with duckdb.connect() as connection:
        source = store.write_work_file(pairs_relation(connection, judgments, PairPolicy(**config.model_dump())),
                                       f"{name}.pairs.{partition or 'all'}.parquet")
        figures = pair_figures(connection, parquet([source]))
    if figures["pairs"] == 0:
        source.unlink()
        raise ValueError(f"no pairs: the judgments of {len(judgments)} shard(s) give no two candidates of one prompt with a margin "
                         f"above {config.min_margin}: sample more responses per prompt (n), lower min_margin, or add judges")
    inputs = {**inputs, "reference": reference.weights_hash}
    work = ShardWork(name, [source], {"reference": model_engine.local_spec(reference)},
                     functools.partial(pairs_shard, reference=reference, run_id=context.run.run_id),
                     settings={"config": config.model_dump(), "engine": model_engine.backend})
    shards, shard_figures = shard_executor.run(context, store, work, partition, inputs)
    result = publish_dataset(context, store, name, shards, config=config, parent_round=parent_round, inputs=inputs,
                             metrics={**shard_figures, **figures}, preview=["chosen", "rejected", "margin", "kind"])
    source.unlink()
    return result


STUDENT_SAMPLES = Inputs(cards=["offline_student"], datasets=["curated", "teacher_labeled"])


@dg.asset(**FEEDBACK, kinds={"parquet"}, deps=STUDENT_SAMPLES.deps)
def student_samples(context: dg.AssetExecutionContext, config: StudentRolloutsConfig, store: dg.ResourceParam[Store],
                    model_engine: ModelEngine, shard_executor: ShardExecutor):
    """offline_student's own responses, n per prompt drawn from `prompts_from`: the candidates the
    teacher judges against its own responses."""
    read = STUDENT_SAMPLES.read(store, skip=not_chosen(config.prompts_from))
    card = read.cards["offline_student"]
    prompts = draw_prompts(store.shard_paths(config.prompts_from), config.num_prompts, f"{config.sampling.seed}/offline")
    identity = {"student": "offline_student", "student_weights_hash": card.weights_hash, "tokenizer_hash": card.tokenizer_hash,
                "run_id": context.run.run_id}
    source = store.write_work_file(prompts, "student_samples.prompts.parquet")
    work = ShardWork("student_samples", [source], {"student": model_engine.spec(card)},
                     functools.partial(rollout_shard, sampling=Sampling(**config.sampling.model_dump()), round_number=0, identity=identity),
                     settings={"config": config.model_dump(), "engine": model_engine.backend})
    shards, figures = shard_executor.run(context, store, work, None, read.versions)
    result = publish_dataset(context, store, "student_samples", shards, config=config, inputs=read.versions, metrics=figures,
                             preview=["sample_id", "prompt", "completion", "num_tokens"])
    source.unlink()
    return result


TEACHER_JUDGMENTS = Inputs(cards=["teacher_model"], datasets=["student_samples", "curated", "teacher_labeled", "seed_prompts"])


@dg.asset(**FEEDBACK, kinds={"parquet"}, deps=TEACHER_JUDGMENTS.deps)
def teacher_judgments(context: dg.AssetExecutionContext, config: JudgmentsConfig, store: dg.ResourceParam[Store],
                      model_engine: ModelEngine, shard_executor: ShardExecutor):
    """The teacher judges every candidate response (student_samples and its own responses to the same
    prompts): verifier, likelihood, LLM judge and corrections as configured, one row per candidate."""
    unread = [name for name in ("curated", "teacher_labeled") if name != config.teacher_responses_from]
    read = TEACHER_JUDGMENTS.read(store, skip=tuple(unread))
    teachers = [] if config.teacher_responses_from == "none" else store.shard_paths(config.teacher_responses_from)
    candidates = offline_candidates(store.shard_paths("student_samples"), teachers)
    return judge(context, store, "teacher_judgments", candidates, config, model_engine, shard_executor, read.versions, None, None)


PREFERENCE_PAIRS = Inputs(cards=["offline_student"], datasets=["teacher_judgments"])


@dg.asset(**FEEDBACK, name="preference_pairs", kinds={"parquet"}, deps=PREFERENCE_PAIRS.deps)
def preference_pairs_dataset(context: dg.AssetExecutionContext, config: PairsConfig, store: dg.ResourceParam[Store],
                           model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Chosen/rejected pairs from teacher_judgments by the pair policy, with offline_student's
    log-probs of both responses (DPO's reference)."""
    read = PREFERENCE_PAIRS.read(store)
    return pair(context, store, "preference_pairs", store.shard_paths("teacher_judgments"), config, model_engine, shard_executor,
                read.cards["offline_student"], read.versions, None, None)


PREFERENCE_STUDENT = Inputs(cards=["offline_student", "teacher_model"], datasets=["preference_pairs", "teacher_judgments", "eval_set"])


@dg.asset(group_name="feedback", pool="accelerator", kinds={"pytorch"}, deps=PREFERENCE_STUDENT.deps)
def preference_student(context: dg.AssetExecutionContext, config: PreferenceStudentConfig, store: dg.ResourceParam[Store]):
    """offline_student trained on the teacher's preferences (dDPO): DPO on preference_pairs, or RRHF
    on the judged lists of teacher_judgments, by the command `python -m training.launch`."""
    listwise = "ranked" in OBJECTIVES[config.objective].takes
    read = PREFERENCE_STUDENT.read(store, skip=("preference_pairs",) if listwise else ("teacher_judgments",))
    start, teacher = read.cards["offline_student"], read.cards["teacher_model"]
    data = ranking_data(store, "preference_student", config.objective, "preference_pairs", "teacher_judgments", start, None)
    card, curve = distill_and_save(context, store, "preference_student", config, start, teacher, data,
                                   card_fields={"objective": config.objective, "parent": start.weights_hash})
    eval_rows = store.read_dataset("eval_set")
    results = evaluate(*load_model(card.path), eval_rows, task_of(eval_rows), seed=config.seed)
    metrics = {**curve_metrics(curve), **{f"eval_{name}": value for name, value in results.items()},
               **{f"final_{part}": curve[-1][part] for part in ("margin", "accuracy", "dpo", "rank") if part in curve[-1]}}
    inputs = {**read.versions, **chat_templates(teacher, start)}
    record_lineage(context, store, config, inputs, {**card.as_dict(), **metrics})
    return dg.MaterializeResult(
        metadata={**metadata(metrics), "weights_hash": card.weights_hash, "path": dg.MetadataValue.path(card.path),
                  "inputs": dg.MetadataValue.json(inputs), "loss_curve": loss_curve(curve, "preference_student training loss")},
        data_version=dg.DataVersion(card.weights_hash),
    )


ROUND_JUDGMENTS = Inputs(cards=["teacher_model"], datasets=["seed_prompts"], round_datasets=["teacher_feedback"])


@dg.asset(**ROUND, kinds={"parquet"}, deps=ROUND_JUDGMENTS.deps)
def round_judgments(context: dg.AssetExecutionContext, config: RoundJudgmentsConfig, store: dg.ResourceParam[Store],
                    model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Preference rounds: the teacher judges the round's rollouts (teacher_feedback[r]: the student's
    samples with the teacher's signal, so the likelihood judge needs no model call)."""
    key = context.partition_key
    parent, previous, card = parent_checkpoint(store, key)
    with claim_round(context):
        read = ROUND_JUDGMENTS.read(store, key)
        candidates = f"SELECT *, 'student' AS origin FROM {parquet(store.shard_paths('teacher_feedback', key))}"
        return judge(context, store, "round_judgments", candidates, config, model_engine, shard_executor,
                     {**read.versions, **parent_versions(parent, card)}, key, previous)


ROUND_PAIRS = Inputs(round_datasets=["round_judgments"])


@dg.asset(**ROUND, kinds={"parquet"}, deps=ROUND_PAIRS.deps)
def round_pairs(context: dg.AssetExecutionContext, config: PairsConfig, store: dg.ResourceParam[Store],
                model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Preference rounds: chosen/rejected pairs of the round's judged rollouts by the pair policy, with
    the parent checkpoint's log-probs of both responses (DPO's reference)."""
    key = context.partition_key
    parent, previous, card = parent_checkpoint(store, key)
    with claim_round(context):
        read = ROUND_PAIRS.read(store, key)
        return pair(context, store, "round_pairs", store.shard_paths("round_judgments", key), config, model_engine, shard_executor,
                    card, {**read.versions, **parent_versions(parent, card)}, key, previous)

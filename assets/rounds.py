"""On-policy rounds (GKD as Dagster partitions of `rounds`): per round r,

    student_rollouts[r]    the current student samples completions of training prompts (T = 1)
    teacher_feedback[r]    the teacher scores every sampled token (sparse top-k, tail mass), with the
                           student's own logprobs, the log-ratio sum and the verifier's reward
    student_checkpoint[r]  GKD from the parent: a share λ of the batches from the rollouts
    round_eval[r]          exact match and reverse KL on own samples, against the parent

An online round (student_checkpoint's `online: true`) needs neither student_rollouts nor
teacher_feedback: every on-policy step samples a fresh batch from the student as it is, the teacher
scores it, and the step trains on it (GKD's Algorithm 1, `training/rounds/online.py`); the batches are
published as online_feedback[r], every row with its policy_step and staleness.

The parent is round r−1's checkpoint (offline_student for r001), read through the store by key and
recorded in metadata and in `lineage` (parent_round, parent checkpoint hash, input data versions).
"""

import functools
import json
from pathlib import Path

import dagster as dg
import duckdb
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.config import TRAINING_DATA, EvalsConfig, StudentCheckpointConfig, StudentRolloutsConfig, TeacherFeedbackConfig
from assets.executor import ShardExecutor, ShardWork
from assets.inputs import Inputs, not_chosen, teacher_panel, training_prompts
from assets.partitions import round_number
from assets.publish import metadata, png_markdown, publish_dataset, publish_evals, record_lineage
from assets.resources import ModelEngine
from assets.round_steps import ROUND, claim_round, parent_checkpoint, parent_versions, rollout_shard, round_teacher, round_teachers
from assets.student_runs import chat_templates, curve_metrics, distill_and_save, loss_curve, ranking_data
from storage.catalog import query, refresh_catalog
from storage.store import Store
from training.data.rollouts import accepted_samples, draw_prompts, panel_feedback, student_scored_again, to_teacher_tokens
from training.engines.sampling import Sampling
from training.evals.evaluate import evaluate_checkpoints
from training.evals.harness import check_harness, harness_results
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.rounds.modes import ROUND_MODES, mode_of
from training.rounds.online import OnlineSettings
from training.schema.cards import ModelCard
from training.schema.signal import SignalSettings
from training.schema.tables import parquet
from training.tasks import task_name_of, task_of
from training.trainer.loop import rollout_reuse
from training.trainer.objectives import OBJECTIVES


def feedback_shard(engines: dict, rollouts: pa.Table, index: int, *, settings: SignalSettings, teachers: dict[str, ModelCard],
                   mixture: dict[str, float], task, student: ModelCard, trust_remote_code: bool = False):
    scorers = {t: engines[f"teacher:{t}"] for t in teachers}
    to_teacher = None  # the teachers share a tokenizer (round_teachers); another than the student's: they read the text in theirs
    if student.tokenizer_hash != next(iter(teachers.values())).tokenizer_hash:
        tokenizer = load_tokenizer(student.path, student.revision, trust_remote_code)
        ends = end_of_turn_ids(load_generation_config(student.path, student.revision), tokenizer)
        to_teacher = to_teacher_tokens(tokenizer, ends, next(iter(scorers.values())))
    return panel_feedback(scorers, engines.get("student"), rollouts, settings, teachers, task, mixture, to_teacher)


MAX_ROLLOUT_REUSE = 2

STUDENT_ROLLOUTS = Inputs(cards=["offline_student"], datasets=list(TRAINING_DATA))  # offline_student: round 1's parent


@dg.asset(**ROUND, kinds={"parquet"}, deps=STUDENT_ROLLOUTS.deps)
def student_rollouts(context: dg.AssetExecutionContext, config: StudentRolloutsConfig, store: dg.ResourceParam[Store],
                     model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Completions sampled from the current student (round r−1's checkpoint; offline_student for r001)
    on prompts drawn from `prompts_from` (curated), n per prompt, seeded by the round."""
    key = context.partition_key
    parent, previous, card = parent_checkpoint(store, key)
    with claim_round(context):
        read = STUDENT_ROLLOUTS.read(store, skip=("offline_student", *not_chosen(config.prompts_from)))
        prompts = draw_prompts(store.shard_paths(config.prompts_from), config.num_prompts, f"{config.sampling.seed}/{key}")
        identity = {"student": parent, "student_weights_hash": card.weights_hash, "tokenizer_hash": card.tokenizer_hash,
                    "round": key, "parent_round": previous, "run_id": context.run.run_id}
        inputs = {**read.versions, **parent_versions(parent, card)}
        source = store.write_work_file(prompts, f"student_rollouts.prompts.{key}.parquet")
        work = ShardWork("student_rollouts", [source], {"student": model_engine.spec(card)},
                         functools.partial(rollout_shard, sampling=Sampling(**config.sampling.model_dump()),
                                           round_number=round_number(key), identity=identity),
                         settings={"config": config.model_dump(), "engine": model_engine.backend})
        shards, metrics = shard_executor.run(context, store, work, key, inputs)
        result = publish_dataset(context, store, "student_rollouts", shards, config=config, inputs=inputs,
                                 metrics={**metrics, "parent": parent}, preview=["sample_id", "prompt", "completion", "num_tokens"],
                                 parent_round=previous)
        source.unlink()
        return result


TEACHER_FEEDBACK = Inputs(cards=["teacher_model"], datasets=["seed_prompts"], round_datasets=["student_rollouts"])


@dg.asset(**ROUND, kinds={"parquet"}, deps=TEACHER_FEEDBACK.deps)
def teacher_feedback(context: dg.AssetExecutionContext, config: TeacherFeedbackConfig, store: dg.ResourceParam[Store],
                     model_engine: ModelEngine, shard_executor: ShardExecutor):
    """The teacher scores every rollout token (top-k, the token's logprob, tail mass); per sequence the
    student–teacher log-ratio sum (a reverse-KL estimate), the verifier's reward, its baseline (the
    mean reward of the prompt's samples) and advantage. In a self round (`teacher: parent`) the
    parent scores its own samples."""
    key = context.partition_key
    parent, previous, card = parent_checkpoint(store, key)
    with claim_round(context):
        read = TEACHER_FEEDBACK.read(store, key)
        name, teachers = round_teachers(store, key, config.teacher, config.mixture)
        if len(teachers) > 1 and model_engine.backend == "openai":
            raise ValueError(f"teacher {name!r} scores with several teachers, and the 'openai' backend's base_urls serve one: use the "
                             "'hf' or 'vllm' backend, or name one teacher")
        checkpoints = {"teacher_checkpoint": next(iter(teachers.values())).weights_hash} if len(teachers) == 1 else \
            {f"teacher_model[{t}]": c.weights_hash for t, c in teachers.items()}
        inputs = {**read.versions, **parent_versions(parent, card), "teacher": name, **checkpoints}
        task = task_of(store.read_dataset("seed_prompts", columns=["task"]))
        rollouts, signal = store.shard_paths("student_rollouts", key), SignalSettings(**config.model_dump())
        engines = {f"teacher:{t}": model_engine.spec(c) for t, c in teachers.items()}
        if not rollouts or student_scored_again(pq.read_schema(rollouts[0]).empty_table(), signal):
            engines["student"] = model_engine.spec(card)  # rollouts stored without their sampled logprobs
        work = ShardWork("teacher_feedback", rollouts, engines,
                         functools.partial(feedback_shard, settings=signal, teachers=teachers, mixture=config.mixture, task=task,
                                           student=card, trust_remote_code=model_engine.trust_remote_code),
                         settings={"config": config.model_dump(), "engine": model_engine.backend})
        shards, metrics = shard_executor.run(context, store, work, key, inputs)
        return publish_dataset(context, store, "teacher_feedback", shards, config=config, inputs=inputs, metrics=metrics,
                               preview=["sample_id", "completion", "reward", "log_ratio_sum"], parent_round=previous)


STUDENT_CHECKPOINT = Inputs(cards=["teacher_model"], datasets=[*TRAINING_DATA, "seed_prompts"],
                            round_datasets=["teacher_feedback", "round_pairs", "round_judgments"])


@dg.asset(**ROUND, kinds={"pytorch"}, deps=STUDENT_CHECKPOINT.deps)
def student_checkpoint(context: dg.AssetExecutionContext, config: StudentCheckpointConfig, store: dg.ResourceParam[Store],
                       model_engine: ModelEngine):
    """GKD from the parent checkpoint, by the command `python -m training.launch`: with probability λ
    (`mix`) a batch is the student's own samples scored by the teacher (this round's teacher_feedback,
    or with `online` a fresh one, kept for online_feedback[r]), else the fixed curated data. With a
    ranking objective (a preference round), the student trains on this round's pairs (round_pairs, DPO)
    or judged lists (round_judgments, RRHF) instead."""
    key = context.partition_key
    parent, previous, card = parent_checkpoint(store, key)
    mode = mode_of(config.online, config.objective)
    ranked = "ranked" in OBJECTIVES[config.objective].takes
    reads = {"stored": [config.train_on, "teacher_feedback"], "online": [config.train_on, "seed_prompts"],
             "preference": ["round_judgments" if ranked else "round_pairs"]}[mode]  # the datasets this mode trains on
    reads += ["round_judgments"] if config.keep == "judged" else []  # the judged scores its samples are kept by
    for name in [] if mode == "online" else reads[1:] if mode == "stored" else reads:  # the round's own datasets
        if not store.has_dataset(name, key):
            raise FileNotFoundError(f"round {key} has no {name} yet: materialize it for {key} first" + (
                ", or train online (student_checkpoint config online: true)" if name == "teacher_feedback" else ""))
    with claim_round(context):
        read = STUDENT_CHECKPOINT.read(store, key, skip=tuple(name for name in STUDENT_CHECKPOINT.deps if name not in reads))
        teacher = feedback_teacher(store, key, read.cards["teacher_model"]) if mode == "stored" else read.cards["teacher_model"]
        online = online_settings(store, config, model_engine, key, context.run.run_id, (parent, previous, card), teacher) \
            if config.online else None
        if mode == "preference":
            data, feedback = ranking_data(store, "student_checkpoint", config.objective, "round_pairs", "round_judgments", card, key), []
        else:
            data, feedback = store.shard_paths(config.train_on), store.shard_paths("teacher_feedback", key) if mode == "stored" else []
        kept = {}
        if config.keep != "all":  # rejection sampling: the accepted samples, written once per (inputs, threshold)
            feedback = [kept_samples(store, key, feedback, config)]
            kept["kept_samples"] = pq.read_metadata(feedback[0]).num_rows  # read now: the training's work is removed once trained
        identity = {"round": key, **parent_versions(parent, card), "parent_round": previous, "mix": config.mix, "online": config.online,
                    "objective": config.objective, "teacher": teacher.name}
        new_card, curve = distill_and_save(context, store, "student_checkpoint", config, card, teacher, data,
                                           feedback, card_fields=identity, partition=key, online=online)
        on_policy = [c for c in curve if c["source"] == "on_policy"]
        metrics = {**curve_metrics(curve), "on_policy_steps": len(on_policy), "teacher": teacher.name,
                   **kept,
                   "mean_staleness": sum(c["staleness"] for c in on_policy) / len(on_policy) if on_policy else None,
                   "max_staleness": max((c["staleness"] for c in on_policy), default=None)}
        inputs = {**read.versions, **parent_versions(parent, card), **chat_templates(teacher, card)}
        if config.online:
            Path(online.prompts).unlink()
        elif mode == "stored":
            metrics["rollout_reuse"] = reuse = rollout_reuse(curve, config.batch_size, store.dataset_rows("teacher_feedback", key))
            if reuse > MAX_ROLLOUT_REUSE:
                context.log.warning(
                    f"each rollout of round {key} was drawn {reuse} times on average, so training is only loosely on-policy: "
                    "raise student_rollouts num_prompts or n, lower steps or mix, or train online"
                )
        record_lineage(context, store, config, inputs, {**metrics, "checkpoint": new_card.weights_hash}, previous)
    return dg.MaterializeResult(
        metadata={
            **metadata(metrics), "checkpoint": new_card.weights_hash, "path": dg.MetadataValue.path(new_card.path),
            "parent": parent, "parent_checkpoint": card.weights_hash, "inputs": dg.MetadataValue.json(inputs),
            "loss_curve": loss_curve(curve, f"student_checkpoint[{key}] training loss"),
            **({"alignment": dg.MetadataValue.json(new_card.alignment)} if new_card.alignment else {}),
        },
        data_version=dg.DataVersion(new_card.weights_hash),
    )


ONLINE_FEEDBACK = Inputs(cards=["student_checkpoint"])


@dg.asset(**ROUND, kinds={"parquet"}, deps=ONLINE_FEEDBACK.deps)
def online_feedback(context: dg.AssetExecutionContext, store: dg.ResourceParam[Store]):
    """Online rounds only: every batch the student sampled during training and trained on, scored by
    the teacher, with policy_step, trained_at_step and staleness: the batches student_checkpoint[r]
    left in work/online_batches/<round>/, one shard per on-policy step (read one at a time), published
    as online_feedback[r] and then removed."""
    key = context.partition_key
    read = ONLINE_FEEDBACK.read(store, key)
    card = read.cards["student_checkpoint"]
    if not card.online:
        raise ValueError(f"round {key} trained on its stored teacher_feedback, so it has no online batches: online_feedback "
                         "belongs to online rounds (job distill_round_online, or student_checkpoint config online: true)")
    batches = sorted((store.root / "work" / "online_batches" / key).glob("step-*.parquet"))
    if not batches:  # λ small, few steps: no batch was sampled, nothing to publish
        return dg.MaterializeResult(metadata={"batches": 0})
    writer = store.sharded_write("online_feedback", key, f"online-{context.run.run_id}")
    for index, path in enumerate(batches):
        writer.write(index, pq.read_table(path))
    inputs = {**read.versions, "parent": card.parent, "parent_checkpoint": card.parent_checkpoint}
    result = publish_dataset(context, store, "online_feedback", writer, config=None, inputs=inputs, metrics={"batches": len(batches)},
                             parent_round=card.parent_round,
                             preview=["policy_step", "staleness", "completion", "reward", "log_ratio_sum"])
    store.remove_work(batches[0].parent)
    return result


def kept_samples(store: Store, key: str, feedback: list[Path], config: StudentCheckpointConfig) -> Path:
    """The file of round `key`'s samples that `config.keep` accepts (the verifier's reward, or
    round_judgments' score, at least the threshold), in the round's work directory (removed once
    trained; a killed training resumes on the same file), written once per inputs and threshold."""
    judged = config.keep == "judged"
    judgments = store.shard_paths("round_judgments", key) if judged else []
    least = config.min_score if judged else config.min_reward
    versions = [store.dataset_version(name, key) for name in ("teacher_feedback", *(["round_judgments"] if judged else []))]
    kept = store.root / "work" / "student_checkpoint" / key / f"kept.{config.keep}.{'.'.join(versions)}.{least!r}.parquet"
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        accepted_samples(feedback, least, kept, judgments)
    return kept


def feedback_teacher(store: Store, key: str, teacher_model: ModelCard) -> ModelCard:
    """The card of the model that scored round `key`'s teacher_feedback, as its rows name it: the
    teacher_model, or in a self round the parent or an earlier checkpoint."""
    shards = store.shard_paths("teacher_feedback", key)
    found = duckdb.sql(f"SELECT DISTINCT teacher, teacher_weights_hash, tokenizer_hash FROM {parquet(shards)}").fetchall()
    if not found or teacher_model.weights_hash in {weights for _, weights, _ in found}:
        return teacher_model
    if named := [name for name, _, _ in found if not name.startswith("mixture(")]:
        return round_teacher(store, key, named[0])[1]
    # a mixture: its teachers share a tokenizer, so any one of them reads its ids
    return next(card for card in teacher_panel(store, teacher_model).values() if card.tokenizer_hash == found[0][2])


def online_settings(store: Store, config: StudentCheckpointConfig, model_engine: ModelEngine, key: str, run_id: str,
                    parent: tuple, teacher: ModelCard) -> OnlineSettings:
    """What the training needs to sample and score online: the round's prompts (drawn as
    student_rollouts draws them), the teacher and its engine (in process, or the openai backend's
    servers), and the identity stamped on every row. Fails before training on an engine it cannot use."""
    if model_engine.backend == "vllm":
        raise ValueError("online rounds score in the training process, with transformers (model_engine backend 'hf') or "
                         "on OpenAI-compatible servers (backend 'openai', e.g. vLLM's api_server serving the teacher); "
                         "the offline 'vllm' backend serves stored rounds: set online false, or serve the teacher")
    name, previous, card = parent
    rollouts = config.online_rollouts
    prompts = draw_prompts(store.shard_paths(rollouts.prompts_from), rollouts.num_prompts, f"{rollouts.sampling.seed}/{key}")
    remote = model_engine.backend == "openai"
    return OnlineSettings(
        **rollouts.model_dump(include=set(SignalSettings.model_fields) | {"sampling", "pipelined"}),
        round_number=round_number(key),
        prompts=str(store.write_work_file(prompts, f"student_checkpoint.prompts.{key}.parquet")),
        batches=str(store.root / "work" / "online_batches" / key),
        teacher=teacher.path, teacher_card=teacher,
        task=task_name_of(store.read_dataset("seed_prompts", columns=["task"])),
        identity={"student": name, "student_weights_hash": card.weights_hash, "tokenizer_hash": card.tokenizer_hash,
                  "round": key, "parent_round": previous, "run_id": run_id},
        teacher_base_urls=model_engine.base_urls if remote else [],
        teacher_served_model_name=model_engine.served_model_name if remote else "",
        teacher_api_key_env=model_engine.api_key_env or None, revision=teacher.revision,
        trust_remote_code=model_engine.trust_remote_code,
    )


def rounds_png(store: Store) -> dg.MetadataValue:
    """Over all rounds so far (round 0: the first parent): greedy and sampled exact match and the
    lm-evaluation-harness metrics the rounds recorded (dashed), and on a second axis the reverse KL to
    the teacher on the student's own samples (the one curve when the prompts have no reference answers)."""
    _, rows = query(store, "SELECT round, parent_greedy_exact_match, greedy_exact_match, sampled_exact_match, "
                           "parent_reverse_kl, reverse_kl FROM rounds ORDER BY round")
    rows = [[float("nan") if value is None else value for value in row] for row in rows]  # no reference answers: no point
    figure, axis = plt.subplots(figsize=(6, 3))
    numbers = [0] + [round_number(r[0]) for r in rows]
    axis.plot(numbers, [rows[0][1]] + [r[2] for r in rows], marker="o", label="greedy exact match")
    axis.plot(numbers[1:], [r[3] for r in rows], marker="s", label="sampled exact match (T=1)")
    _, evaluations = query(store, "SELECT partition, metrics FROM lineage WHERE asset = 'round_eval' QUALIFY "
                                  "row_number() OVER (PARTITION BY partition ORDER BY created_at DESC) = 1 ORDER BY partition")
    harness: dict[str, list[tuple[int, float]]] = {}
    for key, metrics in evaluations:
        for name, value in json.loads(metrics).items():
            if name.startswith("harness/") and not name.endswith("/overlap_with_training") and value is not None:
                harness.setdefault(name.removeprefix("harness/"), []).append((round_number(key), value))
    for name, points in harness.items():
        axis.plot(*zip(*points), linestyle="--", marker=".", label=name)
    axis.set(xlabel="round (0: offline_student)", ylabel="exact match, harness metrics", title="on-policy rounds")
    divergence = axis.twinx()
    divergence.plot(numbers, [rows[0][4]] + [r[5] for r in rows], marker="^", color="tab:red", label="reverse KL, own samples")
    divergence.set(ylabel="reverse KL per token")
    figure.legend(loc="lower right", fontsize="small")
    return png_markdown(figure, "rounds")


def rollout_figures(store: Store, dataset: str, key: str) -> dict:
    """The mean reward and the reverse KL per token (Σ log-ratio / tokens) of the round's scored
    rollouts in `dataset`; None when the round has none (an online round without on-policy steps)."""
    if not store.has_dataset(dataset, key):
        return {"rollout_reward": None, "rollout_reverse_kl_per_token": None}
    rollouts = store.read_dataset(dataset, key, columns=["reward", "log_ratio_sum", "num_tokens"])
    return {"rollout_reward": pc.mean(rollouts["reward"]).as_py(),
            "rollout_reverse_kl_per_token": pc.sum(rollouts["log_ratio_sum"]).as_py() / max(1, pc.sum(rollouts["num_tokens"]).as_py())}


ROUND_EVAL = Inputs(cards=["student_checkpoint", "teacher_model"], datasets=["eval_set"],
                    round_datasets=sorted({mode.scored for mode in ROUND_MODES.values()}))


@dg.asset(**ROUND, kinds={"parquet"}, deps=ROUND_EVAL.deps)
def round_eval(context: dg.AssetExecutionContext, config: EvalsConfig, store: dg.ResourceParam[Store]):
    """Greedy and sampled exact match on the eval split and reverse KL on the student's own samples,
    for the round's checkpoint and its parent; rows into `evals` with the round."""
    key = context.partition_key
    check_harness(config.harness)
    parent, previous, parent_card = parent_checkpoint(store, key)
    with claim_round(context):
        card = store.read_card("student_checkpoint", key)
        scored = ROUND_MODES[mode_of(card.online, card.objective or "supervised_kd")].scored  # the student's samples it trained on
        unread = [name for name in ROUND_EVAL.round_datasets if name != scored or not store.has_dataset(name, key)]
        read = ROUND_EVAL.read(store, key, skip=tuple(unread))
        eval_rows = store.read_dataset("eval_set")
        cards = {"student_checkpoint": card, parent: parent_card}
        results = evaluate_checkpoints(cards, read.cards["teacher_model"], eval_rows, task_of(eval_rows), config.seed, context.log.info)
        harness, overlaps = harness_results(cards, config.harness, config.seed, training_prompts(store), context.log.warning)
        path, _ = publish_evals(context, store, {"student_checkpoint": results["student_checkpoint"]}, cards, key,
                                [row for row in harness if row["model"] == "student_checkpoint"])
        for row in harness:  # beside the task-free metrics: in the metadata, lineage, and the sensor's choice of metric
            results[row["model"]][row["metric"]] = row["value"]
        trained_on = rollout_figures(store, scored, key)
        mine, theirs = results["student_checkpoint"], results[parent]
        gain = None if mine["greedy_exact_match"] is None else mine["greedy_exact_match"] - theirs["greedy_exact_match"]
        metrics = {
            **mine, "checkpoint": card.weights_hash,
            **{f"parent_{name}": value for name, value in theirs.items()},
            "improvement": gain, **trained_on, **overlaps,
        }
        inputs = {**read.versions, **parent_versions(parent, parent_card), "checkpoint": card.weights_hash}
        record_lineage(context, store, config, inputs, metrics, previous)
        refresh_catalog(store)
        plot = rounds_png(store)
    return dg.MaterializeResult(
        metadata={**metadata(metrics), "parent": parent, "path": dg.MetadataValue.path(path), "inputs": dg.MetadataValue.json(inputs),
                  "rounds_plot": plot}
    )

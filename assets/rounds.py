"""On-policy rounds (GKD as Dagster partitions of `rounds`): per round r,

    student_rollouts[r]    the current student samples completions of training prompts (T = 1)
    teacher_feedback[r]    the teacher scores every sampled token (sparse top-k, tail mass), with the
                           student's own logprobs, the log-ratio sum and the verifier's reward
    student_checkpoint[r]  GKD from the parent: a share λ of the batches from the rollouts
    round_eval[r]          exact match and reverse KL on own samples, against the parent

The parent is round r−1's checkpoint (offline_student for r001), read through the store by key and
recorded in metadata and in `lineage` (parent_round, parent checkpoint hash, input data versions).
"""

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.datasets import dataset_version, eval_set, teacher_labeled
from assets.models import teacher_model
from assets.students import curve_metrics, launch_distill, loss_curve, offline_student, training_data, write_evals
from pipelines.catalog import query, refresh_catalog
from pipelines.partitions import FIRST_PARENT, parent_round, round_number, rounds
from pipelines.publish import file_version, png_markdown, publish_dataset, record_lineage
from pipelines.resources import DistillStore, TeacherEngine
from pipelines.settings import EvalsConfig, StudentCheckpointConfig, StudentRolloutsConfig, TeacherFeedbackConfig
from pipelines.store import Store, with_content_id
from training.distill import DistillConfig, check_compatible
from training.engines.base import SamplingParams
from training.evaluate import evaluate
from training.feedback import teacher_feedback as score_rollouts
from training.labeling import sample
from training.models import load_model, model_card
from training.tasks.arithmetic import verify_column

IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
ROUND = dict(partitions_def=rounds, group_name="rounds", pool="accelerator")


def parent_checkpoint(store: Store, key: str) -> tuple[str, str | None, dict]:
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


@contextmanager
def claim_round(context: dg.AssetExecutionContext, store: Store):
    """Fails clearly when an older run of this round is still in progress, and holds the round's
    file lock while the asset works, so two launches of one round never mix their data."""
    key = context.partition_key
    mine = context.instance.get_run_record_by_id(context.run_id)
    older = [
        record.dagster_run.run_id
        for record in context.instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS, tags={"dagster/partition": key}))
        if record.dagster_run.run_id != context.run_id and mine is not None and record.create_timestamp < mine.create_timestamp
    ]
    if older:
        raise RuntimeError(
            f"round {key} is already being run by run {older[0]}: wait for it to finish (or cancel it in the UI), "
            "then re-run this round"
        )
    with store.round_lock(key, f"run {context.run_id}, {context.asset_key.to_user_string()}"):
        yield


def draw_prompts(table: pa.Table, n: int, seed: str) -> pa.Table:
    """n distinct prompts (prompt_id, prompt, answer), ordered by sha256(prompt_id ‖ seed)."""
    with duckdb.connect() as connection:
        connection.register("source_rows", table)
        return connection.sql(
            "SELECT prompt_id, any_value(prompt) AS prompt, any_value(answer) AS answer FROM source_rows "
            "GROUP BY prompt_id ORDER BY sha256(prompt_id || ?) LIMIT ?",
            params=[seed, n],
        ).to_arrow_table()


@dg.asset(**ROUND, kinds={"parquet"}, deps=[offline_student, teacher_labeled, "curated"])
def student_rollouts(
    context: dg.AssetExecutionContext, config: StudentRolloutsConfig, store: DistillStore, teacher_engine: TeacherEngine
):
    """Completions sampled from the current student (round r−1's checkpoint; offline_student for r001)
    on prompts drawn from curated (else teacher_labeled), n per prompt, seeded by the round."""
    distill_store, key = store.open(), context.partition_key
    parent, previous, card = parent_checkpoint(distill_store, key)
    with claim_round(context, distill_store):
        dataset = training_data(distill_store)
        prompts = draw_prompts(distill_store.read_dataset(dataset, columns=["prompt_id", "prompt", "answer"]), config.num_prompts, f"{config.seed}/{key}")
        sampling = SamplingParams(
            config.n, config.temperature, config.top_p, config.max_new_tokens, config.seed * 1000 + round_number(key)
        )
        samples, dropped, _ = sample(teacher_engine.load(card), prompts["prompt"].to_pylist(), sampling, "drop")
        prompt_rows = prompts.take(samples["prompt_index"])
        n = samples.num_rows
        constant = lambda value: pa.repeat(pa.scalar(value, pa.string()), n)
        table = pa.table({
            "prompt_id": prompt_rows["prompt_id"], "prompt": prompt_rows["prompt"], "answer": prompt_rows["answer"],
            **{name: samples[name] for name in samples.column_names if name != "prompt_index"},
            "student": constant(parent), "student_weights_hash": constant(card["weights_hash"]),
            "tokenizer_hash": constant(card["tokenizer_hash"]),
            "sampling": constant(json.dumps(sampling.__dict__, sort_keys=True)),
            "round": constant(key), "parent_round": constant(previous), "run_id": constant(context.run_id),
        })
        table = with_content_id(table, "sample_id", ["prompt_id", "sample_index", "completion_token_ids", "student_weights_hash", "sampling"])
        inputs = {dataset: dataset_version(distill_store, dataset), "parent": parent, "parent_checkpoint": card["weights_hash"]}
        metrics = {
            "prompts": prompts.num_rows, "rollouts": n, "dropped_overlong_prompts": dropped,
            "mean_tokens": pc.mean(table["num_tokens"]).as_py(), "parent": parent,
            "stopped_share": pc.mean(pc.cast(pc.equal(table["finish_reason"], "stop"), pa.float64())).as_py(),
        }
        preview = ["sample_id", "prompt", "completion", "num_tokens"]
        return publish_dataset(context, distill_store, "student_rollouts", table, config, inputs, metrics, preview, parent_round=previous)


@dg.asset(**ROUND, kinds={"parquet"}, deps=[student_rollouts, teacher_model])
def teacher_feedback(
    context: dg.AssetExecutionContext, config: TeacherFeedbackConfig, store: DistillStore, teacher_engine: TeacherEngine
):
    """The teacher scores every rollout token (top-k, the token's logprob, tail mass); per sequence the
    student–teacher log-ratio sum (a reverse-KL estimate) and the verifier's reward."""
    distill_store, key = store.open(), context.partition_key
    parent, previous, card = parent_checkpoint(distill_store, key)
    teacher = distill_store.read_card("teacher")
    with claim_round(context, distill_store):
        rollouts = distill_store.read_dataset("student_rollouts", key)
        logprob_type = pa.float16() if config.logprob_dtype == "float16" else pa.float32()
        columns, statistics = score_rollouts(
            teacher_engine.load(teacher), teacher_engine.load(card), rollouts, config.k, config.signal_temperature, logprob_type
        )
        reward = pc.cast(verify_column(rollouts["completion"], rollouts["answer"]), pa.float64())
        n = rollouts.num_rows
        table = rollouts
        for name, column in {
            **columns, "reward": reward,
            "teacher": pa.repeat(pa.scalar(teacher["name"]), n),
            "teacher_weights_hash": pa.repeat(pa.scalar(teacher["weights_hash"]), n),
        }.items():
            table = table.append_column(name, column)
        inputs = {
            "student_rollouts": dataset_version(distill_store, "student_rollouts", key),
            "teacher_model": teacher["weights_hash"], "parent": parent, "parent_checkpoint": card["weights_hash"],
        }
        metrics = {
            **statistics, "mean_reward": pc.mean(reward).as_py(),
            "mean_log_ratio_sum": pc.mean(table["log_ratio_sum"]).as_py(),
        }
        preview = ["sample_id", "completion", "reward", "log_ratio_sum"]
        return publish_dataset(context, distill_store, "teacher_feedback", table, config, inputs, metrics, preview, parent_round=previous)


@dg.asset(**ROUND, kinds={"pytorch"}, deps=[teacher_feedback])
def student_checkpoint(context: dg.AssetExecutionContext, config: StudentCheckpointConfig, store: DistillStore):
    """GKD from the parent checkpoint, by the plain command `python -m training.distill`: with
    probability λ (`mix`) a batch is this round's scored rollouts, else the fixed curated data."""
    distill_store, key = store.open(), context.partition_key
    parent, previous, card = parent_checkpoint(distill_store, key)
    teacher = distill_store.read_card("teacher")
    dataset = training_data(distill_store)
    data_path, feedback_path = distill_store.dataset_path(dataset), distill_store.dataset_path("teacher_feedback", key)
    if not feedback_path.exists():
        raise FileNotFoundError(f"round {key} has no teacher_feedback yet: materialize teacher_feedback for {key} first")
    signals = [pq.read_table(path, columns=["sample_id", "k", "topk_ids"]) for path in (data_path, feedback_path)]
    for signal in signals:  # before launching anything
        check_compatible(signal, card["vocab_size"], teacher["vocab_size"], config.k)
    with claim_round(context, distill_store), tempfile.TemporaryDirectory(dir=distill_store.root) as work:
        run = DistillConfig(
            student=card["path"], data=[str(data_path)], rollouts=[str(feedback_path)], output=f"{work}/checkpoint",
            teacher_vocab_size=teacher["vocab_size"], **config.distill_settings(),
        )
        model, tokenizer, curve = launch_distill(context, run, Path(work))
        identity = {"round": key, "parent": parent, "parent_round": previous, "parent_checkpoint": card["weights_hash"], "mix": config.mix}
        new_card = {**model_card("student_checkpoint", model, tokenizer), **identity}
        new_card = distill_store.save_model("student_checkpoint", new_card, lambda d: shutil.copytree(run.output, d), partition=key)
        on_policy_steps = sum(c["source"] == "on_policy" for c in curve)
        # GKD samples every on-policy batch fresh; a stored round draws each rollout this many times on average
        rollout_reuse = round(on_policy_steps * config.batch_size / signals[1].num_rows, 2)
        if rollout_reuse > 2:
            context.log.warning(
                f"each rollout of round {key} was drawn {rollout_reuse} times on average, so training is only loosely on-policy: "
                "raise student_rollouts num_prompts or n, or lower steps or mix"
            )
        metrics = {**curve_metrics(curve), "on_policy_steps": on_policy_steps, "rollout_reuse": rollout_reuse}
        inputs = {
            dataset: file_version(data_path), "teacher_feedback": file_version(feedback_path),
            "parent": parent, "parent_checkpoint": card["weights_hash"], "teacher_model": teacher["weights_hash"],
        }
        record_lineage(context, distill_store, config, inputs, {**metrics, "checkpoint": new_card["weights_hash"]}, previous)
    return dg.MaterializeResult(
        metadata={
            **metrics, "checkpoint": new_card["weights_hash"], "path": dg.MetadataValue.path(new_card["path"]),
            "parent": parent, "parent_checkpoint": card["weights_hash"], "inputs": dg.MetadataValue.json(inputs),
            "loss_curve": loss_curve(curve, f"student_checkpoint[{key}] training loss"),
        },
        data_version=dg.DataVersion(new_card["weights_hash"]),
    )


def rounds_png(store: Store) -> dg.MetadataValue:
    """Greedy and sampled exact match over all rounds so far (round 0: the first parent)."""
    _, rows = query(store, "SELECT round, parent_greedy_exact_match, greedy_exact_match, sampled_exact_match FROM rounds ORDER BY round")
    figure, axis = plt.subplots(figsize=(6, 3))
    numbers = [0] + [round_number(r[0]) for r in rows]
    axis.plot(numbers, [rows[0][1]] + [r[2] for r in rows], marker="o", label="greedy exact match")
    axis.plot(numbers[1:], [r[3] for r in rows], marker="s", label="sampled exact match (T=1)")
    axis.set(xlabel="round (0: offline_student)", ylabel="exact match", title="on-policy rounds")
    axis.legend()
    return png_markdown(figure, "rounds")


@dg.asset(**ROUND, kinds={"parquet"}, deps=[student_checkpoint, eval_set])
def round_eval(context: dg.AssetExecutionContext, config: EvalsConfig, store: DistillStore):
    """Greedy and sampled exact match on the eval split and reverse KL on the student's own samples,
    for the round's checkpoint and its parent; rows into `evals` with the round."""
    distill_store, key = store.open(), context.partition_key
    parent, previous, parent_card = parent_checkpoint(distill_store, key)
    card = distill_store.read_card("student_checkpoint", key)
    teacher_card = distill_store.read_card("teacher")
    with claim_round(context, distill_store):
        eval_rows = distill_store.read_dataset("eval_set")
        prompts, answers = eval_rows["prompt"].to_pylist(), eval_rows["answer"].to_pylist()
        teacher, _ = load_model(teacher_card["path"], teacher_card.get("revision"))
        results = {}
        for name, model_card_ in [("student_checkpoint", card), (parent, parent_card)]:
            model, tokenizer = load_model(model_card_["path"])
            results[name] = evaluate(model, tokenizer, prompts, answers, teacher, config.seed)
            context.log.info(f"{name}: {results[name]}")
        rows = [{"model": "student_checkpoint", "checkpoint": card["weights_hash"], "split": "eval", "metric": metric, "value": value}
                for metric, value in results["student_checkpoint"].items()]
        path = write_evals(distill_store, rows, context.run_id, key, f"part-{context.run_id}-{key}.parquet")
        feedback = distill_store.read_dataset("teacher_feedback", key, columns=["reward", "log_ratio_sum", "num_tokens"])
        mine, theirs = results["student_checkpoint"], results[parent]
        metrics = {
            **mine, "checkpoint": card["weights_hash"],
            **{f"parent_{name}": value for name, value in theirs.items()},
            "improvement": mine["greedy_exact_match"] - theirs["greedy_exact_match"],
            "rollout_reward": pc.mean(feedback["reward"]).as_py(),
            "rollout_reverse_kl_per_token": pc.sum(feedback["log_ratio_sum"]).as_py() / max(1, pc.sum(feedback["num_tokens"]).as_py()),
        }
        inputs = {
            "eval_set": dataset_version(distill_store, "eval_set"), "teacher_feedback": dataset_version(distill_store, "teacher_feedback", key),
            "parent": parent, "parent_checkpoint": parent_card["weights_hash"], "checkpoint": card["weights_hash"],
        }
        record_lineage(context, distill_store, config, inputs, metrics, previous)
        refresh_catalog(distill_store)
        plot = rounds_png(distill_store)
    return dg.MaterializeResult(
        metadata={
            **metrics, "parent": parent, "path": dg.MetadataValue.path(str(path)), "inputs": dg.MetadataValue.json(inputs),
            "rounds_plot": plot,
        }
    )

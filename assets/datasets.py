"""`seed_prompts`, `eval_set` and `teacher_labeled`: prompts in, teacher responses with the sparse
teacher signal out, as Parquet under DISTILL_HOME."""

import collections
import functools

import dagster as dg
import duckdb

from assets.config import EvalSetConfig, PromptSourceConfig, SeedPromptsConfig, TeacherLabeledConfig
from assets.executor import ShardExecutor, ShardWork
from assets.inputs import Inputs
from assets.publish import publish_dataset
from assets.resources import ModelEngine
from storage.store import Store
from training.data.labeling import LabelingSettings, label_table
from training.data.prompt_sources import prompt_tables
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.models.token_bytes import token_table
from training.schema.cards import ModelCard
from training.schema.tables import parquet
from training.tasks import task_of

PROMPT_PREVIEW = ["prompt_id", "prompt", "answer"]
LABELED_PREVIEW = ["sample_id", "prompt", "completion", "correct", "num_tokens"]


def _publish_prompts(context, store: Store, name: str, config: PromptSourceConfig, embedded_split: str) -> dg.MaterializeResult:
    """The prompts of the configured source, written slice by slice as the shards of `name`."""
    split = embedded_split if config.source == "embedded" else config.split
    slices = prompt_tables(config, split, context.run.run_id)
    writer, dropped = store.sharded_write(name, None, f"prompts-{context.run.run_id}"), collections.Counter()
    for table, reasons in slices:
        if table.num_rows:
            writer.append(table)
        dropped.update(reasons)
    if dropped:
        context.log.warning(f"dropped rows of {config.prompt_column!r}, by reason: {dict(dropped)}")
    with duckdb.connect() as connection:
        unique, conversations, answers = connection.execute(
            "SELECT count(DISTINCT prompt_id), count(messages), count(answer) "
            f"FROM {parquet(sorted(writer.directory.glob('part-*.parquet')))}"
        ).fetchall()[0]
    metrics = {"dropped_invalid_prompts": sum(dropped.values()), **{f"dropped: {reason}": n for reason, n in dropped.items()},
               "unique_prompts": unique, "conversations": conversations, "with_reference_answers": answers}
    return publish_dataset(context, store, name, writer, config=config, inputs={}, metrics=metrics, preview=PROMPT_PREVIEW)


@dg.asset(group_name="datasets", kinds={"parquet"})
def seed_prompts(context: dg.AssetExecutionContext, config: SeedPromptsConfig, store: dg.ResourceParam[Store]):
    """The inputs to distill on: the embedded arithmetic train split, local files, or a dataset."""
    return _publish_prompts(context, store, "seed_prompts", config, "train")


@dg.asset(group_name="datasets", kinds={"parquet"})
def eval_set(context: dg.AssetExecutionContext, config: EvalSetConfig, store: dg.ResourceParam[Store]):
    """Held-out problems every model is evaluated on; never used for training."""
    return _publish_prompts(context, store, "eval_set", config, "eval")


def label_shard(engines: dict, prompts, index: int, *, settings: LabelingSettings, card: ModelCard, task, run_id: str):
    return label_table(engines["teacher"], prompts, settings, card, task, run_id, shard=index)


TEACHER_LABELED = Inputs(cards=["teacher_model"], datasets=["seed_prompts"])


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=TEACHER_LABELED.deps)
def teacher_labeled(context: dg.AssetExecutionContext, config: TeacherLabeledConfig, store: dg.ResourceParam[Store],
                    model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Teacher responses, n per seed prompt, with the teacher's top-k logprobs on every token, shard
    by shard (`shard_executor`)."""
    read = TEACHER_LABELED.read(store)
    card, inputs = read.cards["teacher_model"], read.versions
    task = task_of(store.read_dataset("seed_prompts", columns=["task"]))
    step = functools.partial(label_shard, settings=LabelingSettings(**config.model_dump()), card=card, task=task, run_id=context.run.run_id)
    work = ShardWork("teacher_labeled", store.shard_paths("seed_prompts"), {"teacher": model_engine.spec(card, store.root / "cache")},
                     step, settings={"config": config.model_dump(), "engine": model_engine.backend})
    shards, metrics = shard_executor.run(context, store, work, None, inputs)
    if not store.token_texts_path(card.tokenizer_hash).exists():  # its ids' texts, for students of other tokenizers
        tokenizer = load_tokenizer(card.path, card.revision, model_engine.trust_remote_code)
        ends = end_of_turn_ids(load_generation_config(card.path, card.revision), tokenizer)
        store.append_file("token_texts", token_table(tokenizer, ends), store.token_texts_path(card.tokenizer_hash).name)
    return publish_dataset(context, store, "teacher_labeled", shards, config=config, inputs=inputs, metrics=metrics,
                           preview=LABELED_PREVIEW)

"""`seed_prompts`, `eval_set` and `teacher_labeled`: prompts in, teacher responses with the sparse
teacher signal out, as Parquet under DISTILL_HOME."""

import collections
import functools

import dagster as dg
import duckdb

from assets.config import EvalSetConfig, PromptSourceConfig, SeedPromptsConfig, TeacherLabeledConfig
from assets.executor import ShardExecutor, ShardWork
from assets.inputs import Inputs, teacher_panel
from assets.publish import publish_dataset
from assets.resources import ModelEngine
from storage.store import Store
from training.data.labeling import TEACHER_ID, LabelingSettings, TeacherPanel, panel_table
from training.data.prompt_sources import prompt_tables
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.models.token_bytes import token_table
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


def label_shard(engines: dict, prompts, index: int, *, settings: LabelingSettings, panel: TeacherPanel, cards: dict, task, run_id: str):
    return panel_table(engines, prompts, settings, panel, cards, task, run_id, shard=index)


TEACHER_LABELED = Inputs(cards=["teacher_model"], datasets=["seed_prompts"])


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=TEACHER_LABELED.deps)
def teacher_labeled(context: dg.AssetExecutionContext, config: TeacherLabeledConfig, store: dg.ResourceParam[Store],
                    model_engine: ModelEngine, shard_executor: ShardExecutor):
    """Teacher responses, n per seed prompt, with the teacher's top-k logprobs on every token, shard
    by shard (`shard_executor`); with several teachers, routed, scored and mixed as `routing`,
    `scoring` and `mixture` say."""
    read = TEACHER_LABELED.read(store)
    cards, panel = teacher_panel(store, read.cards["teacher_model"]), TeacherPanel(**config.model_dump())
    panel.check(cards)
    if len(cards) > 1 and model_engine.backend == "openai":
        raise ValueError("the 'openai' backend's base_urls serve one teacher; with several teachers use the 'hf' or 'vllm' "
                         "backend, or label with one teacher at a time")
    if panel.routing == "column":
        check_routes(store.shard_paths("seed_prompts"), list(cards))
    named = len(cards) > 1 or TEACHER_ID not in cards  # the ids are stamped on the rows: they are inputs
    inputs = {**read.versions, **({f"teacher_model[{t}]": card.weights_hash for t, card in cards.items()} if named else {})}
    task = task_of(store.read_dataset("seed_prompts", columns=["task"]))
    step = functools.partial(label_shard, settings=LabelingSettings(**config.model_dump()), panel=panel, cards=cards, task=task,
                             run_id=context.run.run_id)
    work = ShardWork("teacher_labeled", store.shard_paths("seed_prompts"),
                     {t: model_engine.spec(card, store.root / "cache") for t, card in cards.items()},
                     step, settings={"config": config.model_dump(), "engine": model_engine.backend})
    shards, metrics = shard_executor.run(context, store, work, None, inputs)
    for card in cards.values():
        if not store.token_texts_path(card.tokenizer_hash).exists():  # its ids' texts, for students of other tokenizers
            tokenizer = load_tokenizer(card.path, card.revision, model_engine.trust_remote_code)
            ends = end_of_turn_ids(load_generation_config(card.path, card.revision), tokenizer)
            store.append_file("token_texts", token_table(tokenizer, ends), store.token_texts_path(card.tokenizer_hash).name)
    return publish_dataset(context, store, "teacher_labeled", shards, config=config, inputs=inputs, metrics=metrics,
                           preview=LABELED_PREVIEW)


def check_routes(prompts: list, teacher_ids: list[str]) -> None:
    """Routing 'column': every seed prompt names one of the teachers, checked before any is labeled."""
    with duckdb.connect() as connection:
        if "teacher_id" not in connection.sql(f"SELECT * FROM {parquet(prompts)} LIMIT 0").columns:
            raise ValueError("routing 'column' follows the prompts' teacher_id, and these seed_prompts have none (made before "
                             "teacher_column existed): materialize seed_prompts again with teacher_column set")
        named = [row[0] for row in connection.execute(f"SELECT DISTINCT teacher_id FROM {parquet(prompts)}").fetchall()]
    if unknown := sorted(set(named) - set(teacher_ids), key=str):
        raise ValueError(f"routing 'column' sends each prompt to the teacher its teacher_id names, and seed_prompts name {unknown} "
                         f"(None: no teacher_id; set seed_prompts' teacher_column); the teachers are {teacher_ids}")

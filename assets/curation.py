"""`expanded`, `synthesized` and `curated`: the teacher writes new inputs from seeds (expansion,
evolution) and from topics (synthesis), every input is labeled like a seed prompt, and the union
is filtered and selected into `curated`, the dataset students train on."""

import functools
import random
import shutil
from collections.abc import Iterable

import dagster as dg
import matplotlib.pyplot as plt
import pyarrow as pa

from assets.config import CuratedConfig, ExpandedConfig, SynthesizedConfig, WritingConfig
from assets.executor import ShardExecutor, ShardWork
from assets.publish import png_markdown, publish_dataset
from assets.resources import ModelEngine
from storage.shards import ShardedWrite
from storage.store import Store
from training.data.curation import candidate_pool, connect, curate
from training.data.expansion import (
    evolution_instructions,
    expansion_instructions,
    instruction_table,
    instructions_of,
    synthesis_instructions,
    templates_for,
    write_inputs,
    written_prompts,
)
from training.data.labeling import LabelingSettings, label_table
from training.engines.sampling import Sampling
from training.schema.cards import ModelCard
from training.schema.tables import with_constants
from training.tasks import Task, task_of

WRITTEN_PREVIEW = ["sample_id", "origin", "instruction", "prompt", "completion", "correct"]
WRITTEN_DATASETS = ("expanded", "synthesized")


def write_and_label_shard(engines: dict, rows: pa.Table, index: int, *, writing: Sampling, labeling: LabelingSettings,
                          card: ModelCard, task: Task, system_prompt: str | None, run_id: str):
    """A shard of instructions: the teacher writes an input per instruction, the valid ones are labeled."""
    engine = engines["teacher"]
    instructions, seeds = instructions_of(rows)
    written = write_inputs(engine, instructions, writing.derived(part=index))
    prompts, report = written_prompts(instructions, written, seeds, task, system_prompt,
                                      first_index=rows["instruction_index"][0].as_py())
    table, metrics = label_table(engine, prompts, labeling, card, task, run_id, id_columns=("origin", "instruction_index"), shard=index)
    return table, {**report, **metrics}


def _publish_written(context, store: Store, model_engine: ModelEngine, shard_executor: ShardExecutor, config: WritingConfig,
                     task: Task, instructions: pa.Table, name: str, inputs: dict) -> dg.MaterializeResult:
    """The teacher writes an input per instruction; the valid ones are labeled (with the seeds' system
    prompt) and published as `name`, shard by shard."""
    card = store.read_card("teacher")
    system_prompt = store.read_dataset("seed_prompts", columns=["system_prompt"])["system_prompt"][0].as_py()
    inputs = {**inputs, "teacher_model": card.weights_hash}
    source = store.write_work_file(instructions, f"{name}.instructions.parquet")
    step = functools.partial(write_and_label_shard, writing=Sampling(**config.writing.model_dump()),
                             labeling=LabelingSettings(**config.model_dump()), card=card, task=task, system_prompt=system_prompt,
                             run_id=context.run.run_id)
    work = ShardWork(name, [source], {"teacher": model_engine.spec(card, store.root / "cache")}, step,
                     settings={"config": config.model_dump(), "engine": model_engine.backend})
    shards, metrics = shard_executor.run(context, store, work, None, inputs)
    result = publish_dataset(context, store, name, shards, config=config, inputs=inputs, metrics=metrics, preview=WRITTEN_PREVIEW)
    source.unlink()
    return result


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=["teacher_model", "seed_prompts"])
def expanded(context: dg.AssetExecutionContext, config: ExpandedConfig, store: dg.ResourceParam[Store], model_engine: ModelEngine,
             shard_executor: ShardExecutor):
    """New inputs the teacher writes from seed demonstrations (Self-Instruct) and harder rewrites of
    seeds (Evol-Instruct), labeled with the teacher's responses and sparse signal."""
    seed_rows = store.read_dataset("seed_prompts", columns=["prompt", "task"])
    task, seeds = task_of(seed_rows), seed_rows["prompt"].to_pylist()
    templates = templates_for(task, config.templates, expand=config.expand_template, demonstration=config.demonstration_template,
                              evolve=config.evolve_template)
    rng = random.Random(f"expanded/{config.writing.seed}")
    instructions = expansion_instructions(rng, seeds, config.num_expanded, config.demonstrations, templates)
    evolvable = [i for i, seed in enumerate(seeds) if task.can_evolve(seed)]
    instructions += evolution_instructions(seeds, rng.sample(evolvable, min(config.num_evolved, len(evolvable))), templates)
    inputs = {"seed_prompts": store.dataset_version("seed_prompts")}
    return _publish_written(context, store, model_engine, shard_executor, config, task, instruction_table(instructions, seeds),
                            "expanded", inputs)


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=["teacher_model", "seed_prompts"])
def synthesized(context: dg.AssetExecutionContext, config: SynthesizedConfig, store: dg.ResourceParam[Store],
                model_engine: ModelEngine, shard_executor: ShardExecutor):
    """New inputs the teacher writes for weighted topics (meta-information), labeled like the seeds."""
    task = task_of(store.read_dataset("seed_prompts", columns=["task"]))
    topics = config.topics or task.default_topics()
    if not topics:
        raise ValueError(f"set `topics` (topic → weight): task {task.name!r} has no default topics")
    templates = templates_for(task, config.templates, synthesize=config.synthesize_template)
    rng = random.Random(f"synthesized/{config.writing.seed}")
    instructions = synthesis_instructions(rng, topics, config.num_synthesized, templates)
    inputs = {"seed_prompts": store.dataset_version("seed_prompts")}
    return _publish_written(context, store, model_engine, shard_executor, config, task, instruction_table(instructions, []),
                            "synthesized", inputs)


def funnel_chart(funnel: list[dict]) -> dg.MetadataValue:
    figure, axis = plt.subplots(figsize=(6, 3))
    names = ["candidates"] + [f["filter"] for f in funnel]
    axis.barh(names[::-1], ([funnel[0]["rows_in"]] + [f["rows_out"] for f in funnel])[::-1])
    axis.set(xlabel="rows left", title="curation funnel")
    return png_markdown(figure, "funnel")


def funnel_markdown(funnel: list[dict]) -> str:
    lines = ["| filter | setting | rows in | dropped | rows out |", "|---|---|---|---|---|"]
    lines += [f"| {f['filter']} | {f['setting']} | {f['rows_in']} | {f['rows_in'] - f['rows_out']} | {f['rows_out']} |" for f in funnel]
    return "\n".join(lines)


CURATION_INPUTS = ["teacher_labeled", *WRITTEN_DATASETS, "eval_set"]
DROPPED_ROWS_PER_SHARD = 1 << 17  # curation_dropped's rows (prompts of up to max_prompt_chars) per shard


@dg.multi_asset(
    group_name="datasets",
    specs=[
        dg.AssetSpec("curated", deps=CURATION_INPUTS, kinds={"parquet"},
                     description="The distillation dataset: candidates that passed every filter, with scores, origin and "
                                 "the teacher's sparse signal on every token."),
        dg.AssetSpec("curation_report", deps=CURATION_INPUTS, kinds={"parquet"},
                     description="Per filter: its setting, rows in, rows out, a few dropped examples."),
        dg.AssetSpec("curation_dropped", deps=CURATION_INPUTS, kinds={"parquet"},
                     description="Every dropped candidate with the filter and the reason that dropped it."),
    ],
)
def curated(context: dg.AssetExecutionContext, config: CuratedConfig, store: dg.ResourceParam[Store]):
    names = ["teacher_labeled", *(n for n in WRITTEN_DATASETS if store.has_dataset(n))]
    sources = {name: store.shard_paths(name) for name in names}
    inputs = {name: store.dataset_version(name) for name in [*names, "eval_set"]}
    eval_prompts = store.read_dataset("eval_set", columns=["prompt"])["prompt"].to_pylist()
    work = store.root / "work" / "curated" / context.run.run_id  # DuckDB's database: it spills there past its memory limit
    for killed in work.parent.glob("*"):  # what a killed curation left (its database and spill files)
        shutil.rmtree(killed, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with connect(work / "curation.duckdb", config.memory_limit) as connection:
            candidate_pool(connection, sources)
            curation = curate(connection, eval_prompts, config)
            funnel = curation.funnel
            metrics = {"candidates": funnel[0]["rows_in"], "kept": funnel[-1]["rows_out"], **curation.origins()}
            context.log.info("\n" + funnel_markdown(funnel))
            common = dict(config=config, inputs=inputs)
            dropped = curation.dropped(DROPPED_ROWS_PER_SHARD)
            shards = _shards(store, "curation_dropped", context.run.run_id, (pa.Table.from_batches([b]) for b in dropped), dropped.schema)
            dropped_count = {"dropped": metrics["candidates"] - metrics["kept"]}
            yield publish_dataset(context, store, "curation_dropped", shards, **common, metrics=dropped_count,
                                  preview=["sample_id", "origin", "filter", "reason"])
            report = pa.Table.from_pylist([{**f, "dropped": f["rows_in"] - f["rows_out"]} for f in funnel])
            yield publish_dataset(context, store, "curation_report", with_constants(report, curation_run_id=context.run.run_id), **common,
                                  metrics=metrics, preview=["filter", "rows_in", "rows_out"])
            display = {"funnel": dg.MetadataValue.md(funnel_markdown(funnel)), "funnel_chart": funnel_chart(funnel)}
            yield publish_dataset(context, store, "curated", _shards(store, "curated", context.run.run_id, curation.kept(sources)),
                                  **common, metrics=metrics, preview=["sample_id", "origin", "prompt", "completion", "quality_score"],
                                  display=display)
    finally:
        store.remove_work(work)


def _shards(store: Store, name: str, run_id: str, tables: Iterable[pa.Table], schema: pa.Schema | None = None) -> ShardedWrite:
    """`tables`, one per shard and stamped with the curation run, as the shards of a new version of
    `name` (with no tables, one empty shard of `schema`)."""
    writer = store.sharded_write(name, None, f"curation-{run_id}")
    for table in tables:
        writer.append(with_constants(table, curation_run_id=run_id))
    if not writer.appended:
        writer.append(with_constants(schema.empty_table(), curation_run_id=run_id))
    return writer

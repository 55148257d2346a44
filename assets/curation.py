"""`expanded`, `synthesized` and `curated`: the teacher writes new inputs from seeds (expansion,
evolution) and from topics (synthesis), every input is labeled like a seed prompt, and the union
is filtered and selected into `curated`, the dataset students train on."""

import dataclasses
import random

import dagster as dg
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc

from assets.datasets import dataset_version, eval_set, label_prompts, seed_prompts, teacher_labeled
from assets.models import teacher_model
from pipelines.publish import png_markdown, publish_dataset
from pipelines.resources import DistillStore, TeacherEngine
from pipelines.settings import CuratedConfig, ExpandedConfig, SynthesizedConfig, WritingConfig
from pipelines.store import Store, with_content_id
from training.curation import CurationSettings, curate
from training.engines.base import SamplingParams
from training.expansion import (
    TEMPLATES,
    Instruction,
    evolution_instructions,
    expansion_instructions,
    first_line,
    synthesis_instructions,
    write_inputs,
)
from training.tasks.arithmetic import parse_prompt
from training.tasks.arithmetic_instructions import all_topics, can_evolve, following_report, written_problem

ORIGIN = {"expand": "expanded", "evolve": "evolved", "synthesize": "synthesized"}
WRITTEN_PREVIEW = ["sample_id", "origin", "instruction", "prompt", "completion", "correct"]


def _written_table(context, store: Store, teacher_engine: TeacherEngine, config: WritingConfig,
                   instructions: list[Instruction], seeds: list[str], name: str, inputs: dict) -> dg.MaterializeResult:
    """The teacher writes an input per instruction; the valid ones are labeled and published as `name`.

    With the embedded templates the task is arithmetic: an output is an input when it is a problem
    the task poses, and its reference answer is computed, so the verifier can check the teacher."""
    arithmetic = config.templates == "embedded"
    parse = (lambda text: (p.prompt if (p := written_problem(text)) else None)) if arithmetic else first_line
    card = store.read_card("teacher")
    engine = teacher_engine.load(card, cache_dir=store.root / "cache")
    writing = SamplingParams(1, config.write_temperature, 1.0, config.write_max_new_tokens, config.seed)
    written = write_inputs(engine, instructions, writing, parse)
    kept = [i for i, text in enumerate(written) if text is not None]
    prompts = pa.table({
        "prompt": pa.array([written[i] for i in kept], pa.string()),
        "answer": pa.array([str(parse_prompt(written[i]).answer) if arithmetic else None for i in kept], pa.string()),
        "origin": pa.array([ORIGIN[instructions[i].operator] for i in kept], pa.string()),
        "instruction": pa.array([instructions[i].text for i in kept], pa.string()),
        "instruction_index": pa.array(kept, pa.int32()),
        "parent_prompts": pa.array([[seeds[p] for p in instructions[i].parents] for i in kept], pa.list_(pa.string())),
        "topic": pa.array([instructions[i].topic for i in kept], pa.string()),
    })
    prompts = with_content_id(prompts, "prompt_id", ["prompt"])
    if prompts.num_rows == 0:
        raise ValueError(f"none of the teacher's {len(instructions)} outputs is a valid input: check the templates and the teacher")
    table, metrics = label_prompts(context, engine, card, prompts, config, id_columns=("origin", "instruction_index"))
    metrics = {"instructions": len(instructions), "unparsed_outputs": len(instructions) - len(kept), **metrics}
    if arithmetic:
        for operator in sorted({i.operator for i in instructions}):
            rows = [i for i, ins in enumerate(instructions) if ins.operator == operator]
            requested = [_requested(instructions[i], seeds) for i in rows]
            metrics.update(following_report(operator, requested, [written[i] for i in rows]))
    inputs = {**inputs, "teacher_model": card["weights_hash"]}
    return publish_dataset(context, store, name, table, config, inputs, metrics, WRITTEN_PREVIEW)


def _requested(instruction: Instruction, seeds: list[str]):
    """What an arithmetic instruction asked for: the demonstrations, the seed, or the topic."""
    if instruction.operator == "expand":
        return [parse_prompt(seeds[p]) for p in instruction.parents]
    if instruction.operator == "evolve":
        return parse_prompt(seeds[instruction.parents[0]])
    return instruction.topic


def _templates(config: WritingConfig, **overrides: str | None):
    return dataclasses.replace(TEMPLATES[config.templates], **{k: v for k, v in overrides.items() if v is not None})


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=[teacher_model, seed_prompts])
def expanded(context: dg.AssetExecutionContext, config: ExpandedConfig, store: DistillStore, teacher_engine: TeacherEngine):
    """New inputs the teacher writes from seed demonstrations (Self-Instruct) and harder rewrites of
    seeds (Evol-Instruct), labeled with the teacher's responses and sparse signal."""
    distill_store = store.open()
    seeds = distill_store.read_dataset("seed_prompts")["prompt"].to_pylist()
    templates = _templates(config, expand=config.expand_template, demonstration=config.demonstration_template,
                           evolve=config.evolve_template)
    rng = random.Random(f"expanded/{config.seed}")
    instructions = expansion_instructions(rng, seeds, config.num_expanded, config.demonstrations, templates)
    evolvable = [i for i, s in enumerate(seeds) if config.templates != "embedded" or can_evolve(parse_prompt(s))]
    chosen = rng.sample(evolvable, min(config.num_evolved, len(evolvable)))
    instructions += evolution_instructions(seeds, chosen, templates)
    inputs = {"seed_prompts": dataset_version(distill_store, "seed_prompts")}
    return _written_table(context, distill_store, teacher_engine, config, instructions, seeds, "expanded", inputs)


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=[teacher_model])
def synthesized(context: dg.AssetExecutionContext, config: SynthesizedConfig, store: DistillStore, teacher_engine: TeacherEngine):
    """New inputs the teacher writes for weighted topics (meta-information), labeled like the seeds."""
    topics = config.topics
    if not topics:
        if config.templates != "embedded":
            raise ValueError("set `topics` (topic → weight): only the embedded task has default topics")
        topics = {t: 1.0 for t in all_topics()}
    templates = _templates(config, synthesize=config.synthesize_template)
    instructions = synthesis_instructions(random.Random(f"synthesized/{config.seed}"), topics, config.num_synthesized, templates)
    return _written_table(context, store.open(), teacher_engine, config, instructions, [], "synthesized", {})


def candidates(store: Store) -> tuple[pa.Table, dict[str, str]]:
    """The union of teacher_labeled (origin `labeled`) and whichever of expanded and synthesized are
    built; all must come from one teacher with one k. Returns (rows, input data versions)."""
    labeled = store.read_dataset("teacher_labeled")
    tables = [labeled.append_column("origin", pa.repeat(pa.scalar("labeled"), labeled.num_rows))]
    names = ["teacher_labeled"] + [n for n in ("expanded", "synthesized") if store.dataset_path(n).exists()]
    tables += [store.read_dataset(n) for n in names[1:]]
    for column in ("teacher_weights_hash", "k"):
        first = pc.unique(labeled[column]).to_pylist()
        for name, table in zip(names[1:], tables[1:]):
            values = pc.unique(table[column]).to_pylist()
            if values != first:
                raise ValueError(
                    f"{name} has {column} {values} but teacher_labeled has {first}: re-materialize {name} with the same "
                    "teacher and k, so that curated carries one teacher's signal"
                )
    rows = pa.concat_tables(tables, promote_options="permissive")
    if pc.count_distinct(rows["sample_id"]).as_py() != rows.num_rows:
        raise ValueError("sample_id is not unique across the candidate datasets; re-materialize them")
    return rows, {name: dataset_version(store, name) for name in names}


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


@dg.multi_asset(
    group_name="datasets",
    specs=[
        dg.AssetSpec("curated", deps=[teacher_labeled, "expanded", "synthesized", eval_set], kinds={"parquet"},
                     description="The distillation dataset: candidates that passed every filter, with scores, origin and "
                                 "the teacher's sparse signal on every token."),
        dg.AssetSpec("curation_report", deps=[teacher_labeled, "expanded", "synthesized", eval_set], kinds={"parquet"},
                     description="Per filter: its setting, rows in, rows out, a few dropped examples."),
        dg.AssetSpec("curation_dropped", deps=[teacher_labeled, "expanded", "synthesized", eval_set], kinds={"parquet"},
                     description="Every dropped candidate with the filter and the reason that dropped it."),
    ],
)
def curated(context: dg.AssetExecutionContext, config: CuratedConfig, store: DistillStore):
    distill_store = store.open()
    rows, inputs = candidates(distill_store)
    eval_prompts = distill_store.read_dataset("eval_set")["prompt"].to_pylist()
    inputs["eval_set"] = dataset_version(distill_store, "eval_set")
    result = curate(rows, eval_prompts, CurationSettings(**config.model_dump()))
    run = lambda t: t.append_column("curation_run_id", pa.repeat(pa.scalar(context.run_id), t.num_rows))
    report = pa.Table.from_pylist([{**f, "dropped": f["rows_in"] - f["rows_out"]} for f in result.funnel])
    metrics = {"candidates": rows.num_rows, "kept": result.kept.num_rows,
               **{f"candidates_{o}": n for o, n in origin_counts(rows).items()},
               **{f"kept_{o}": n for o, n in origin_counts(result.kept).items()}}
    context.log.info("\n" + funnel_markdown(result.funnel))
    yield publish_dataset(context, distill_store, "curation_dropped", run(result.dropped), config, inputs,
                          {"dropped": result.dropped.num_rows}, ["sample_id", "origin", "filter", "reason"], multi_asset=True)
    yield publish_dataset(context, distill_store, "curation_report", run(report), config, inputs, metrics,
                          ["filter", "rows_in", "rows_out"], multi_asset=True)
    display = {"funnel": dg.MetadataValue.md(funnel_markdown(result.funnel)), "funnel_chart": funnel_chart(result.funnel)}
    yield publish_dataset(context, distill_store, "curated", run(result.kept), config, inputs, metrics,
                          ["sample_id", "origin", "prompt", "completion", "quality_score"], multi_asset=True, display=display)


def origin_counts(table: pa.Table) -> dict[str, int]:
    counts = table["origin"].value_counts()
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))

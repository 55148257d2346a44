"""`seed_prompts`, `eval_set` and `teacher_labeled`: prompts in, teacher responses with the sparse
teacher signal out, as Parquet under DISTILL_HOME."""

import json

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets.models import teacher_model
from pipelines.publish import file_version, publish_dataset
from pipelines.resources import DistillStore, TeacherEngine
from pipelines.settings import EvalSetConfig, LabelingConfig, PromptSourceConfig, SeedPromptsConfig, TeacherLabeledConfig
from pipelines.store import Store, with_content_id
from training.engines.base import SamplingParams
from training.labeling import label
from training.prompt_sources import embedded_prompts, load_source, select_prompts
from training.tasks.arithmetic import verify_column

PROMPT_PREVIEW = ["prompt_id", "prompt", "answer"]
LABELED_PREVIEW = ["sample_id", "prompt", "completion", "correct", "num_tokens"]
PROMPT_TABLE_COLUMNS = {"prompt_id", "prompt", "answer", "task", "source", "run_id"}


def _prompt_table(context, config: PromptSourceConfig, embedded_split: str) -> tuple[pa.Table, int]:
    if config.source == "embedded":
        table, dropped, task = embedded_prompts(embedded_split, config.num_prompts, config.seed), 0, "arithmetic"
    else:
        source = load_source(config.source, config.split, config.files, config.dataset, config.subset)
        table, dropped = select_prompts(source, config.prompt_column, config.answer_column, config.num_prompts)
        task = None
        if dropped:
            context.log.warning(f"dropped {dropped} rows with an empty or non-string {config.prompt_column!r}")
    if table.num_rows == 0:
        raise ValueError(f"the prompt source has no usable prompts ({dropped} rows dropped as empty or non-string)")
    if "answer" not in table.column_names:
        table = table.append_column("answer", pa.nulls(table.num_rows, pa.string()))
    table = with_content_id(table, "prompt_id", ["prompt"])
    n = table.num_rows
    table = table.append_column("task", pa.repeat(pa.scalar(task, pa.string()), n))
    table = table.append_column("source", pa.repeat(pa.scalar(config.source), n))
    table = table.append_column("run_id", pa.repeat(pa.scalar(context.run_id), n))
    return table.select(["prompt_id", "prompt", "answer", "task", "source", "run_id"]), dropped


@dg.asset(group_name="datasets", kinds={"parquet"})
def seed_prompts(context: dg.AssetExecutionContext, config: SeedPromptsConfig, store: DistillStore):
    """The inputs to distill on: the embedded arithmetic train split, local files, or a dataset."""
    table, dropped = _prompt_table(context, config, "train")
    metrics = {"dropped_invalid_prompts": dropped, "unique_prompts": pc.count_distinct(table["prompt_id"]).as_py()}
    return publish_dataset(context, store.open(), "seed_prompts", table, config, {}, metrics, PROMPT_PREVIEW)


@dg.asset(group_name="datasets", kinds={"parquet"})
def eval_set(context: dg.AssetExecutionContext, config: EvalSetConfig, store: DistillStore):
    """Held-out problems every model is evaluated on; never used for training."""
    table, dropped = _prompt_table(context, config, "eval")
    metrics = {"dropped_invalid_prompts": dropped}
    return publish_dataset(context, store.open(), "eval_set", table, config, {}, metrics, PROMPT_PREVIEW)


@dg.asset(group_name="datasets", pool="accelerator", kinds={"parquet"}, deps=[teacher_model, seed_prompts])
def teacher_labeled(
    context: dg.AssetExecutionContext, config: TeacherLabeledConfig, store: DistillStore, teacher_engine: TeacherEngine
):
    """Teacher responses, n per seed prompt, with the teacher's top-k logprobs on every token."""
    distill_store = store.open()
    card = distill_store.read_card("teacher")
    seeds = distill_store.read_dataset("seed_prompts")
    engine = teacher_engine.load(card, cache_dir=distill_store.root / "cache")
    table, metrics = label_prompts(context, engine, card, seeds, config)
    inputs = {"seed_prompts": dataset_version(distill_store, "seed_prompts"), "teacher_model": card["weights_hash"]}
    return publish_dataset(context, distill_store, "teacher_labeled", table, config, inputs, metrics, LABELED_PREVIEW)


def label_prompts(context, engine, card: dict, prompts: pa.Table, config: LabelingConfig, id_columns: tuple = ()):
    """Teacher responses to `prompts` (prompt_id, prompt, answer, and any extra columns, which are
    carried onto each response) with the sparse signal; returns (table, metrics). `sample_id` hashes
    the prompt, the response, the teacher, the sampling and `id_columns`."""
    sampling = SamplingParams(config.n, config.temperature, config.top_p, config.max_new_tokens, config.seed)
    labeled = label(
        engine,
        prompts["prompt"].to_pylist(),
        sampling,
        config.k,
        config.signal_temperature,
        config.overlong_prompts,
        pa.float16() if config.logprob_dtype == "float16" else pa.float32(),
    )
    table = _with_lineage(context, labeled.table, prompts, card, sampling)
    identity = ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash", "sampling", *id_columns]
    table = with_content_id(table, "sample_id", identity)
    correct = table["correct"].drop_null()
    metrics = {
        **labeled.statistics,
        "responses": table.num_rows,
        "dropped_overlong_prompts": labeled.dropped_overlong,
        "truncated_overlong_prompts": labeled.truncated_overlong,
        "teacher_accuracy": pc.mean(pc.cast(correct, pa.float64())).as_py() if len(correct) else None,
        "stopped_share": pc.mean(pc.cast(pc.equal(table["finish_reason"], "stop"), pa.float64())).as_py(),
        "engine": engine.backend,
        "cache_hit_rate": getattr(engine, "hit_rate", None),
    }
    return table, metrics


def dataset_version(store: Store, name: str, partition: str | None = None) -> str:
    return file_version(store.dataset_path(name, partition))


def _with_lineage(context, responses: pa.Table, prompts: pa.Table, card: dict, sampling: SamplingParams) -> pa.Table:
    """Joins prompt columns onto responses and stamps teacher identity, sampling and the run."""
    prompt_rows = prompts.take(responses["prompt_index"])
    n = responses.num_rows
    constant = lambda value, type_=pa.string(): pa.repeat(pa.scalar(value, type_), n)
    columns = {
        "prompt_id": prompt_rows["prompt_id"],
        "prompt": prompt_rows["prompt"],
        "answer": prompt_rows["answer"],
        **{name: prompt_rows[name] for name in prompt_rows.column_names if name not in PROMPT_TABLE_COLUMNS},
        **{name: responses[name] for name in responses.column_names if name != "prompt_index"},
        "correct": verify_column(responses["completion"], prompt_rows["answer"]),
        "teacher": constant(card["name"]),
        "teacher_revision": constant(card.get("revision")),
        "teacher_weights_hash": constant(card["weights_hash"]),
        "tokenizer_hash": constant(card["tokenizer_hash"]),
        "sampling": constant(json.dumps(sampling.__dict__, sort_keys=True)),
        "run_id": constant(context.run_id),
    }
    return pa.table(columns)

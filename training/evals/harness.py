"""lm-evaluation-harness tasks on a checkpoint: the benchmarks users of this field track, round after round.

`harness_rows(name, card, settings, seed)` runs `lm_eval.simple_evaluate` on the checkpoint's directory
as the harness's own `hf` model (trust_remote_code off), for the task names in `settings.tasks`:
hub tasks (gsm8k, arc_easy, …, which need the hub or its cache) or local task YAMLs under
`settings.include_path` (offline: a task whose `dataset_kwargs.data_files` names local files). It
returns one `evals` row per task and metric (lm-eval's key, `exact_match,strict-match`: the metric,
then the filter) as `harness/<task>/<key>`, with the harness version, the few-shot count the task ran
with, the seed and the generation cap, and the prompts the harness gave the model (`HarnessRun`),
which `overlap` compares with the training data. Standard errors and counts are not stored.

lm-eval is the optional extra `harness` (`pip install -e ".[harness]"`, lm_eval 0.4.13): asked for
without it, `check_harness` says so before any model loads.
"""

import importlib.util
import math
import numbers
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from pydantic import BaseModel, Field

from training.data.curation import word_ngrams
from training.schema.cards import ModelCard


class HarnessSettings(BaseModel):
    """Which lm-evaluation-harness tasks `evals` and `round_eval` run on each checkpoint."""

    tasks: list[str] = Field([], description="lm-eval task names (none by default): hub tasks such as gsm8k, or local ones "
                             "under include_path")
    include_path: str | None = Field(None, description="a directory of local task YAMLs (offline use)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; None: each task's own setting")
    limit: int | None = Field(None, ge=1, description="documents per task; None: all")
    max_gen_toks: int = Field(256, ge=1, description="the generation cap of generate_until tasks")
    batch_size: int = Field(8, ge=1)
    overlap_ngram: int = Field(8, ge=1, description="a harness prompt sharing a word n-gram this long with a training prompt "
                               "counts as overlap (the curation's decontamination rule)")


@dataclass
class HarnessRun:
    rows: list[dict]  # `evals` rows
    prompts: dict[str, list[str]]  # task → the prompts (contexts) the model was given


def check_harness(settings: HarnessSettings) -> None:
    """A clear error before any model loads when tasks are asked for and lm-eval is not installed."""
    if settings.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"harness tasks {settings.tasks} need lm-evaluation-harness: pip install -e '.[harness]' "
                         "(or empty harness.tasks)")


def harness_rows(name: str, card: ModelCard, settings: HarnessSettings, seed: int) -> HarnessRun:
    """The harness's metrics of `card`'s checkpoint as `evals` rows (model `name`), and its prompts: on
    the GPU in the checkpoint's own dtype when there is one, else on the CPU in float32."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    check_harness(settings)
    manager = TaskManager(include_path=settings.include_path, include_defaults=False)  # indexing lm-eval's own tasks takes 13 s
    if not set(settings.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=settings.include_path)
    device, dtype = ("cuda", "auto") if torch.cuda.is_available() else ("cpu", "float32")
    arguments = {"pretrained": card.path, "dtype": dtype, "trust_remote_code": False}
    if card.revision:
        arguments["revision"] = card.revision
    result = lm_eval.simple_evaluate(
        model="hf", model_args=arguments, tasks=settings.tasks, task_manager=manager, num_fewshot=settings.num_fewshot,
        limit=settings.limit, gen_kwargs={"max_gen_toks": settings.max_gen_toks}, batch_size=settings.batch_size, device=device,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
        log_samples=True,
    )
    common = {"model": name, "checkpoint": card.weights_hash, "harness": f"lm-eval {result['lm_eval_version']}", "seed": seed,
              "max_gen_toks": settings.max_gen_toks}
    rows = [{**common, "split": task, "metric": f"harness/{task}/{key}", "value": float(value),
             "num_fewshot": result["n-shot"].get(task)}
            for task, metrics in result["results"].items() for key, value in metrics.items()
            if "," in key and "_stderr" not in key and is_number(value)]
    prompts = {task: [sample["arguments"][0][0] for sample in samples] for task, samples in result["samples"].items()}
    return HarnessRun(rows, prompts)


def is_number(value) -> bool:
    """A metric value worth storing: a finite real (numpy's included), not a bool or lm-eval's "N/A"."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def overlap(prompts: list[str], training_prompts: pa.Array, n: int) -> float:
    """The share of `prompts` that share a word n-gram (texts shorter than n: the whole text) with
    `training_prompts`, by the curation's decontamination rule."""
    if not prompts:
        return 0.0
    with duckdb.connect() as connection:
        connection.register("harness", pa.table({"id": range(len(prompts)), "prompt": pa.array(prompts, pa.string())}))
        connection.register("training", pa.table({"prompt": training_prompts}))
        shared = connection.sql(f"""WITH training_grams AS (SELECT DISTINCT unnest({word_ngrams('prompt', n)}) AS gram FROM training),
            harness_grams AS (SELECT id, unnest({word_ngrams('prompt', n)}) AS gram FROM harness)
            SELECT count(DISTINCT id) FROM harness_grams JOIN training_grams USING (gram)""").fetchall()[0][0]
    return shared / len(prompts)


def harness_results(cards: dict[str, ModelCard], settings: HarnessSettings, seed: int, training_prompts: pa.Array | None,
                    log=print) -> tuple[list[dict], dict[str, float]]:
    """`harness_rows` of each named card, and per task the share of its prompts that overlap the
    training prompts (`harness/<task>/overlap_with_training`), logged as a warning when any do."""
    rows, overlaps = [], {}
    for name, card in cards.items() if settings.tasks else ():
        run = harness_rows(name, card, settings, seed)
        rows += run.rows
        for task, prompts in run.prompts.items():
            if training_prompts is not None and f"harness/{task}/overlap_with_training" not in overlaps:
                share = overlaps[f"harness/{task}/overlap_with_training"] = overlap(prompts, training_prompts, settings.overlap_ngram)
                if share:
                    log(f"{share:.1%} of harness task {task}'s prompts share a {settings.overlap_ngram}-word n-gram with the "
                        "training data: its score overstates what the student learned (decontaminate the training data against it)")
    return rows, overlaps

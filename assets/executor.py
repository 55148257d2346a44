"""Where the model assets' work runs, shard by shard: `local` (this process) or `ray` (a Ray Data
actor pool of engine replicas). Either way each shard of `shard_size` inputs is read, run through
the asset's step, and written as soon as it is done (`storage.shards`), so memory is bounded by a
shard and a re-run with the same settings and inputs does only the shards a crash left undone."""

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from assets.resources import EngineSpec
from storage.shards import ShardedWrite, write_shard
from training.schema.figures import combine_figures


@dataclass
class ShardWork:
    """A model asset's work: `step(engines, rows, index) -> (table, figures)` on each slice of
    `shard_size` rows of the Parquet `source` files, with `engines` (name → `EngineSpec`: plain data,
    since a Ray replica loads them) loaded once per process or replica."""

    name: str
    source: list[Path]
    engines: dict[str, EngineSpec]
    step: Callable
    settings: dict = field(default_factory=dict)  # what, besides the inputs, decides the rows (fingerprinted)


def read_slice(paths: list[Path], start: int, rows: int) -> pa.Table:
    """Rows [start, start + rows) of the Parquet files `paths` read as one table, opening only the
    files (and row groups) that hold them."""
    pieces, offset = [], 0
    for path in paths:
        metadata = pq.read_metadata(path)
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            if offset + size > start and offset < start + rows:
                first, end = max(0, start - offset), min(size, start + rows - offset)  # within the row group
                pieces.append(pq.ParquetFile(path).read_row_group(group).slice(first, end - first))
            offset += size
    return pa.concat_tables(pieces, promote_options="permissive") if pieces else pa.table({})


def source_rows(paths: list[Path]) -> int:
    return sum(pq.read_metadata(path).num_rows for path in paths)


def load_engines(engines: dict[str, EngineSpec]) -> dict:
    return {name: spec.load() for name, spec in engines.items()}


def run_shard(work: ShardWork, engines: dict, shard_size: int, directory: Path, index: int) -> dict:
    """Reads shard `index` of the source, runs the step, writes the shard into `directory`; returns its figures."""
    started = time.perf_counter()
    rows = read_slice(work.source, index * shard_size, shard_size)
    table, figures = work.step(engines, rows, index)
    tokens = (pc.sum(table["num_tokens"]).as_py() or 0) if "num_tokens" in table.column_names else 0
    figures = {**figures, "inputs": rows.num_rows, "completion_tokens": tokens, "seconds": time.perf_counter() - started}
    write_shard(directory, index, table, figures)
    return figures


class ShardExecutor(dg.ConfigurableResource):
    """How the model assets (teacher_labeled, expanded, synthesized, student_rollouts,
    teacher_feedback) run their shards. Changing `executor` changes where, never what: the rows
    and sample ids are the same."""

    executor: Literal["local", "ray"] = Field("local", description="'local': shards one after another in the run's process; "
                                              "'ray': a Ray Data actor pool of engine replicas")
    shard_size: int = Field(1024, ge=1, description="inputs per shard: the unit of memory, of progress and of the work a crash can lose")
    ray_address: str = Field("", description="ray: a cluster to join ('auto', 'ray://host:10001'); empty: $RAY_ADDRESS, "
                             "else a local cluster")
    replicas: int = Field(2, ge=1, description="ray: engine replicas (actors), each loading the models once")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    num_gpus_per_replica: float = Field(0.0, ge=0, description="ray: GPUs per replica (vLLM tensor parallel inside needs that many)")

    def run(self, context: dg.AssetExecutionContext, store, work: ShardWork, partition: str | None,
            inputs: dict) -> tuple[ShardedWrite, dict]:
        """Runs every shard not yet done under this fingerprint (settings, inputs, shard size) and
        returns (the writer, ready to publish; the combined figures with progress)."""
        settings = json.dumps([work.settings, inputs, self.shard_size], sort_keys=True, default=str)
        fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:16]
        writer = store.sharded_write(work.name, partition, fingerprint)
        total = max(1, math.ceil(source_rows(work.source) / self.shard_size))
        done = writer.done()
        todo = [i for i in range(total) if i not in done]
        if done:
            context.log.info(f"{work.name}: resuming, {len(done)} of {total} shards already done")
        started = time.perf_counter()
        progress = functools.partial(_log_progress, context, work.name, total, len(done), started)
        if self.executor == "ray" and todo:
            self._run_on_ray(work, writer.directory, todo, progress)
        else:
            engines = load_engines(work.engines) if todo else {}
            for count, index in enumerate(todo, 1):
                progress(count, run_shard(work, engines, self.shard_size, writer.directory, index))
        shards = writer.done()
        seconds = time.perf_counter() - started
        tokens = sum(shards[i]["completion_tokens"] for i in todo)
        figures = combine_figures([shards[i] for i in range(total)])
        figures.update(shards=total, shards_resumed=len(done), executor=self.executor, wall_seconds=seconds,
                       completion_tokens_per_s=tokens / seconds if seconds > 0 and todo else None)
        figures.pop("seconds", None)
        return writer, figures

    def _run_on_ray(self, work: ShardWork, directory: Path, todo: list[int], progress) -> None:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.ray_address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
        try:
            self._map_shards(work, directory, todo, progress)
        finally:
            if started_here:
                ray.shutdown()

    def _map_shards(self, work: ShardWork, directory: Path, todo: list[int], progress) -> None:
        import ray

        shards = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
        results = shards.map_batches(
            _Replica, fn_constructor_args=(work, self.shard_size, directory), batch_size=1,
            concurrency=min(self.replicas, len(todo)), num_cpus=self.num_cpus_per_replica, num_gpus=self.num_gpus_per_replica,
        )
        for count, row in enumerate(results.iter_rows(), 1):
            progress(count, json.loads(row["figures"]))


class _Replica:
    """One engine replica, a Ray Data actor: the models loaded once, then shard after shard (a batch
    of shard indices in, their figures out)."""

    def __init__(self, work: ShardWork, shard_size: int, directory: Path):
        self.work, self.shard_size, self.directory = work, shard_size, directory
        self.engines = load_engines(work.engines)

    def __call__(self, batch: dict) -> dict:
        figures = [run_shard(self.work, self.engines, self.shard_size, self.directory, int(i)) for i in batch["index"]]
        return {"figures": [json.dumps(f, default=str) for f in figures]}


def _log_progress(context, name: str, total: int, resumed: int, started: float, count: int, figures: dict) -> None:
    elapsed = time.perf_counter() - started
    finished = resumed + count
    eta = elapsed / count * (total - finished)
    context.log.info(f"{name}: shard {finished}/{total} done ({figures['inputs']} inputs, "
                     f"{figures['completion_tokens'] / max(figures['seconds'], 1e-9):.0f} tokens/s), ETA {eta:.0f} s")

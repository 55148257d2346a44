"""A content-addressed cache of engine results, and `CachedEngine`, which wraps any engine with it.

    score key    = sha256(model id, prompt ids, completion ids, k, temperature, logprob mode, codec)
    generate key = sha256(model id, backend, prompt ids, sampling params incl. seed, logprobs k, codec,
                          occurrence: how many identical prompts came before it in the call)

The model id is the weights hash (or revision), so a changed teacher misses by construction. Scores are
backend-independent (the engines agree within 1e-3), so every backend shares them; sampled
generations depend on the backend's random streams, so the backend is part of their key.

Storage: `<dir>/<kind>/part-<uuid>.parquet`, one file per engine call that had misses (key column +
the result columns), written to a temp file and renamed into place, and merged size-tiered
(`compact`: at most FANOUT files per level); lookups are one DuckDB query over the kind's files.
No pickle anywhere.
"""

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from training.engines.base import Engine, EngineRequestsFailed, Generation
from training.engines.sampling import Sampling
from training.schema.signal import CODEC, LOGPROB_MODE, SparseSignal, signal_columns, signals_from_columns
from training.schema.tables import parquet

FANOUT = 16  # files of one level merged into one of the next (`TeacherCache.compact`)
READ_ATTEMPTS = 4  # a lookup lists the files again when a compaction removed one under it


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


class TeacherCache:
    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def get(self, kind: str, keys: list[str]) -> pa.Table:
        """The stored rows whose key is in `keys` (any order; a key may have several rows). Only the
        key column of every file is scanned; whole rows are read from the files that hold a hit."""
        none = pa.table({"key": pa.array([], pa.string())})
        for attempt in range(READ_ATTEMPTS):  # a compaction in another process may remove a file between the listing and the read
            files = sorted((self.directory / kind).glob("part-*.parquet"))
            if not files or not keys:
                return none
            try:
                with duckdb.connect() as connection:
                    connection.register("wanted", pa.table({"key": sorted(set(keys))}))
                    holding = connection.execute(f"SELECT DISTINCT filename FROM {parquet(files, filename=True)} "
                                                 "SEMI JOIN wanted USING (key) ORDER BY 1").fetchall()
                    if not holding:
                        return none
                    found = f"SELECT c.* FROM {parquet([f for f, in holding])} c SEMI JOIN wanted USING (key)"
                    return connection.sql(found).to_arrow_table()
            except duckdb.IOException:
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def put(self, kind: str, table: pa.Table) -> None:
        """Adds `table` as a new level-0 file of `kind`, then compacts (see `compact`)."""
        if table.num_rows == 0:
            return
        directory = self.directory / kind
        directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        temp = directory / f".{name}.tmp"
        try:
            pq.write_table(table, temp, compression="zstd")
            os.replace(temp, directory / name)
        finally:
            temp.unlink(missing_ok=True)
        try:
            self.compact(kind)
        except (OSError, duckdb.Error) as error:  # the rows are stored; a merge left undone is retried by the next put
            warnings.warn(f"teacher cache: compacting {directory} failed ({error}); it is retried at the next write")

    def compact(self, kind: str) -> None:
        """Size-tiered: FANOUT files of one level are merged into one file of the next level
        (part-<uuid> is level 0, part-L<n>-<uuid> level n), so a cache written in w calls has at most
        FANOUT files per level, log_FANOUT(w) levels, and every row is rewritten once per level.
        One process compacts at a time (an `flock` on a lock file, which NFS honours across machines;
        the others skip); the merged file lands by rename before its sources are removed, so a crash
        leaves duplicates (harmless), never a loss, and a reader that lost a file lists them again."""
        directory = self.directory / kind
        with open(self.directory / f".{kind}.compaction.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            level = 0
            while len(files := sorted(directory.glob(f"part-{f'L{level}-' if level else ''}[0-9a-f]*.parquet"))) >= FANOUT:
                merged = directory / f"part-L{level + 1}-{uuid.uuid4().hex}.parquet"
                temp = directory / f".{merged.name}.tmp"
                try:
                    with duckdb.connect() as connection:
                        connection.execute(f"COPY (SELECT * FROM {parquet(files)}) TO '{temp}' (FORMAT parquet, COMPRESSION zstd)")
                    os.replace(temp, merged)
                finally:
                    temp.unlink(missing_ok=True)
                for file in files:
                    file.unlink(missing_ok=True)
                level += 1


class CachedEngine:
    """Any engine, with its results looked up in `cache` first; counts hits and misses per item
    (a prompt for generate, a sequence for score)."""

    def __init__(self, engine: Engine, cache: TeacherCache, model_id: str):
        self.engine, self.cache, self.model_id = engine, cache, model_id
        self.backend, self.tokenizer, self.context_length = engine.backend, engine.tokenizer, engine.context_length
        self.end_of_turn_ids = engine.end_of_turn_ids
        self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float | None:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else None

    def check_signal(self, k: int, temperature: float) -> None:
        self.engine.check_signal(k, temperature)

    def _lookup(self, kind: str, keys: list[str]) -> tuple[pa.Table, list[int]]:
        found = self.cache.get(kind, keys)
        present = set(found["key"].to_pylist())
        missing = [i for i, key in enumerate(keys) if key not in present]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return found, missing

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        keys = [
            content_key(self.model_id, "score", p, c, k, temperature, LOGPROB_MODE, CODEC)
            for p, c in zip(prompt_ids, completion_ids)
        ]
        found, missing = self._lookup("score", keys)
        by_key = dict(zip(found["key"].to_pylist(), signals_from_columns(found))) if found.num_rows else {}
        try:
            computed = (self.engine.score([prompt_ids[i] for i in missing], [completion_ids[i] for i in missing], k, temperature)
                        if missing else [])
            fresh = dict(zip(missing, computed))
        except EngineRequestsFailed as failure:  # keep what succeeded, so a re-run only redoes the failures
            self._store_scores({missing[j]: signal for j, signal in failure.completed.items()}, keys)
            raise
        self._store_scores(fresh, keys)
        by_key.update({keys[i]: signal for i, signal in fresh.items()})
        return [by_key[key] for key in keys]

    def _store_scores(self, signals: dict[int, SparseSignal], keys: list[str]) -> None:
        if signals:
            columns = signal_columns(list(signals.values()))
            self.cache.put("score", pa.table({"key": [keys[i] for i in signals], **columns}))

    def generate(self, prompt_ids: list[list[int]], params: Sampling, logprobs: int = 0) -> list[Generation]:
        sampling = params.model_dump()
        occurrences = collections.Counter()  # identical prompts in one call are independent samples
        keys = []
        for p in prompt_ids:
            keys.append(content_key(self.model_id, "generate", self.backend, p, sampling, self.end_of_turn_ids, logprobs, CODEC,
                                    occurrences[tuple(p)]))
            occurrences[tuple(p)] += 1
        found, missing = self._lookup("generate", keys)
        by_key = {}
        for row, signal in zip(found.to_pylist(), signals_from_columns(found) if logprobs and found.num_rows else [None] * found.num_rows):
            generation = Generation(-1, row["sample_index"], row["completion_ids"], row["text"], row["finish_reason"], signal)
            by_key.setdefault(row["key"], {})[row["sample_index"]] = generation
        try:
            fresh = self.engine.generate([prompt_ids[i] for i in missing], params, logprobs) if missing else []
        except EngineRequestsFailed as failure:
            self._store_generations([g for gs in failure.completed.values() for g in gs], missing, keys, logprobs)
            raise
        self._store_generations(fresh, missing, keys, logprobs)
        for g in fresh:
            by_key.setdefault(keys[missing[g.prompt_index]], {})[g.sample_index] = g
        return [
            dataclasses.replace(by_key[key][s], prompt_index=i)
            for i, key in enumerate(keys)
            for s in sorted(by_key[key])
        ]

    def _store_generations(self, generations: list[Generation], missing: list[int], keys: list[str], logprobs: int) -> None:
        if not generations:
            return
        columns = {
            "key": [keys[missing[g.prompt_index]] for g in generations],
            "sample_index": pa.array([g.sample_index for g in generations], pa.int32()),
            "completion_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
            "text": [g.text for g in generations],
            "finish_reason": [g.finish_reason for g in generations],
        }
        if logprobs:
            columns.update(signal_columns([g.signal for g in generations]))
        self.cache.put("generate", pa.table(columns))

"""Sharded datasets: a materialization writes Parquet shards as it goes and publishes them at once.

    work/<dataset>/<round key | all>/<fingerprint>/part-00007.parquet   finished shards of a run
                                                   part-00007.json      that shard's figures
    versions/<dataset>/[round=<key>/]<version>/part-*.parquet          a published version
                                               _manifest.json           shards, rows, data version
    data/<dataset>[/round=<key>] -> versions/...                        the current version (symlink)

A shard lands by rename, so a killed run leaves only whole shards. The work directory is named by
the run's fingerprint (config and input versions): a re-run with the same fingerprint finds the
finished shards and does only the rest; another fingerprint starts afresh. `publish` moves the work
directory under versions/ and switches the symlink in one rename, so readers (DuckDB globs, pyarrow)
see the whole old version or the whole new one, never a mix.
"""

import hashlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_BYTES = 64 << 20  # uncompressed bytes per row group: big enough to scan fast, small enough to skip
MANIFEST = "_manifest.json"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def id_encodings(schema: pa.Schema) -> dict:
    """Parquet writer options for the teacher's top-k ids (`topk_ids`, `chosen_topk_ids`, …: lists of
    lists of int32): BYTE_STREAM_SPLIT and no dictionary, so zstd sees each byte of the ids apart (the
    high bytes nearly constant). At V = 151,936 with ids spread over the whole vocabulary, 45 bytes per
    token of 20 ids instead of 83 (dictionary falling back to plain); every reader reads them alike."""
    nested_int32 = lambda t: pa.types.is_list(t) and pa.types.is_list(t.value_type) and t.value_type.value_type == pa.int32()
    ids = [f.name for f in schema if f.name.endswith("topk_ids") and nested_int32(f.type)]
    if not ids:
        return {}
    return {"use_dictionary": [name for name in schema.names if name not in ids],
            "column_encoding": {f"{name}.list.element.list.element": "BYTE_STREAM_SPLIT" for name in ids}}


def write_parquet(table: pa.Table, path: Path) -> str:
    """Writes `table` to `path` by rename (zstd, row groups of ~ROW_GROUP_BYTES, `id_encodings`);
    returns sha256 of the file's bytes (16 hex digits)."""
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    try:
        pq.write_table(table, temp, compression="zstd", row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
                       **id_encodings(table.schema))
        version = file_version(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return version


def write_json(value: dict, path: Path) -> None:
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    temp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(temp, path)


def file_version(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class ShardedWrite:
    """One materialization of dataset `name` (one round's partition, given `partition`), shard by shard.

    `fingerprint` names the run's config and inputs: the finished shards of an earlier run with the
    same fingerprint are kept (`done`), those of any other fingerprint are removed."""

    def __init__(self, root: Path, name: str, partition: str | None, fingerprint: str):
        self.root, self.name, self.partition = root, name, partition
        parent = root / "work" / name / (partition or "all")
        self.directory = parent / fingerprint
        if parent.exists():
            for stale in parent.iterdir():
                if stale.is_dir() and stale != self.directory:
                    shutil.rmtree(stale)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appended = 0

    def done(self) -> dict[int, dict]:
        """Finished shards: index → the figures written with it."""
        finished = {}
        for figures in self.directory.glob("part-*.json"):
            if (self.directory / shard_name(int(figures.stem[5:]))).exists():
                finished[int(figures.stem[5:])] = json.loads(figures.read_text())
        return finished

    def write(self, index: int, table: pa.Table, figures: dict | None = None) -> None:
        write_shard(self.directory, index, table, figures or {})

    def append(self, table: pa.Table) -> None:
        """Writes `table` as the next shard of a write made in order (shards 0, 1, 2, … of this object)."""
        self.write(self.appended, table)
        self.appended += 1

    def publish(self) -> dict:
        """Makes the finished shards the dataset's current version at once; returns the manifest
        (shards with rows and sha256, rows, data_version)."""
        finished = self.done()
        if sorted(finished) != list(range(len(finished))):
            raise RuntimeError(f"{self.name}: shards {sorted(set(range(max(finished) + 1)) - set(finished))} are missing")
        shards = [{"file": shard_name(i), "rows": finished[i]["rows"], "sha256": finished[i]["sha256"]} for i in sorted(finished)]
        data_version = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        manifest = {"dataset": self.name, "partition": self.partition, "shards": shards, "rows": sum(s["rows"] for s in shards),
                    "data_version": data_version, "published_at": datetime.now(timezone.utc).isoformat()}
        for figures in self.directory.glob("part-*.json"):
            figures.unlink()
        write_json(manifest, self.directory / MANIFEST)
        versions = self.root / "versions" / self.name / (f"round={self.partition}" if self.partition else "")
        versions.mkdir(parents=True, exist_ok=True)
        version = versions / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{data_version}-{uuid.uuid4().hex[:6]}"
        os.replace(self.directory, version)
        switch(current_link(self.root, self.name, self.partition), version)
        for old in versions.iterdir():
            if old != version and not old.name.startswith("round="):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.directory.parent, ignore_errors=True)
        return manifest


def write_shard(directory: Path, index: int, table: pa.Table, figures: dict) -> None:
    """Shard `index` and its figures into a work directory; it counts as done once both are in place
    (a shard can be written by any process that sees the directory, e.g. a Ray replica)."""
    sha256 = write_parquet(table, directory / shard_name(index))
    write_json({**figures, "rows": table.num_rows, "sha256": sha256}, directory / f"part-{index:05d}.json")


def current_link(root: Path, name: str, partition: str | None) -> Path:
    base = root / "data" / name
    return base / f"round={partition}" if partition else base


def switch(link: Path, target: Path) -> None:
    """Points `link` at `target` in one rename. A real directory there (a store written before
    versions existed) is moved under versions/ first."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        os.replace(link, target.parent / f"legacy-{uuid.uuid4().hex[:6]}")
    temp = link.parent / f".{link.name}.{uuid.uuid4().hex}.tmp"
    temp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)  # relative: the store can be moved or copied
    os.replace(temp, link)

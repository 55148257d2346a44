"""The Parquet store under DISTILL_HOME: datasets, model checkpoints, their cards, lineage and evals.

Layout:
    data/<dataset>[/round=<key>] -> versions/...    the current version of a dataset (see `shards.py`)
    versions/<dataset>/[round=<key>/]<version>/     zstd Parquet shards part-*.parquet + _manifest.json
    work/<dataset>/<key | all>/<fingerprint>/       the finished shards of a run not yet published
    data/lineage/part-<run>-<asset>[-<key>].parquet  one small file per materialization, never replaced
    data/evals/part-<run>[-<key>].parquet            likewise
    models/<name>/<weights hash>/                   HF format (safetensors), content addressed
    models/<name>/card.json                         the current model's card (path, hashes, vocab)
    models/<name>/round=<key>/card.json             a round's checkpoint card (partitioned models)
    catalog.duckdb                                  views over the Parquet (see `catalog.py`)

Every file is written to a hidden temp file and renamed into place, and a dataset's new version
replaces the old one by one symlink switch, so readers see the old data or the new, never a part.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.lineage import LINEAGE_SCHEMA
from storage.shards import MANIFEST, ROW_GROUP_BYTES, ShardedWrite, current_link, write_json, write_parquet
from training.schema.cards import ModelCard

DEFAULT_HOME = ".distill"
ROWS_PER_SHARD = 1 << 20  # rows per shard of a table written whole (`write_dataset`)


def distill_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME", DEFAULT_HOME)).resolve()


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root is not None else distill_home()

    def dataset_dir(self, name: str, partition: str | None = None) -> Path:
        """The dataset's current version (a symlink: resolve it to hold on to one version)."""
        return current_link(self.root, name, partition)

    def has_dataset(self, name: str, partition: str | None = None) -> bool:
        return any(self.dataset_dir(name, partition).glob("part-*.parquet"))

    def manifest(self, name: str, partition: str | None = None) -> dict:
        """The current version's manifest (shards, rows, data_version); a clear error if the dataset
        was never materialized."""
        path = self.dataset_dir(name, partition).resolve() / MANIFEST
        if not path.exists():
            where = f" partition {partition!r}" if partition else ""
            raise FileNotFoundError(f"dataset {name!r}{where} has not been materialized yet ({path.parent} has no {MANIFEST})")
        return json.loads(path.read_text())

    def shard_paths(self, name: str, partition: str | None = None) -> list[Path]:
        """The current version's shards, as paths of that version (a later publish does not move them)."""
        directory = self.dataset_dir(name, partition).resolve()
        return [directory / shard["file"] for shard in self.manifest(name, partition)["shards"]]

    def read_dataset(self, name: str, partition: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """The whole dataset (only `columns`, if given): for what fits in memory. Streaming readers
        use `iter_rows`."""
        tables = [pq.read_table(path, columns=columns) for path in self.shard_paths(name, partition)]
        return pa.concat_tables(tables, promote_options="permissive")

    def iter_rows(self, name: str, partition: str | None = None, rows: int = ROWS_PER_SHARD,
                  columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The dataset in consecutive slices of `rows` rows (the last one shorter), reading one
        batch at a time: memory is bounded by a slice, not the dataset."""
        pending, count = [], 0
        for path in self.shard_paths(name, partition):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
                pending.append(pa.Table.from_batches([batch]))
                count += batch.num_rows
                while count >= rows:
                    table = pa.concat_tables(pending, promote_options="permissive")
                    yield table.slice(0, rows)
                    pending, count = [table.slice(rows)], count - rows
        if count:
            yield pa.concat_tables(pending, promote_options="permissive")

    def dataset_version(self, name: str, partition: str | None = None) -> str:
        """The data version of a materialized dataset: sha256 over its shards' sha256s."""
        return self.manifest(name, partition)["data_version"]

    def dataset_rows(self, name: str, partition: str | None = None) -> int:
        return self.manifest(name, partition)["rows"]

    def sharded_write(self, name: str, partition: str | None, fingerprint: str) -> ShardedWrite:
        """A materialization of `name` written shard by shard (see `storage.shards`): resumable
        under the same `fingerprint`."""
        return ShardedWrite(self.root, name, partition, fingerprint)

    def write_dataset(self, name: str, table: pa.Table, partition: str | None = None, rows_per_shard: int = ROWS_PER_SHARD) -> dict:
        """Publishes `table` as the new version of `name` in shards of `rows_per_shard` rows; returns
        the manifest."""
        writer = self.sharded_write(name, partition, f"whole-{uuid.uuid4().hex}")
        for start in range(0, max(1, table.num_rows), rows_per_shard):
            writer.append(table.slice(start, rows_per_shard))
        return writer.publish()

    def write_work_file(self, rows: "pa.Table | duckdb.DuckDBPyRelation", file_name: str) -> Path:  # strings: storage/catalog.py
        """A model asset's generated inputs (e.g. the writing instructions, the candidates to judge), as
        work/<file_name>; a DuckDB relation is streamed to it (memory bounded whatever its size)."""
        path = self.root / "work" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(rows, pa.Table):
            write_parquet(rows, path)
            return path
        temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            rows.write_parquet(str(temp), compression="zstd", row_group_size_bytes=ROW_GROUP_BYTES)  # shards read a group at a time
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def remove_work(self, directory: Path) -> None:
        """Removes a finished work directory under work/, and its parents up to work/ itself once they are empty."""
        shutil.rmtree(directory, ignore_errors=True)
        for parent in directory.parents:
            if parent == self.root or any(parent.iterdir()):
                break
            parent.rmdir()

    def append_file(self, name: str, table: pa.Table, file_name: str) -> Path:
        """Adds one file to an append-only dataset (lineage, evals, token_texts): every run adds, none replaces."""
        path = self.appended_path(name, file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, path)
        return path

    def appended_path(self, name: str, file_name: str) -> Path:
        return self.root / "data" / name / file_name

    def token_texts_path(self, tokenizer_hash: str) -> Path:
        """The token table of one tokenizer (training/models/token_bytes.py: `token_table`) in `token_texts`."""
        return self.appended_path("token_texts", f"part-{tokenizer_hash}.parquet")

    def append_lineage(self, row: dict) -> Path:
        """One lineage row per materialization, in its own file: re-runs add rows, never replace them."""
        suffix = f"-{row['partition']}" if row.get("partition") else ""
        file_name = f"part-{row['run_id']}-{row['asset']}{suffix}.parquet"
        return self.append_file("lineage", pa.Table.from_pylist([row], schema=LINEAGE_SCHEMA), file_name)

    def append_evals(self, rows: list[dict], run_id: str, round_key: str | None) -> Path:
        """Eval rows (model, checkpoint, split, metric, value), stamped with the round and the run, in
        a file of their own: every run adds rows."""
        stamp = {"round": round_key, "run_id": run_id, "created_at": datetime.now(timezone.utc)}
        table = pa.Table.from_pylist([{**row, **stamp} for row in rows], schema=EVALS_SCHEMA)
        suffix = f"-{round_key}" if round_key else ""
        return self.append_file("evals", table, f"part-{run_id}{suffix}.parquet")

    def save_model(self, name: str, card: ModelCard, save, partition: str | None = None) -> ModelCard:
        """Saves a checkpoint by content (save(directory) writes it) and makes it `name`'s current card
        (or, given a partition, that partition's card); the card read back has its absolute `path`."""
        final = self.root / "models" / name / card.weights_hash
        if not final.exists():
            temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
            try:
                save(temp)
                os.replace(temp, final)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        self.write_card(name, card, partition, store_path=final.relative_to(self.root))
        return self.read_card(name, partition)

    def card_path(self, name: str, partition: str | None = None) -> Path:
        base = self.root / "models" / name
        return (base / f"round={partition}" if partition else base) / "card.json"

    def write_card(self, name: str, card: ModelCard, partition: str | None = None, store_path: Path | None = None) -> None:
        """card.json; `store_path`: the checkpoint's directory in this store, kept relative so that the
        store can be moved or copied (`read_card` makes it the card's absolute `path`)."""
        path = self.card_path(name, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json({**card.as_dict(), **({"store_path": str(store_path)} if store_path else {})}, path)

    def read_card(self, name: str, partition: str | None = None) -> ModelCard:
        path = self.card_path(name, partition)
        if not path.exists():
            where = f" for round {partition}" if partition else ""
            raise FileNotFoundError(f"model {name!r} has no checkpoint{where} yet: materialize the `{name}` asset{where} first")
        fields = json.loads(path.read_text())
        if "store_path" in fields:  # a checkpoint in this store
            fields["path"] = str(self.root / fields.pop("store_path"))
        return ModelCard(**fields)


EVALS_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("checkpoint", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("round", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        # lm-evaluation-harness rows only (split: the task): how the metric was measured
        ("harness", pa.string()),
        ("num_fewshot", pa.int32()),
        ("seed", pa.int64()),
        ("max_gen_toks", pa.int32()),
    ]
)

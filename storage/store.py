"""The Parquet store under DISTILL_HOME: datasets, model checkpoints, their cards, lineage and evals.

Layout:
    data/<dataset>/[round=<key>/]part-0.parquet   zstd Parquet, one file per (dataset, partition)
    data/lineage/part-<run>-<asset>[-<key>].parquet  one small file per materialization, never replaced
    models/<name>/<weights hash>/                   HF format (safetensors), content addressed
    models/<name>/card.json                         the current model's card (path, hashes, vocab)
    models/<name>/round=<key>/card.json             a round's checkpoint card (partitioned models)
    locks/round=<key>.lock                          held while an asset of that round runs
    catalog.duckdb                                  views over the Parquet (see `catalog.py`)

Every write goes to a hidden temp file in the same directory and is renamed into place, so readers
see the old file or the new one, never a partial one.
"""

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.lineage import LINEAGE_SCHEMA, file_version

DEFAULT_HOME = ".distill"


def distill_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME", DEFAULT_HOME)).resolve()


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root is not None else distill_home()

    def dataset_dir(self, name: str, partition: str | None = None) -> Path:
        base = self.root / "data" / name
        return base / f"round={partition}" if partition else base

    def dataset_path(self, name: str, partition: str | None = None) -> Path:
        return self.dataset_dir(name, partition) / "part-0.parquet"

    def write_dataset(self, name: str, table: pa.Table, partition: str | None = None, file_name: str = "part-0.parquet") -> Path:
        """Atomically writes (or replaces) one Parquet file of `name`; returns its path."""
        directory = self.dataset_dir(name, partition)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp"):
            stale.unlink()
        path = directory / file_name
        temp = directory / f".{file_name}.{uuid.uuid4().hex}.tmp"
        try:
            pq.write_table(table, temp, compression="zstd")
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def read_dataset(self, name: str, partition: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """The dataset's table (only `columns`, if given); a clear error if it was never materialized."""
        path = self.dataset_path(name, partition)
        if not path.exists():
            where = f" partition {partition!r}" if partition else ""
            raise FileNotFoundError(f"dataset {name!r}{where} has not been materialized yet ({path} is missing)")
        return pq.read_table(path, columns=columns)

    def dataset_version(self, name: str, partition: str | None = None) -> str:
        """The data version of a materialized dataset: sha256 of its Parquet bytes."""
        return file_version(self.dataset_path(name, partition))

    def append_lineage(self, row: dict) -> Path:
        """One lineage row per materialization, in its own file: re-runs add rows, never replace them."""
        suffix = f"-{row['partition']}" if row.get("partition") else ""
        file_name = f"part-{row['run_id']}-{row['asset']}{suffix}.parquet"
        return self.write_dataset("lineage", pa.Table.from_pylist([row], schema=LINEAGE_SCHEMA), file_name=file_name)

    def append_evals(self, rows: list[dict], run_id: str, round_key: str | None) -> Path:
        """Eval rows (model, checkpoint, split, metric, value), stamped with the round and the run, in
        a file of their own: every run adds rows."""
        stamp = {"round": round_key, "run_id": run_id, "created_at": datetime.now(timezone.utc)}
        table = pa.Table.from_pylist([{**row, **stamp} for row in rows], schema=EVALS_SCHEMA)
        suffix = f"-{round_key}" if round_key else ""
        return self.write_dataset("evals", table, file_name=f"part-{run_id}{suffix}.parquet")

    def save_model(self, name: str, card: dict, save, partition: str | None = None) -> dict:
        """Saves a checkpoint by content (save(directory) writes it) and makes it `name`'s current card
        (or, given a partition, that partition's card)."""
        final = self.root / "models" / name / card["weights_hash"]
        if not final.exists():
            temp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
            try:
                save(temp)
                os.replace(temp, final)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        card = {**card, "path": str(final)}
        self.write_card(name, card, partition)
        return card

    def card_path(self, name: str, partition: str | None = None) -> Path:
        base = self.root / "models" / name
        return (base / f"round={partition}" if partition else base) / "card.json"

    def write_card(self, name: str, card: dict, partition: str | None = None) -> None:
        path = self.card_path(name, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".card.json.{uuid.uuid4().hex}.tmp"
        temp.write_text(json.dumps(card, indent=2, sort_keys=True))
        os.replace(temp, path)

    def read_card(self, name: str, partition: str | None = None) -> dict:
        path = self.card_path(name, partition)
        if not path.exists():
            where = f" for round {partition}" if partition else ""
            raise FileNotFoundError(f"model {name!r} has no checkpoint{where} yet: materialize the `{name}` asset{where} first")
        return json.loads(path.read_text())

    @contextmanager
    def round_lock(self, key: str, holder: str):
        """Holds locks/round=<key>.lock while `holder` works on round `key`; a second holder fails at
        once with the first one's name, so two launches of a round never interleave their writes."""
        path = self.root / "locks" / f"round={key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise RuntimeError(
                    f"round {key} is being materialized by another run ({handle.read().strip() or 'unknown'}); "
                    "wait for it to finish, then re-run this round"
                ) from None
            try:
                handle.truncate(0)
                handle.write(holder)
                handle.flush()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


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
    ]
)

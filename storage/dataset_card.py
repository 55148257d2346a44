"""Dataset cards: the README.md the Hugging Face Hub and `datasets` read, beside an export or a stored
dataset's shards, so that the directory can be pushed as it is.

YAML metadata (huggingface_hub's `DatasetCardData`): pretty_name; license `other`, since the teacher's
and the prompt sources' terms apply; task_categories; tags; size_categories; source_datasets; configs
(the data files, which `datasets.load_dataset(directory)` follows); dataset_info (the features as
`datasets` writes them, and the split's row count). The body says what a user needs to train on the
rows without reading their columns: the teacher (name, revision, weights and tokenizer hashes), the
signal (k, temperature, codec, logprob mode), the sampling, the curation funnel (for `curated`), the
data version and the lineage of the materialization that wrote it.
"""

import json
from pathlib import Path

import datasets
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from storage.catalog import query
from storage.store import Store

# the Hub's size categories, by their upper bound
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
# the columns that describe how the rows were made, one or a few values per dataset
DESCRIBING = ["teacher", "teacher_revision", "teacher_weights_hash", "tokenizer_hash", "k", "temperature", "codec",
              "logprob_mode", "sampling", "origin", "source", "judge", "policy"]
MOST_VALUES = 20  # distinct values a card lists per describing column
LICENSE_NOTE = ("The rows hold a teacher model's outputs on prompts from the sources named below: the teacher's license "
                "and terms of use, and each source's, apply to this dataset; set `license` to what they allow before you share it.")


def size_category(rows: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")


def distinct(shards: list[Path], column: str, most: int = MOST_VALUES) -> list:
    """The distinct values of `column` in the shards (at most `most`, nulls left out; none when no shard has the column),
    read by DuckDB from the files: memory is bounded by those values, not the dataset."""
    if column not in pq.read_schema(shards[0]).names:
        return []
    files = ", ".join("'" + str(path).replace("'", "''") + "'" for path in shards)
    with duckdb.connect() as connection:
        return [v for (v,) in connection.sql(f"SELECT DISTINCT {column} AS v FROM read_parquet([{files}], union_by_name = true) "
                                             f"WHERE {column} IS NOT NULL ORDER BY v LIMIT {most}").fetchall()]


def described(shards: list[Path]) -> dict[str, list]:
    """The distinct values of the describing columns the shards have (see `distinct`)."""
    return {column: values for column in DESCRIBING if (values := distinct(shards, column))}


def latest_lineage(store: Store, name: str, partition: str | None) -> dict | None:
    """The lineage row of the materialization that wrote the dataset's current version."""
    where = f"asset = '{name.replace(chr(39), chr(39) * 2)}' AND " + (
        f"partition = '{partition.replace(chr(39), chr(39) * 2)}'" if partition else "partition IS NULL")
    try:
        columns, found = query(store, f"SELECT run_id, input_versions, config_hash, code_version, created_at FROM lineage "
                                      f"WHERE {where} ORDER BY created_at DESC LIMIT 1")
    except Exception:  # no lineage yet: a store written by hand (tests, the bench)
        return None
    return dict(zip(columns, found[0])) if found else None


def funnel(store: Store, name: str) -> list[tuple]:
    """`curated`'s curation funnel (filter, setting, rows in, rows out) from its `curation_report`."""
    if name != "curated" or not store.has_dataset("curation_report"):
        return []
    _, rows = query(store, "SELECT filter, setting, rows_in, rows_out FROM curation_report")
    return rows


def dataset_card(store: Store, name: str, partition: str | None, files: pa.Schema, data_files: str,
                 rows: int, num_bytes: int, format: str | None = None, dropped: dict | None = None) -> DatasetCard:
    """The card of the stored dataset `name` (`partition`): `files` is the schema of the files the card
    describes (`data_files`, a glob relative to the card, `rows` rows of `num_bytes` bytes in Arrow),
    `format` the export format (None: the stored dataset itself), `dropped` the rows the export left
    out, by reason."""
    values = described(store.shard_paths(name, partition))
    sources = values.get("source") or ["original"]
    lineage = latest_lineage(store, name, partition)
    features = datasets.Features.from_arrow_schema(files)
    data = DatasetCardData(
        pretty_name=f"{name}{f' (round {partition})' if partition else ''}", license="other", license_name="teacher-and-sources",
        task_categories=["text-generation"], size_categories=[size_category(rows)], source_datasets=sources,
        tags=["knowledge-distillation", "synthetic", "distill-builder", *([f"top-{k}-logprobs" for k in values.get("k", [])])],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        dataset_info={"features": features._to_yaml_list(), "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": rows}]},
    )
    lines = [f"# {data.pretty_name}", "",
             f"{rows} rows of `{name}`" + (f", exported for `{format}` (`distill export --format {format}`)" if format else "")
             + ", built by distill-builder. Load it with `datasets.load_dataset(\"<this directory or repo>\", split=\"train\")`.", "",
             "## How the rows were made", "", "| field | value |", "|---|---|"]
    lines += [f"| {column} | {', '.join(f'`{v}`' for v in value)} |" for column, value in values.items()]
    if store.has_dataset(name, partition):
        lines.append(f"| data_version | `{store.dataset_version(name, partition)}` |")
    if lineage:
        lines += [f"| lineage {key} | `{value}` |" for key, value in lineage.items() if key != "input_versions"]
        lines += [f"| input `{key}` | `{value}` |" for key, value in json.loads(lineage["input_versions"]).items()]
    if dropped and any(dropped.values()):
        left_out = ", ".join(f"{reason.replace('_', ' ')}: {count}" for reason, count in dropped.items() if count)
        lines += ["", f"Rows the export left out: {left_out}."]
    if curation := funnel(store, name):
        lines += ["", "## Curation funnel", "", "| filter | setting | rows in | rows out |", "|---|---|---|---|"]
        lines += [f"| {f} | {s} | {i} | {o} |" for f, s, i, o in curation]
    lines += ["", "## License", "", LICENSE_NOTE, ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_readme(card: DatasetCard, directory: Path) -> Path:
    """README.md in `directory`, written whole and renamed into place."""
    path, temp = directory / "README.md", directory / ".README.md.tmp"
    try:
        temp.write_text(str(card))
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
    return path

"""The `distill` command: list datasets, query them with DuckDB (read-only), export them for other trainers, write their cards."""

import argparse
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

from storage.catalog import dataset_names, query, refresh_catalog
from storage.dataset_card import dataset_card, write_readme
from storage.export import FILE_TYPES, FORMATS, export_dataset
from storage.store import Store
from training.models.checkpoints import load_tokenizer
from training.schema.tables import duckdb_identifier

MAX_CELL = 48


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(v) if len(str(v)) <= MAX_CELL else str(v)[: MAX_CELL - 1] + "…" for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def list_datasets(store: Store) -> tuple[list[str], list[tuple]]:
    names = dataset_names(store)
    if not names:
        return ["dataset", "rows", "path"], []
    union = " UNION ALL ".join(
        f"SELECT '{name}' AS dataset, count(*) AS rows FROM {duckdb_identifier(name)}" for name in names
    )
    _, counts = query(store, union)
    rows = [(name, count, str(store.root / "data" / name)) for name, count in counts]
    return ["dataset", "rows", "path"], rows


def student_tokenizer(store: Store, given: str | None):
    """The student's tokenizer: `given` (a path or hub id), else the store's student_model's, at its revision."""
    from assets.inputs import CARD_OF  # here: the other commands need no Dagster

    if given:
        return load_tokenizer(given)
    if not store.card_path(CARD_OF["student_model"]).exists():
        raise ValueError("the axolotl layout follows the student's chat template: pass --tokenizer (the student's model path "
                         "or hub id), or materialize student_model in this store")
    card = store.read_card(CARD_OF["student_model"])
    return load_tokenizer(card.path, card.revision)


def stored_card(store: Store, name: str, partition: str | None, out: str | None) -> Path:
    """The card of a stored dataset as it is (its shards, `part-*.parquet`), written beside the shards or in `out`
    (its data_files then point at the shards from there)."""
    shards = store.shard_paths(name, partition)
    directory = Path(out).resolve() if out else shards[0].parent
    directory.mkdir(parents=True, exist_ok=True)
    files = os.path.relpath(shards[0].parent, directory)
    in_memory = sum(pq.ParquetFile(path).metadata.row_group(i).total_byte_size for path in shards
                    for i in range(pq.ParquetFile(path).metadata.num_row_groups))
    card = dataset_card(store, name, partition, pq.read_schema(shards[0]), "part-*.parquet" if files == "." else f"{files}/part-*.parquet",
                        store.dataset_rows(name, partition), in_memory)
    return write_readme(card, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill", description="Query the distillation datasets with DuckDB.")
    parser.add_argument("--home", help="data root (default: $DISTILL_HOME or ./.distill)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("datasets", help="dataset names, row counts and paths")
    run_query = commands.add_parser("query", help="run a SELECT on the datasets (reads no other file, writes none)")
    run_query.add_argument("sql")
    commands.add_parser("refresh", help="recreate the catalog's views over the Parquet files")
    export = commands.add_parser("export", help="write a dataset in a format other trainers load as is (storage/export.py)")
    export.add_argument("dataset")
    export.add_argument("--format", choices=FORMATS, required=True,
                        help="trl: prompt/completion; messages; axolotl: messages + top-k; dpo: prompt/chosen/rejected (pair tables)")
    export.add_argument("--out", required=True, help="directory for train.parquet (or train.jsonl)")
    export.add_argument("--as", dest="file_type", choices=FILE_TYPES, default="parquet")
    export.add_argument("--partition", help="a round, for the round datasets (student_rollouts, teacher_feedback, round_pairs, ...)")
    export.add_argument("--teacher", help="several teachers: the rows of this teacher's signal (its teacher_id; 'mixture'); "
                        "without it each response once, as its author scored it (axolotl asks for one)")
    export.add_argument("--tokenizer", help="axolotl: the student's model (path or hub id), whose chat template axolotl renders "
                                            "with (default: the store's student_model)")
    card = commands.add_parser("card", help="write the dataset card (README.md) of a stored dataset, beside its shards or in --out")
    card.add_argument("dataset")
    card.add_argument("--partition", help="a round, for the round datasets")
    card.add_argument("--out", help="directory for README.md (default: the dataset's current version, beside its part-*.parquet)")
    args = parser.parse_args(argv)
    store = Store(args.home)
    try:
        if args.command == "refresh":
            print("views:", ", ".join(refresh_catalog(store)) or "(none)")
        elif args.command == "export":
            tokenizer = student_tokenizer(store, args.tokenizer) if args.format == "axolotl" else None
            path, dropped = export_dataset(store, args.dataset, args.format, args.out, args.partition, args.file_type, tokenizer,
                                           args.teacher)
            print(f"wrote {path}\nwrote {path.parent / 'README.md'} (its dataset card)")
            if any(dropped.values()):
                print("left out: " + ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count))
        elif args.command == "card":
            print(f"wrote {stored_card(store, args.dataset, args.partition, args.out)}")
        elif args.command == "datasets":
            print(format_table(*list_datasets(store)))
        else:
            print(format_table(*query(store, args.sql)))
    except Exception as error:  # a CLI reports, it does not dump a traceback
        print(f"distill: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `distill` command: list datasets, query them with DuckDB (read-only), export them for other trainers."""

import argparse
import sys

from storage.catalog import dataset_names, query, refresh_catalog
from storage.export import FILE_TYPES, FORMATS, export_dataset
from storage.store import Store
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
    args = parser.parse_args(argv)
    store = Store(args.home)
    try:
        if args.command == "refresh":
            print("views:", ", ".join(refresh_catalog(store)) or "(none)")
        elif args.command == "export":
            path = export_dataset(store.read_dataset(args.dataset, args.partition), args.format, args.out, args.file_type)
            print(f"wrote {path}")
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

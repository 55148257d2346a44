"""Publishing a materialization: publish the Parquet shards, add the lineage row, refresh the catalog, and
describe it all in Dagster metadata (floats rounded to 4 significant digits for the UI; lineage
keeps them whole)."""

import base64
import io
import math

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq

from storage.catalog import refresh_catalog
from storage.lineage import lineage_row
from storage.shards import ShardedWrite
from storage.store import Store
from training.schema.cards import ModelCard

PREVIEW_ROWS = 5
PREVIEW_CHARS = 60
SIGNIFICANT_DIGITS = 4


def rounded(value):
    """`value` with floats at SIGNIFICANT_DIGITS significant digits (0.04799999999999993 → 0.048)."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value))))
    return value


def metadata(values: dict) -> dict:
    """Dagster metadata from a dict of figures: floats rounded, None left out."""
    return {key: rounded(value) for key, value in values.items() if value is not None}


def markdown_preview(table: pa.Table, columns: list[str]) -> str:
    head = table.select([c for c in columns if c in table.column_names]).slice(0, PREVIEW_ROWS).to_pylist()
    if not head:
        return "(no rows)"
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "⏎")[:PREVIEW_CHARS]
    lines = ["| " + " | ".join(head[0]) + " |", "|" + "---|" * len(head[0])]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in head]
    return "\n".join(lines)


def png_markdown(figure, alt: str) -> dg.MetadataValue:
    """A matplotlib figure as a markdown image in Dagster metadata (the figure is closed)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})")


def _output_key(context: dg.AssetExecutionContext, name: str | None) -> str:
    """The asset a lineage row is about: `name` in a multi-asset, else the context's asset."""
    return name if name is not None else context.asset_key.to_user_string()


def record_lineage(context: dg.AssetExecutionContext, store: Store, config: dg.Config | None, inputs: dict[str, str],
                   metrics: dict, parent_round: str | None = None, asset: str | None = None) -> None:
    """One `lineage` row; `asset` names the output of a multi-asset (default: the context's asset)."""
    partition = context.partition_key if context.has_partition_key else None
    settings = config.model_dump() if config is not None else {}
    store.append_lineage(lineage_row(_output_key(context, asset), partition, context.run.run_id, parent_round, inputs, settings, metrics))


def publish_dataset(context: dg.AssetExecutionContext, store: Store, name: str, data: pa.Table | ShardedWrite, *,
                    config: dg.Config | None, inputs: dict[str, str], metrics: dict, preview: list[str],
                    display: dict | None = None, parent_round: str | None = None) -> dg.MaterializeResult:
    """Publishes `data` (a table, or the finished shards of a `ShardedWrite`) as the new version of
    dataset `name` (the context's partition, if any), records lineage, refreshes the catalog;
    returns the MaterializeResult: `metrics` (also in lineage), `display` (tables, charts: metadata
    only) and the `preview` columns of the first rows. In a multi-asset the output's asset key is `name`."""
    partition = context.partition_key if context.has_partition_key else None
    multi_asset = len(context.assets_def.keys) > 1
    manifest = data.publish() if isinstance(data, ShardedWrite) else store.write_dataset(name, data, partition)
    paths = store.shard_paths(name, partition)
    record_lineage(context, store, config, inputs, {**metrics, "rows": manifest["rows"], "data_version": manifest["data_version"]},
                   parent_round, asset=name if multi_asset else None)
    refresh_catalog(store)
    first = pq.ParquetFile(paths[0])
    head = first.read_row_group(0, columns=[c for c in preview if c in first.schema_arrow.names]) if first.num_row_groups else pa.table({})
    schema = dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in first.schema_arrow])
    return dg.MaterializeResult(
        asset_key=name if multi_asset else None,
        metadata={
            "dagster/row_count": manifest["rows"],
            "dagster/column_schema": schema,
            "path": dg.MetadataValue.path(str(paths[0].parent)),
            "shards": len(paths),
            "bytes": sum(path.stat().st_size for path in paths),
            "preview": dg.MetadataValue.md(markdown_preview(head, preview)),
            "inputs": dg.MetadataValue.json(inputs),
            **metadata(metrics),
            **(display or {}),
        },
        data_version=dg.DataVersion(manifest["data_version"]),
    )


def publish_evals(context: dg.AssetExecutionContext, store: Store, results: dict[str, dict], cards: dict[str, ModelCard],
                  round_key: str | None, harness_rows: list[dict] = ()) -> tuple[str, list[dict]]:
    """Appends one `evals` row per model and metric, and the harness's rows (training/evals/harness.py),
    stamped with the round and the run, and refreshes the catalog; returns (the file's path, the rows)."""
    rows = [{"model": name, "checkpoint": cards[name].weights_hash, "split": "eval", "metric": metric, "value": value}
            for name, metrics in results.items() for metric, value in metrics.items()] + list(harness_rows)
    path = store.append_evals(rows, context.run.run_id, round_key)
    refresh_catalog(store)
    return str(path), rows

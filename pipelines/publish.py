"""Publishing a materialization: write the Parquet, add the lineage row, refresh the catalog, and
describe it all in Dagster metadata."""

import base64
import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa

from pipelines.catalog import refresh_catalog
from pipelines.store import Store

CODE_VERSION = "0.1.0"
PREVIEW_ROWS = 5
PREVIEW_CHARS = 60


def file_version(path: Path) -> str:
    """sha256 of a file's bytes: the data version of a Parquet output."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def config_hash(config: dg.Config | None) -> str:
    payload = json.dumps(config.model_dump() if config is not None else {}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def record_lineage(
    context: dg.AssetExecutionContext,
    store: Store,
    config: dg.Config | None,
    inputs: dict[str, str],
    metrics: dict,
    parent_round: str | None = None,
    asset: str | None = None,
) -> None:
    """One `lineage` row; `asset` names the output of a multi-asset (default: the context's asset)."""
    store.append_lineage(
        {
            "asset": asset or context.asset_key.to_user_string(),
            "partition": context.partition_key if context.has_partition_key else None,
            "run_id": context.run_id,
            "parent_round": parent_round,
            "input_versions": json.dumps(inputs, sort_keys=True),
            "config_hash": config_hash(config),
            "code_version": CODE_VERSION,
            "metrics": json.dumps(metrics, sort_keys=True, default=str),
            "created_at": datetime.now(timezone.utc),
        }
    )


def publish_dataset(
    context: dg.AssetExecutionContext,
    store: Store,
    name: str,
    table: pa.Table,
    config: dg.Config | None,
    inputs: dict[str, str],
    metrics: dict,
    preview_columns: list[str],
    multi_asset: bool = False,
    display: dict | None = None,
    parent_round: str | None = None,
) -> dg.MaterializeResult:
    """Writes `table` atomically, records lineage, refreshes the catalog; returns the metadata:
    `metrics` (also in lineage) and `display` (tables, charts: metadata only). In a multi-asset
    (`multi_asset=True`) the output's asset key is the dataset `name`."""
    partition = context.partition_key if context.has_partition_key else None
    path = store.write_dataset(name, table, partition)
    version = file_version(path)
    record_lineage(context, store, config, inputs, {**metrics, "rows": table.num_rows, "data_version": version},
                   parent_round, asset=name if multi_asset else None)
    refresh_catalog(store)
    schema = dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in table.schema])
    return dg.MaterializeResult(
        asset_key=name if multi_asset else None,
        metadata={
            "dagster/row_count": table.num_rows,
            "dagster/column_schema": schema,
            "path": dg.MetadataValue.path(str(path)),
            "bytes": path.stat().st_size,
            "preview": dg.MetadataValue.md(markdown_preview(table, preview_columns)),
            "inputs": dg.MetadataValue.json(inputs),
            **{key: value for key, value in metrics.items() if value is not None},
            **(display or {}),
        },
        data_version=dg.DataVersion(version),
    )

"""Lineage: one `lineage` row per materialization (asset, round, run, parent round, input data
versions, config hash, code version, metrics), and the versions it is made of."""

import hashlib
import json
from datetime import datetime, timezone

import pyarrow as pa

CODE_VERSION = "0.1.0"

LINEAGE_SCHEMA = pa.schema(
    [
        ("asset", pa.string()),
        ("partition", pa.string()),
        ("run_id", pa.string()),
        ("parent_round", pa.string()),
        ("input_versions", pa.string()),  # JSON: input name → data version / hash
        ("config_hash", pa.string()),
        ("code_version", pa.string()),
        ("metrics", pa.string()),  # JSON
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def config_hash(settings: dict) -> str:
    payload = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def lineage_row(asset: str, partition: str | None, run_id: str, parent_round: str | None, inputs: dict[str, str],
                settings: dict, metrics: dict) -> dict:
    """The `lineage` row of one materialization."""
    return {
        "asset": asset,
        "partition": partition,
        "run_id": run_id,
        "parent_round": parent_round,
        "input_versions": json.dumps(inputs, sort_keys=True),
        "config_hash": config_hash(settings),
        "code_version": CODE_VERSION,
        "metrics": json.dumps(metrics, sort_keys=True, default=str),
        "created_at": datetime.now(timezone.utc),
    }

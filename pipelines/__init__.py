"""Dagster wiring: definitions, resources, settings, the Parquet store, the DuckDB catalog, the CLI."""

"""Storage below Dagster: the Parquet store under DISTILL_HOME, the DuckDB catalog over it, and
lineage. Never imports dagster; `assets/` and `pipelines/` build on it, and it builds on `training/`
for table helpers only."""

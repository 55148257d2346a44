"""Dagster asset definitions and checks. Thin: read, call `training/` and the store, write."""

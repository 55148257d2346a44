"""Dagster asset definitions and checks, with their config (`config.py`), resources, partitions and
publishing beside them. Thin: read, call `training/` and the store, write, return metadata."""

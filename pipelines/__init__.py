"""Wiring, above the assets: the code location (`definitions.py`), jobs, the round sensor and
schedule, the Dagster instance `make demo`/`make ui` share, the `distill` CLI and the demo."""

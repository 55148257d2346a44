"""The Dagster instance that `make demo` and `make ui` share: $DAGSTER_HOME with a dagster.yaml whose
pool limit lets one step of pool `accelerator` (every asset that loads a model) run at a time, across
all runs, and with the daemon's run monitoring (runs stuck starting or canceling are failed, slots of
finished runs freed); runs whose process was killed are released as assets/runs.py describes. An
existing dagster.yaml is the user's and is never overwritten.

    python -m pipelines.instance      # prepares $DAGSTER_HOME
"""

import os
from pathlib import Path

INSTANCE_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
run_monitoring:
  enabled: true
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 60
"""


def prepare_dagster_home(path: str | Path) -> Path:
    """Creates `path` and, if it has none, its dagster.yaml with the pool limit; returns the path."""
    home = Path(path)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(INSTANCE_YAML)
    return home


if __name__ == "__main__":
    print(prepare_dagster_home(os.environ["DAGSTER_HOME"]) / "dagster.yaml")

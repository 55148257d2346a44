"""The Dagster code location: assets, checks, jobs, the round and dead-run sensors, the round schedule, and resources."""

import dagster as dg

from assets import checks, curation, datasets, feedback, models, rounds, students
from assets.executor import ShardExecutor
from assets.resources import ModelEngine, store_resource
from assets.runs import releasing
from pipelines.dead_runs import dead_run_sensor
from pipelines.jobs import distill_feedback, distill_offline, round_jobs
from pipelines.sensors import round_schedule, round_sensor

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([models, datasets, curation, students, rounds, feedback]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[distill_offline, distill_feedback, *round_jobs.values()],
    sensors=[round_sensor, dead_run_sensor],
    schedules=[round_schedule],
    executor=releasing(dg.multi_or_in_process_executor),  # releases dead runs before a run claims pool slots
    resources={"store": store_resource, "model_engine": ModelEngine(), "shard_executor": ShardExecutor()},
)

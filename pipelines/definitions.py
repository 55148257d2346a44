"""The Dagster code location: assets, checks, jobs and resources."""

import dagster as dg

from assets import checks, curation, datasets, models, students
from pipelines.jobs import distill_offline
from pipelines.resources import DistillStore, TeacherEngine

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([models, datasets, curation, students]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[distill_offline],
    resources={"store": DistillStore(), "teacher_engine": TeacherEngine()},
)

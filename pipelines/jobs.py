"""Jobs: `distill_offline` materializes every offline asset (the demo's main job)."""

import dagster as dg

distill_offline = dg.define_asset_job(
    "distill_offline",
    selection=dg.AssetSelection.groups("models", "datasets", "students"),
    description="Teacher and student models, seed prompts, eval set, the teacher-labeled dataset, the offline student and the evals.",
)

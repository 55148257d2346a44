"""Jobs: `distill_offline` materializes every offline asset (the demo's main job); `distill_round`
runs one stored on-policy round (a partition of `rounds`), `distill_round_online` one online round: each
selects its mode's assets (training/rounds/modes.py)."""

import dagster as dg

from assets.partitions import rounds
from training.rounds.modes import ROUND_MODES

distill_offline = dg.define_asset_job(
    "distill_offline",
    selection=dg.AssetSelection.groups("models", "datasets", "students"),
    description="Teacher and student models, seed prompts, eval set, the teacher-labeled dataset, the offline student and the evals.",
)

distill_round = dg.define_asset_job(
    "distill_round",
    selection=list(ROUND_MODES["stored"].assets),
    partitions_def=rounds,
    executor_def=dg.in_process_executor,  # the steps run one after another anyway; one process loads torch once
    description="One on-policy round: student_rollouts → teacher_feedback → student_checkpoint → round_eval.",
)

ONLINE_ROUND = list(ROUND_MODES["online"].assets)
ONLINE_CONFIG = {"ops": {"student_checkpoint": {"config": {"online": True}}}}

distill_round_online = dg.define_asset_job(
    "distill_round_online",
    selection=ONLINE_ROUND,
    partitions_def=rounds,
    config=ONLINE_CONFIG,
    executor_def=dg.in_process_executor,
    description="One online round: student_checkpoint samples, scores and trains at every on-policy step (GKD's "
                "Algorithm 1), appending each batch to online_feedback → round_eval.",
)

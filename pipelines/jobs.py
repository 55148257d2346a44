"""Jobs: `distill_offline` materializes every offline asset (the demo's main job); `distill_feedback`
the offline feedback path (student samples, the teacher's judgments, preference pairs, the preference
student); one round job per round mode (training/rounds/modes.py), each a partition of `rounds` that
selects its mode's assets: `distill_round` (stored), `distill_round_online`, `distill_round_preference`, `distill_round_self`."""

import dagster as dg

from assets.partitions import rounds
from training.rounds.modes import ROUND_MODES

distill_offline = dg.define_asset_job(
    "distill_offline",
    selection=dg.AssetSelection.groups("models", "datasets", "students"),
    description="Teacher and student models, seed prompts, eval set, the teacher-labeled dataset, the offline student and the evals.",
)

distill_feedback = dg.define_asset_job(
    "distill_feedback",
    selection=dg.AssetSelection.groups("feedback"),
    executor_def=dg.in_process_executor,
    description="The teacher as judge, offline (after distill_offline): offline_student's samples → the teacher's judgments of "
                "them and of its own responses → preference pairs → preference_student (dDPO from offline_student).",
)


def mode_config(mode: str) -> dict:
    """The run config a round of `mode` sets on its assets (student_checkpoint's `online` or objective,
    a self round's teacher_feedback scored by the parent)."""
    settings = ROUND_MODES[mode].config
    return {"ops": {asset: {"config": config} for asset, config in settings.items()}} if settings else {}


round_jobs = {
    mode: dg.define_asset_job(
        "distill_round" if mode == "stored" else f"distill_round_{mode}", selection=list(ROUND_MODES[mode].assets),
        partitions_def=rounds, config=mode_config(mode) or None,
        executor_def=dg.in_process_executor,  # the steps run one after another anyway; one process loads torch once
        description=f"One {mode} round (training/rounds/modes.py): {' → '.join(ROUND_MODES[mode].assets)}.",
    )
    for mode in ROUND_MODES
}
distill_round = round_jobs["stored"]

"""Round modes: what a round samples, scores and trains on, one entry each. The round jobs, the
round sensor and round_eval read this table, so a new kind of round (preference pairs, the student's
own filtered samples) is a new entry, not a new branch.

    stored  the parent samples once (student_rollouts[r]), the teacher scores every token
            (teacher_feedback[r]), training draws from them (`rollout_reuse` says how stale)
    online  every on-policy step samples a fresh batch from the student as it is, the teacher scores
            it, the step trains on it (GKD's Algorithm 1, online.py); kept as online_feedback[r]
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundMode:
    assets: tuple[str, ...]  # the round's assets, in the order they run
    scored: str  # the dataset of the student's scored samples the round trains on
    online: bool  # student_checkpoint's `online`: samples during training


ROUND_MODES = {
    "stored": RoundMode(("student_rollouts", "teacher_feedback", "student_checkpoint", "round_eval"), "teacher_feedback", online=False),
    "online": RoundMode(("student_checkpoint", "online_feedback", "round_eval"), "online_feedback", online=True),
}


def mode_of(online: bool) -> str:
    """The mode a student_checkpoint of this `online` setting trained in."""
    return next(name for name, mode in ROUND_MODES.items() if mode.online == online)

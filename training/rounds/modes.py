"""Round modes: what a round samples, scores and trains on, one entry each. The round jobs, the
round sensor and round_eval read this table, so a new kind of round (preference pairs, the student's
own filtered samples) is a new entry, not a new branch.

    stored  the parent samples once (student_rollouts[r]), the teacher scores every token
            (teacher_feedback[r]), training draws from them (`rollout_reuse` says how stale)
    online  every on-policy step samples a fresh batch from the student as it is, the teacher scores
            it, the step trains on it (GKD's Algorithm 1, online.py); kept as online_feedback[r]
    preference  the parent samples n responses per prompt (student_rollouts[r]), the teacher scores them
            (teacher_feedback[r]) and judges them (round_judgments[r]), pairs are built with the parent's
            reference log-probs (round_pairs[r]), and the student trains from its parent with a ranking
            objective (DPO, or RRHF on the judged lists), optionally with KD on the pairs' tokens
"""

from dataclasses import dataclass, field

from training.trainer.objectives import OBJECTIVES, RANKING_KINDS


@dataclass(frozen=True)
class RoundMode:
    assets: tuple[str, ...]  # the round's assets, in the order they run
    scored: str  # the dataset of the student's scored samples the round trains on
    config: dict = field(default_factory=dict)  # the run config its job sets, per asset (the rest as configured)


STORED = ("student_rollouts", "teacher_feedback", "student_checkpoint", "round_eval")
ROUND_MODES = {
    "stored": RoundMode(STORED, "teacher_feedback"),
    "online": RoundMode(("student_checkpoint", "online_feedback", "round_eval"), "online_feedback",
                        {"student_checkpoint": {"online": True}}),
    "preference": RoundMode(("student_rollouts", "teacher_feedback", "round_judgments", "round_pairs", "student_checkpoint",
                             "round_eval"), "teacher_feedback", {"student_checkpoint": {"objective": "dpo", "mix": 0.0}}),
    "self": RoundMode(STORED, "teacher_feedback", {"teacher_feedback": {"teacher": "parent"},
                                                    "student_checkpoint": {"objective": "sft", "mix": 1.0, "keep": "rewarded"}}),
}


def mode_of(online: bool, objective: str) -> str:
    """The mode whose scored samples a student_checkpoint of these `online` and `objective` settings
    trained on: a ranking objective (one that trains on pairs or ranked lists) makes a preference round;
    a self round's samples are stored as a stored round's."""
    if online:
        return "online"
    return "preference" if OBJECTIVES[objective].takes & RANKING_KINDS else "stored"

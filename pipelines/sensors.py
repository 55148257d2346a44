"""Opening on-policy rounds: a sensor opens round r+1 once round r has finished, while fewer than
`max_rounds` have run and round r improved on its parent by at least `min_improvement` on the
policy's `metric`; a schedule (off by default) does the same on a cron. The policy comes from the
environment (`RoundPolicy`).

Both are off by default (rounds cost compute): turn them on in the UI (Automation), or launch the
`distill_round` job for a chosen partition by hand.
"""

import os
from typing import Literal

import dagster as dg
from pydantic import Field, model_validator

from assets.partitions import round_key, round_number, rounds
from pipelines.jobs import distill_round, mode_config
from training.rounds.modes import ROUND_MODES

LOWER_IS_BETTER = {"reverse_kl_on_student_samples", "forward_kl_on_teacher_samples", "student_nll_on_teacher_samples"}
METRICS = sorted(LOWER_IS_BETTER | {"greedy_exact_match", "sampled_exact_match", "teacher_logprob_on_student_samples"})
HARNESS = "harness/"  # or a harness metric round_eval records, harness/<task>/<metric>,<filter> (training/evals/harness.py)
HARNESS_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "brier_score", "ter"}  # lm-eval's
POLICY_HELP = (
    "Policy from the environment: DISTILL_MAX_ROUNDS (default 5), DISTILL_MIN_IMPROVEMENT (default 0.0: "
    "stop when a round does worse than its parent), DISTILL_ROUND_METRIC (default 'auto': greedy exact match when "
    "the task verifies, else the reverse KL on the student's samples going down), DISTILL_ROUND_MODE ('stored', the "
    "default, 'online', 'preference' or 'self'), DISTILL_ROUNDS_CRON (schedule only)."
)


class RoundPolicy(dg.Config):
    """When the sensor (or the schedule) opens the next round. Read from the environment at every
    evaluation: DISTILL_MAX_ROUNDS, DISTILL_MIN_IMPROVEMENT, DISTILL_ROUNDS_CRON (the schedule's cron,
    read when the code location loads)."""

    max_rounds: int = Field(5, ge=1, description="no round beyond this many")
    min_improvement: float = Field(
        0.0, description="stop when the last round's gain over its parent on `metric` is below this (for a "
        "lower-is-better metric, the gain is the decrease)"
    )
    metric: str = Field("auto", description=f"the round_eval metric that must improve: 'auto', one of {METRICS}, or a harness "
                        "metric (harness/<task>/<metric>,<filter>, e.g. harness/gsm8k/exact_match,strict-match)")
    mode: Literal[tuple(ROUND_MODES)] = Field(
        "stored", description="'stored': rollouts sampled once, scored, then trained on; 'online': student_checkpoint "
        "samples and scores a fresh batch at every on-policy step (GKD's Algorithm 1); 'preference': the teacher judges the "
        "samples, pairs are built, the student trains with DPO; 'self': the parent scores its own samples, the student "
        "fine-tunes on those the verifier accepts (rejection sampling)"
    )
    cron: str = Field("0 */6 * * *", description="the round schedule's cron (the schedule is off by default)")

    @classmethod
    def from_environment(cls) -> "RoundPolicy":
        values = {"max_rounds": "DISTILL_MAX_ROUNDS", "min_improvement": "DISTILL_MIN_IMPROVEMENT", "metric": "DISTILL_ROUND_METRIC",
                  "mode": "DISTILL_ROUND_MODE", "cron": "DISTILL_ROUNDS_CRON"}
        try:
            return cls(**{field: os.environ[name] for field, name in values.items() if os.environ.get(name)})
        except ValueError as error:
            raise ValueError(f"bad round policy in the environment ({', '.join(values.values())}): {error}") from None

    @model_validator(mode="after")
    def _known_metric(self):
        harness = self.metric.startswith(HARNESS) and self.metric.count("/") == 2 and "," in self.metric
        if self.metric != "auto" and self.metric not in METRICS and not harness:
            raise ValueError(f"unknown round metric {self.metric!r}: use 'auto', one of {METRICS}, or a harness metric as "
                             "round_eval records it, harness/<task>/<metric>,<filter> (e.g. harness/gsm8k/exact_match,strict-match)")
        return self

    def gain(self, evaluation: dict) -> tuple[str, float | None]:
        """(metric, the round's gain over its parent on it) from round_eval's metadata; 'auto' is greedy
        exact match when the task verifies, else the reverse KL on the student's own samples."""
        metric = self.metric
        if metric == "auto":
            verified = evaluation.get("greedy_exact_match") is not None
            metric = "greedy_exact_match" if verified else "reverse_kl_on_student_samples"
        mine, parent = evaluation.get(metric), evaluation.get(f"parent_{metric}")
        if mine is None or parent is None:
            return metric, None
        harness_metric = metric.rsplit("/", 1)[-1].split(",")[0] if metric.startswith(HARNESS) else None
        lower = metric in LOWER_IS_BETTER or harness_metric in HARNESS_LOWER_IS_BETTER
        return metric, (parent - mine) if lower else (mine - parent)


def next_round(instance: dg.DagsterInstance, policy: RoundPolicy) -> tuple[str | None, str]:
    """(the round to open, why) or (None, why not)."""
    keys = sorted(instance.get_dynamic_partitions(rounds.name), key=round_number)
    if not keys:
        if instance.get_latest_materialization_event(dg.AssetKey("offline_student")) is None:
            return None, "offline_student has not been materialized: run distill_offline first"
        return round_key(1), "opening the first round from offline_student"
    last = keys[-1]
    if len(keys) >= policy.max_rounds:
        return None, f"{len(keys)} rounds opened, max_rounds={policy.max_rounds} reached"
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("round_eval"), asset_partitions=[last]), limit=1
    ).records
    if not records:
        return None, f"round {last} has not finished (no round_eval yet): waiting; if its run failed, re-run it"
    evaluation = {name: value.value for name, value in records[0].asset_materialization.metadata.items()}
    metric, gain = policy.gain(evaluation)
    if gain is None:
        why = "did round_eval run that harness task?" if metric.startswith(HARNESS) else "no reference answers?"
        return None, (f"round {last}'s round_eval has no {metric} and parent_{metric} ({why}): "
                      "set DISTILL_ROUND_METRIC to another metric")
    if gain < policy.min_improvement:
        return None, f"plateau: round {last} improved {metric} by {gain:+.4f} < min_improvement={policy.min_improvement}"
    return round_key(round_number(last) + 1), f"round {last} improved {metric} by {gain:+.4f}"


def round_request(key: str, policy: RoundPolicy) -> dg.RunRequest:
    """The run of round `key`: the assets of the policy's round mode (training/rounds/modes.py) with
    the config that mode sets on student_checkpoint (`online: true`, or its ranking objective)."""
    if policy.mode == "stored":
        return dg.RunRequest(run_key=key, partition_key=key)
    return dg.RunRequest(run_key=key, partition_key=key, asset_selection=[dg.AssetKey(name) for name in ROUND_MODES[policy.mode].assets],
                         run_config=mode_config(policy.mode))


@dg.sensor(
    job=distill_round, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
    description="Opens the next on-policy round (adds the partition and requests its run). " + POLICY_HELP,
)
def round_sensor(context: dg.SensorEvaluationContext):
    policy = RoundPolicy.from_environment()
    key, reason = next_round(context.instance, policy)
    if key is None:
        return dg.SensorResult(skip_reason=reason)
    context.log.info(reason)
    return dg.SensorResult(
        run_requests=[round_request(key, policy)],
        dynamic_partitions_requests=[rounds.build_add_request([key])],
    )


@dg.schedule(
    job=distill_round, cron_schedule=RoundPolicy.from_environment().cron, default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Periodically opens the next on-policy round, under the same policy as round_sensor. " + POLICY_HELP,
)
def round_schedule(context: dg.ScheduleEvaluationContext):
    policy = RoundPolicy.from_environment()
    key, reason = next_round(context.instance, policy)
    if key is None:
        return dg.SkipReason(reason)
    context.instance.add_dynamic_partitions(rounds.name, [key])  # schedules cannot return partition requests
    return round_request(key, policy)

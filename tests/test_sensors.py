"""The round sensor and schedule on a real instance: real materialization events, no runs needed."""

import dagster as dg
import pytest

from assets.partitions import rounds
from pipelines.definitions import defs
from pipelines.sensors import round_schedule, round_sensor


def finish_round(instance, key: str, improvement: float, **metrics) -> None:
    """Records round `key` as finished: a round_eval materialization with its metrics and its
    parent's (greedy exact match `improvement` above the parent's, unless `metrics` are given)."""
    instance.add_dynamic_partitions(rounds.name, [key])
    metrics = metrics or {"greedy_exact_match": 0.5 + improvement, "parent_greedy_exact_match": 0.5}
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="round_eval", partition=key, metadata=metrics))


def evaluate(instance):
    return round_sensor(dg.build_sensor_context(instance=instance, definitions=defs))


def test_waits_for_the_offline_student_then_opens_round_one(instance):
    assert "offline_student has not been materialized" in evaluate(instance).skip_reason.skip_message
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="offline_student"))
    result = evaluate(instance)
    assert [r.partition_key for r in result.run_requests] == ["r001"]
    assert result.dynamic_partitions_requests == [rounds.build_add_request(["r001"])]


def test_opens_the_next_round_when_the_last_one_finished(instance):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="offline_student"))
    finish_round(instance, "r001", 0.05)
    instance.add_dynamic_partitions(rounds.name, ["r002"])  # opened, not finished
    assert "round r002 has not finished" in evaluate(instance).skip_reason.skip_message
    finish_round(instance, "r002", 0.02)
    result = evaluate(instance)
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [("r003", "r003")]
    assert round_sensor.job_name == "distill_round"
    assert result.dynamic_partitions_requests[0].partition_keys == ["r003"]


def test_online_mode_requests_the_online_round(instance, monkeypatch):
    monkeypatch.setenv("DISTILL_ROUND_MODE", "online")
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="offline_student"))
    request = evaluate(instance).run_requests[0]
    assert request.asset_selection == [dg.AssetKey(k) for k in ("student_checkpoint", "online_feedback", "round_eval")]
    job = defs.resolve_job_def("distill_round")
    assert dg.validate_run_config(job, request.run_config)["ops"]["student_checkpoint"]["config"]["online"] is True
    monkeypatch.setenv("DISTILL_ROUND_MODE", "sometimes")
    with pytest.raises(ValueError, match="DISTILL_ROUND_MODE"):
        evaluate(instance)


def test_preference_mode_requests_the_preference_round(instance, monkeypatch):
    monkeypatch.setenv("DISTILL_ROUND_MODE", "preference")
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="offline_student"))
    request = evaluate(instance).run_requests[0]
    names = ("student_rollouts", "teacher_feedback", "round_judgments", "round_pairs", "student_checkpoint", "round_eval")
    assert request.asset_selection == [dg.AssetKey(k) for k in names]
    job = defs.resolve_job_def("distill_round")
    subset = job.get_subset(asset_selection=set(request.asset_selection))  # what the run executes
    assert {node.name for node in subset.graph.nodes} == set(names)
    config = dg.validate_run_config(subset, request.run_config)["ops"]["student_checkpoint"]["config"]
    assert config["objective"] == "dpo" and config["mix"] == 0.0


def test_stops_at_max_rounds(instance, monkeypatch):
    monkeypatch.setenv("DISTILL_MAX_ROUNDS", "2")
    for key in ["r001", "r002"]:
        finish_round(instance, key, 0.1)
    assert "max_rounds=2 reached" in evaluate(instance).skip_reason.skip_message
    monkeypatch.setenv("DISTILL_MAX_ROUNDS", "3")
    assert [r.partition_key for r in evaluate(instance).run_requests] == ["r003"]


def test_stops_on_a_plateau(instance, monkeypatch):
    monkeypatch.setenv("DISTILL_MIN_IMPROVEMENT", "0.01")
    finish_round(instance, "r001", 0.004)
    assert "plateau: round r001 improved greedy_exact_match by +0.0040 < min_improvement=0.01" in (
        evaluate(instance).skip_reason.skip_message
    )


def test_without_reference_answers_the_reverse_kl_must_go_down(instance, monkeypatch):
    finish_round(instance, "r001", 0, reverse_kl_on_student_samples=0.30, parent_reverse_kl_on_student_samples=0.40)
    assert [r.partition_key for r in evaluate(instance).run_requests] == ["r002"]
    finish_round(instance, "r002", 0, reverse_kl_on_student_samples=0.45, parent_reverse_kl_on_student_samples=0.30)
    assert "plateau: round r002 improved reverse_kl_on_student_samples by -0.1500" in evaluate(instance).skip_reason.skip_message
    monkeypatch.setenv("DISTILL_ROUND_METRIC", "greedy_exact_match")
    assert "round r002's round_eval has no greedy_exact_match" in evaluate(instance).skip_reason.skip_message
    monkeypatch.setenv("DISTILL_ROUND_METRIC", "accuracy")
    with pytest.raises(Exception, match="unknown round metric 'accuracy'"):
        evaluate(instance)


def test_a_harness_metric_can_be_the_criterion(instance, monkeypatch):
    gsm8k, perplexity = "harness/gsm8k/exact_match,strict-match", "harness/wikitext/word_perplexity,none"
    finish_round(instance, "r001", 0, **{gsm8k: 0.31, f"parent_{gsm8k}": 0.30, perplexity: 20.0, f"parent_{perplexity}": 19.0})
    monkeypatch.setenv("DISTILL_ROUND_METRIC", gsm8k)
    assert [r.partition_key for r in evaluate(instance).run_requests] == ["r002"]
    monkeypatch.setenv("DISTILL_ROUND_METRIC", perplexity)  # lower is better: it went up
    assert f"plateau: round r001 improved {perplexity} by -1.0000" in evaluate(instance).skip_reason.skip_message
    monkeypatch.setenv("DISTILL_ROUND_METRIC", "harness/arc_easy/acc,none")  # named right, but not run by round_eval
    assert "did round_eval run that harness task?" in evaluate(instance).skip_reason.skip_message
    monkeypatch.setenv("DISTILL_ROUND_METRIC", "harness/gsm8k/exact_match")  # as round_eval never names it: no filter
    with pytest.raises(Exception, match="harness/<task>/<metric>,<filter>"):
        evaluate(instance)


def test_bad_policy_in_the_environment_is_named(instance, monkeypatch):
    monkeypatch.setenv("DISTILL_MAX_ROUNDS", "many")
    with pytest.raises(Exception, match="DISTILL_MAX_ROUNDS"):
        evaluate(instance)


def test_schedule_adds_the_partition_and_requests_the_round(instance):
    assert round_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert round_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    finish_round(instance, "r001", 0.1)
    request = round_schedule(dg.build_schedule_context(instance=instance))
    assert request.partition_key == "r002"
    assert instance.get_dynamic_partitions(rounds.name) == ["r001", "r002"]

"""The `accelerator` pool: every asset that loads a model is in it, and the instance that `make demo`
and `make ui` prepare (pipelines/instance.py) runs one of its steps at a time. The dynamic check runs
two independent pool steps under the multiprocess executor, which would run them side by side, and
reads the intervals the steps record; the same job on an instance without the limit is the control."""

import json
import time
from pathlib import Path

import dagster as dg

from pipelines.instance import INSTANCE_YAML, prepare_dagster_home

MODEL_ASSETS = {
    "teacher_model", "student_model", "teacher_labeled", "expanded", "synthesized", "offline_student", "evals",
    "student_rollouts", "teacher_feedback", "student_checkpoint", "online_feedback", "round_eval",
    "student_samples", "teacher_judgments", "preference_pairs", "preference_student", "round_judgments", "round_pairs",
}
HOLD_SECONDS = 2.0


@dg.op(pool="accelerator", config_schema={"log": str})
def hold_accelerator(context: dg.OpExecutionContext) -> None:
    began = time.time()
    time.sleep(HOLD_SECONDS)
    with open(context.op_config["log"], "a") as log:
        log.write(json.dumps([began, time.time()]) + "\n")


def two_accelerator_steps() -> dg.JobDefinition:
    """Two independent steps in pool `accelerator`, which the multiprocess executor would run side by side."""

    @dg.job(executor_def=dg.multiprocess_executor)
    def two_accelerator_steps():
        hold_accelerator.alias("first")()
        hold_accelerator.alias("second")()

    return two_accelerator_steps


def test_every_model_asset_is_in_the_accelerator_pool():
    from pipelines.definitions import defs  # here, not at the top: the executor's step processes import this module

    pools = {
        key.to_user_string(): assets.op.pool
        for assets in defs.resolve_asset_graph().assets_defs if assets.is_executable for key in assets.keys
    }
    assert {name for name, pool in pools.items() if pool == "accelerator"} == MODEL_ASSETS


def run_intervals(home: Path, log: Path, monkeypatch) -> list[list[float]]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        config = {"ops": {name: {"config": {"log": str(log)}} for name in ("first", "second")}}
        # the executor's step processes import this module by name from the tests directory
        job = dg.build_reconstructable_job(__name__, "two_accelerator_steps", reconstructor_working_directory=str(Path(__file__).parent))
        result = dg.execute_job(job, instance, run_config=config)
        assert result.success
    return sorted(json.loads(line) for line in log.read_text().splitlines())


def test_the_prepared_instance_runs_one_accelerator_step_at_a_time(tmp_path, monkeypatch):
    limited = prepare_dagster_home(tmp_path / "limited")
    assert (limited / "dagster.yaml").read_text() == INSTANCE_YAML
    (first, second) = run_intervals(limited, tmp_path / "limited.jsonl", monkeypatch)
    assert second[0] >= first[1], f"accelerator steps overlapped: {first} and {second}"

    unlimited = tmp_path / "unlimited"  # the control: without the limit the two steps run side by side
    unlimited.mkdir()
    (unlimited / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (first, second) = run_intervals(unlimited, tmp_path / "unlimited.jsonl", monkeypatch)
    assert second[0] < first[1], f"the control did not overlap ({first}, {second}): the check above proves nothing"


def test_an_existing_dagster_yaml_is_kept(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    prepare_dagster_home(tmp_path)
    assert (tmp_path / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"

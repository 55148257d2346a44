"""A run killed with kill -9 inside a pool step never wedges the instance: it is found dead, marked
failed and its `accelerator` slot freed, by the next run of a script (the `store` resource) or by
the daemon's sensor, and the next run of a pool step completes."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg

from assets.runs import release_dead_runs
from pipelines.dead_runs import dead_run_sensor
from pipelines.instance import prepare_dagster_home

HOLD = """
import os, time
import dagster as dg
from assets.resources import store_resource
from storage.store import Store

@dg.asset(pool="accelerator")
def held(store: dg.ResourceParam[Store]):
    time.sleep(float(os.environ["HOLD_SECONDS"]))

with dg.DagsterInstance.get() as instance:
    print(dg.materialize([held], instance=instance, resources={"store": store_resource}).success)
"""


@dg.asset(pool="accelerator")
def quick():
    return 1


def slot_holders(instance) -> set[str]:
    """The runs that hold a claimed slot of the pool (a run whose step is only pending holds none yet)."""
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("accelerator").claimed_slots}


def killed_holder(instance, env: dict) -> str:
    """Runs the HOLD script until its step holds the pool's one slot, kills it with kill -9, and returns its run id."""
    worker = subprocess.Popen([sys.executable, "-c", HOLD], env={**env, "HOLD_SECONDS": "600"})
    deadline = time.monotonic() + 120
    while not slot_holders(instance):  # wait until the step runs, holding the slot
        assert worker.poll() is None and time.monotonic() < deadline, "the held step never started"
        time.sleep(0.2)
    (killed,) = slot_holders(instance)
    assert release_dead_runs(instance) == []  # alive: left alone
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.STARTED  # what a kill leaves behind:
    pool = instance.event_log_storage.get_concurrency_info("accelerator")  # the pool's one slot, held by the dead run
    assert pool.slot_count == 1 and pool.active_run_ids == {killed}
    return killed


def test_the_same_script_runs_again_after_a_kill(tmp_path, monkeypatch):
    home = prepare_dagster_home(tmp_path / "dagster")  # the pool limit of `make demo` / `make ui`: 1
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {**os.environ, "DAGSTER_HOME": str(home), "DISTILL_HOME": str(tmp_path / "distill")}
    with dg.DagsterInstance.get() as instance:
        killed = killed_holder(instance, env)
        # a regression waits on the dead run's slot forever: the timeout kills it and fails the test
        again = subprocess.run([sys.executable, "-c", HOLD], env={**env, "HOLD_SECONDS": "0"}, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and again.stdout.split()[-1] == "True", again.stderr[-3000:]
        assert f"run {killed} was killed" in again.stderr and "blocked by limit" not in again.stderr
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert slot_holders(instance) == set()


def test_the_sensor_releases_a_killed_run(tmp_path, monkeypatch):
    home = prepare_dagster_home(tmp_path / "dagster")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        killed = killed_holder(instance, {**os.environ, "DAGSTER_HOME": str(home), "DISTILL_HOME": str(tmp_path / "distill")})
        result = dead_run_sensor(dg.build_sensor_context(instance=instance))
        assert killed in result.skip_message
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert slot_holders(instance) == set()
        assert dg.materialize([quick], instance=instance).success  # would wait on the dead run's slot forever

"""A run killed with kill -9 inside a pool step never wedges the instance: it is found dead, marked
failed and its `accelerator` slot freed, and the next run of a pool step completes."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg

from pipelines.dead_runs import dead_run_sensor, release_dead_runs
from pipelines.instance import prepare_dagster_home

HOLD = """
import time
import dagster as dg

@dg.asset(pool="accelerator")
def held():
    time.sleep(600)

with dg.DagsterInstance.get() as instance:
    dg.materialize([held], instance=instance)
"""


@dg.asset(pool="accelerator")
def quick():
    return 1


def slot_holders(instance) -> set[str]:
    return set(instance.event_log_storage.get_concurrency_run_ids())


def test_a_killed_run_is_released_and_the_next_run_proceeds(tmp_path, monkeypatch):
    home = prepare_dagster_home(tmp_path / "dagster")  # the pool limit of `make demo` / `make ui`: 1
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    worker = subprocess.Popen([sys.executable, "-c", HOLD], env={**os.environ, "DAGSTER_HOME": str(home)})
    with dg.DagsterInstance.get() as instance:
        deadline = time.monotonic() + 60
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

        result = dead_run_sensor(dg.build_sensor_context(instance=instance))
        assert killed in result.skip_message
        assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
        assert slot_holders(instance) == set()
        assert dg.materialize([quick], instance=instance).success  # would wait on the dead run's slot forever

"""Runs whose process is gone (kill -9, out of memory): marked failed, their pool slots freed.

A run killed without cleanup stays STARTED in the instance and keeps its `accelerator` slot, so every
later model step would wait on it forever. Every run records the pids of the processes that execute
it (Dagster's engine events: the run worker, the in-process or multiprocess executor). A run in
progress none of whose recorded processes is alive on this machine is dead: `release_dead_runs`
reports it failed and frees its slots, as well as slots still held by finished runs.

It runs before new work in the demo, and every 30 seconds in `dead_run_sensor` under the daemon
(`make ui`). It judges runs of this machine (the default run launcher, in-process runs); runs on other
machines (Kubernetes, …) are left to their launcher's own health checks.
"""

import os

import dagster as dg

IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def run_pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    """The pids a run's engine events recorded (its run worker and executors)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    pids = set()
    for record in records:
        data = record.event_log_entry.dagster_event.engine_event_data
        if data is not None and "pid" in data.metadata:
            pids.add(int(data.metadata["pid"].value))
    return pids


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Marks failed every run in progress whose recorded processes are all gone, and frees the pool
    slots of those runs and of finished ones; returns the ids of the runs marked failed."""
    dead = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        pids = run_pids(instance, run.run_id)
        if pids and not any(_alive(pid) for pid in pids):
            instance.report_run_failed(run, f"its processes {sorted(pids)} are gone (killed: kill -9, out of memory); "
                                            "marked failed and its pool slots freed so that other runs proceed")
            dead.append(run.run_id)
    storage = instance.event_log_storage
    holders = storage.get_concurrency_run_ids() if storage.supports_global_concurrency_limits else set()
    for record in instance.get_run_records(dg.RunsFilter(run_ids=list(holders))) if holders else []:
        if record.dagster_run.is_finished:
            storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return dead


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks failed the runs whose process was killed (kill -9, out of memory) and frees their "
                       "pool slots, so that the accelerator pool never stays held by a dead run.")
def dead_run_sensor(context: dg.SensorEvaluationContext):
    dead = release_dead_runs(context.instance)
    return dg.SkipReason(f"released dead runs {dead}" if dead else "no dead runs")

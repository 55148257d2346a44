"""Which runs are in progress, and what keeps runs apart: the pool `accelerator` (one model step at a
time), `claim_round` in assets/rounds.py (one run per round), and the release of dead runs that both
rely on.

A run is in progress while a process may be working on it: its status is STARTING, STARTED or CANCELING
(`IN_PROGRESS`). Queued and not-started runs have no process yet: they check when they start. A step
of round r fails at once, naming the other run, while another run of r is in progress, so two
launches of a round never mix their data (runs recorded in one Dagster instance).

A run killed without cleanup (kill -9, out of memory) stays STARTED, so it would keep its round and
its `accelerator` slot forever: a later run waits on the slot, spinning a core and ignoring SIGTERM.
Every run records the pids of its processes (Dagster's engine events: the run worker, the in-process
or multiprocess executor, each step process). A run in progress none of whose recorded processes is
alive on this machine is dead: `release_dead_runs` reports it failed (no longer in progress) and frees
its slots, as well as slots still held by finished runs. Every run passes a release before it waits
on the pool or claims its round:
- runs in process (a script's `dg.materialize` or `execute_in_process`, the demo, `distill_round`
  however launched): the `store` resource releases when it is initialised, which the in-process
  executor does for the whole run before its first step claims a slot (every pool asset uses `store`);
- runs of the code location on the multiprocess executor (materializations from the UI, with or
  without the daemon, `dagster asset materialize`, `distill_offline` from the UI): the code location's
  executor, `releasing(...)`, releases when it is created in the run's orchestrating process, which
  claims the slots of its steps there and initialises resources only later, in each step's process;
- a run already waiting when the holder is killed: `dead_run_sensor` under the daemon (every 30 s),
  or the next run that starts.
Dagster's run monitoring cannot do this: it asks the run launcher whether a run's worker is alive,
and the default launcher cannot tell. Only runs of this machine are judged (the default run launcher
and in-process runs); with another launcher (Kubernetes, …) runs are left to its own health checks.
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
    """The pids a run's engine events recorded (its run worker, executors and step processes)."""
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
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return []
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


def releasing(executor: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """`executor`, releasing dead runs when a run creates it (in its orchestrating process, before any
    step claims a pool slot)."""

    def create(context: dg.InitExecutorContext):
        release_dead_runs(context.instance)
        return executor.executor_creation_fn(context)

    return dg.ExecutorDefinition(executor.name, executor.config_schema, executor.get_requirements, create, executor.description)

"""Which runs are in progress, and the release of dead ones: what keeps runs apart relies on both.
The pool `accelerator` lets one model step run at a time across runs; `claim_round` (assets/rounds.py)
lets one run work on a round: a step of round r fails at once, naming the other run, while another
run of r is in progress, so two launches of a round never mix their data (runs of one instance).

A run is in progress while a process may be working on it: its status is STARTING, STARTED or
CANCELING (`IN_PROGRESS`); a queued or not yet started run has no process, and checks when it starts.

A run killed without cleanup (kill -9, out of memory) stays STARTED: it would hold its round and its
`accelerator` slot forever, and a later run would wait on the slot, spinning a core and ignoring
SIGTERM. Every run records the pids of its processes (Dagster's engine events: the run worker, the
in-process or multiprocess executor, each step process); a run in progress none of whose recorded
processes is alive on this machine is dead. `release_dead_runs` reports it failed, so it is no longer
in progress, and frees its slots and those still held by finished runs. `claim_round` releases
before it looks for other runs of its round; before a run waits on the pool, what releases depends on
where the run claims its slots (tested: tests/test_dead_runs.py, and by hand for the UI and the CLI):
- runs in process (a script's `dg.materialize` or `execute_in_process`, the demo, `distill_round`
  however launched): the `store` resource, which every pool asset uses and the in-process executor
  initialises for the whole run before its first step claims a slot;
- runs of the code location on the multiprocess executor (`dagster asset materialize`, `distill_offline`
  or a materialization launched from the UI): the code location's executor, `releasing(...)`, created in
  the run's orchestrating process, which claims its steps' slots there and initialises resources only
  later, in each step's own process;
- under the daemon (`make ui`), the run queue holds a run back while its pool is full, so no process of
  it starts: `dead_run_sensor` releases every 30 s, and so frees a run already waiting when the holder
  is killed too. Without the daemon's queue (the UI with `DefaultRunCoordinator`), runs start at once.
Dagster's run monitoring leaves a killed run STARTED: it asks the run launcher whether the run's worker
is alive, and the default launcher cannot tell. Only runs of this machine are judged (the default run
launcher and in-process runs); with another launcher (Kubernetes, …) runs are left to its own health
checks.
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

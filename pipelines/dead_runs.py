"""`dead_run_sensor`: under the daemon (`make ui`), every 30 seconds, releases the runs whose process
was killed (assets/runs.py says what that means, and which release covers which launch), so that
even a run already waiting on the pool when its holder is killed proceeds without a new run."""

import dagster as dg

from assets.runs import release_dead_runs


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks failed the runs whose process was killed (kill -9, out of memory) and frees their "
                       "pool slots, so that the accelerator pool never stays held by a dead run.")
def dead_run_sensor(context: dg.SensorEvaluationContext):
    dead = release_dead_runs(context.instance)
    return dg.SkipReason(f"released dead runs {dead}" if dead else "no dead runs")

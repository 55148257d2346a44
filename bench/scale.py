"""Scale of the model work (issue 13), on the embedded teacher architecture (trained for only a few
steps: its answers run to max_new_tokens, the most work per prompt):

1. peak RSS of the process labeling N prompts (`teacher_labeled` alone, in a fresh process), for two
   N ten times apart: flat memory means the two are within ~1.2× of each other;
2. completion tokens/s of `executor: local` against `executor: ray` with two engine replicas;
3. the work redone after a kill -9 at ~50%: shards finished before the kill that the re-run redid
   (target 0: at most the shard in flight per worker is lost).

    .venv/bin/python bench/scale.py [--prompts 20000 200000] [--shard-size 1024] [--max-new-tokens 8]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = """
import json, resource, sys
import dagster as dg
from pipelines.definitions import defs
settings = json.loads(sys.argv[1])
selection = settings.pop("selection")
ops = {"seed_prompts": {"config": {"num_prompts": settings["prompts"]}},
       "teacher_model": {"config": {"train_steps": 2}},
       "teacher_labeled": {"config": {"sampling": {"max_new_tokens": settings["max_new_tokens"]}, "k": 8}}}
resources = {"shard_executor": {"config": {"executor": settings["executor"], "shard_size": settings["shard_size"], "replicas": 2}}}
job = defs.resolve_job_def("distill_offline")
with dg.DagsterInstance.ephemeral() as instance:
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(a) for a in selection],
                                    run_config={"ops": {k: v for k, v in ops.items() if k in selection}, "resources": resources})
assert result.success
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(home: Path, **settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], env={**os.environ, "DISTILL_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the labeling process failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def labeling_figures(home: Path) -> dict:
    with duckdb.connect() as connection:
        rows = connection.sql(f"SELECT metrics FROM read_parquet('{home}/data/lineage/*.parquet') "
                              "WHERE asset = 'teacher_labeled' ORDER BY created_at DESC LIMIT 1").fetchall()
    return json.loads(rows[0][0])


def prepared(home: Path, prompts: int, args) -> Path:
    """seed_prompts and a barely trained teacher, in a process of their own."""
    finish(child(home, selection=["seed_prompts", "teacher_model"], prompts=prompts, max_new_tokens=args.max_new_tokens,
                 executor="local", shard_size=args.shard_size))
    return home


def label(home: Path, args, executor: str = "local", prompts: int = 0) -> subprocess.Popen:
    return child(home, selection=["teacher_labeled"], prompts=prompts, max_new_tokens=args.max_new_tokens, executor=executor,
                 shard_size=args.shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs=2, default=[20_000, 200_000])
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--throughput-prompts", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        print(f"shard_size {args.shard_size}, max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPUs")
        rss = {}
        for prompts in args.prompts:
            home = prepared(root / f"rss-{prompts}", prompts, args)
            started = time.perf_counter()
            rss[prompts] = finish(label(home, args))["peak_rss_mib"]
            figures = labeling_figures(home)
            print(f"labeling {prompts:>7,} prompts: peak RSS {rss[prompts]:,.0f} MiB, {figures['shards']} shards, "
                  f"{time.perf_counter() - started:,.0f} s, {figures['completion_tokens_per_s']:,.0f} completion tokens/s")
        small, large = args.prompts
        print(f"peak RSS {large:,} / {small:,} prompts: {rss[large] / rss[small]:.2f}× (target ≤ 1.2×)")

        home = prepared(root / "throughput", args.throughput_prompts, args)
        for executor in ("local", "ray"):
            finish(label(home, args, executor))
            figures = labeling_figures(home)
            print(f"executor {executor:<5} ({'2 replicas' if executor == 'ray' else 'in process'}): "
                  f"{figures['completion_tokens_per_s']:,.0f} completion tokens/s over {figures['shards']} shards "
                  f"({figures['wall_seconds']:.1f} s)")

        home = prepared(root / "kill", args.throughput_prompts, args)
        total = -(-args.throughput_prompts // args.shard_size)
        work = home / "work" / "teacher_labeled" / "all"
        process = label(home, args)
        while len(list(work.glob("*/part-*.json"))) < total // 2:
            if process.poll() is not None:
                raise RuntimeError("the labeling ended before half its shards were done")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        done = len(list(work.glob("*/part-*.json")))
        finish(label(home, args))
        figures = labeling_figures(home)
        print(f"kill -9 after {done}/{total} shards: the re-run kept {figures['shards_resumed']}, redid "
              f"{total - figures['shards_resumed']} = the {total - done} left + {done - figures['shards_resumed']} finished ones "
              "(target 0: only the shard in flight is lost)")


if __name__ == "__main__":
    main()

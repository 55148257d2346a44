"""Curation at scale: the whole filter chain (near duplicates by MinHash LSH, selection to half)
over synthetic candidates at two sizes ten times apart, each in a fresh process that reads the
Parquet shards and writes the kept rows shard by shard, as the `curated` asset does; prints seconds,
rows/s and peak RSS (flat memory: the two within ~1.2×), then the demo's funnel if `make demo` has
built `curated` under DISTILL_HOME.

    .venv/bin/python bench/curation.py [--rows 100000 1000000] [--memory-limit 1GB]

The synthetic rows are sentences drawn from a small vocabulary, a tenth of them copies of another
row with two characters edited (near duplicates by construction) and a hundredth exact copies, in
shards of 100,000 rows with a 4-token response and its top-2 signal.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.catalog import query
from storage.store import Store

WORDS = ("teacher student token logprob divergence round rollout sample prompt answer model data tail mass "
         "carry digit problem solve write expand evolve topic skill filter select score quality").split()
SHARD_ROWS = 100_000
TOKENS = 4

CHILD = """
import json, resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from training.data.curation import CurationSettings, candidate_pool, connect, curate
directory, memory_limit = Path(sys.argv[1]), sys.argv[2]
sources = {"teacher_labeled": sorted(directory.glob("part-*.parquet"))}
started = time.perf_counter()
with connect(directory / "curation.duckdb", memory_limit) as connection:
    candidate_pool(connection, sources)
    rows = connection.execute("SELECT count(*) FROM candidates").fetchall()[0][0]
    curation = curate(connection, ["teacher student token logprob divergence round rollout sample"],
                      CurationSettings(target_size=rows // 2))
    funnel, kept = curation.funnel, 0
    for index, table in enumerate(curation.kept(sources)):
        pq.write_table(table, directory / f"kept-{index:05d}.parquet")
        kept += table.num_rows
print(json.dumps({"seconds": time.perf_counter() - started, "kept": kept, "funnel": funnel,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def jaccard(a: str, b: str, size: int = 5) -> float:
    x, y = ({t[i : i + size] for i in range(max(1, len(t) - size + 1))} for t in (a, b))
    return len(x & y) / len(x | y)


def write_candidates(directory: Path, n: int, seed: int = 0) -> tuple[int, int]:
    """Writes n synthetic candidates as Parquet shards; returns (planted near duplicates, how many of
    them are within Jaccard 0.8 of the row they copy)."""
    rng = random.Random(seed)
    prompts, planted, similar = [], 0, 0
    for i in range(n):
        if i and rng.random() < 0.10:  # a near duplicate of an earlier row: two characters edited
            source = prompts[rng.randrange(i)]
            text = list(source)
            for _ in range(2):
                text[rng.randrange(len(text))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
            prompts.append("".join(text))
            planted += 1
            similar += jaccard(source.lower(), prompts[-1].lower()) >= 0.8
        elif i and rng.random() < 0.01:
            prompts.append(prompts[rng.randrange(i)])
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + f" #{i}")
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        size = min(SHARD_ROWS, n - start)
        pq.write_table(pa.table({
            "sample_id": [f"{i:09d}" for i in range(start, start + size)],
            "prompt": prompts[start : start + size],
            "completion": ["ok"] * size,
            "num_tokens": pa.array([TOKENS] * size, pa.int32()),
            "finish_reason": ["stop"] * size,
            "correct": pa.nulls(size, pa.bool_()),
            "answer": pa.nulls(size, pa.string()),
            "k": pa.array([2] * size, pa.int32()),
            "teacher_weights_hash": ["synthetic"] * size,
            "token_logprob": pa.array([[-0.1] * TOKENS] * size, pa.list_(pa.float32())),
            "topk_ids": pa.array([[[1, 2]] * TOKENS] * size, pa.list_(pa.list_(pa.int32()))),
            "topk_logprobs": pa.array([[[-0.1, -3.0]] * TOKENS] * size, pa.list_(pa.list_(pa.float32()))),
        }), directory / f"part-{shard:05d}.parquet")
    return planted, similar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit (the `curated` asset's `memory_limit`)")
    args = parser.parse_args()
    print(f"DuckDB memory_limit {args.memory_limit}; near duplicates: 128 permutations, 5-char shingles, Jaccard ≥ 0.8")
    rss = {}
    for n in args.rows:
        with tempfile.TemporaryDirectory() as directory:
            planted, similar = write_candidates(Path(directory), n)
            done = subprocess.run([sys.executable, "-c", CHILD, directory, args.memory_limit], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            if done.returncode:
                raise RuntimeError(done.stderr[-2000:])
            figures = json.loads(done.stdout.strip().splitlines()[-1])
        near = next(f for f in figures["funnel"] if f["filter"] == "near_duplicate")
        rss[n] = figures["peak_rss_mib"]
        print(f"{n:>10,} candidates: {figures['seconds']:,.1f} s ({n / figures['seconds']:,.0f} rows/s), peak RSS {rss[n]:,.0f} MiB, "
              f"near duplicates dropped {near['rows_in'] - near['rows_out']:,} "
              f"(planted {planted:,}, {similar:,} of them with Jaccard ≥ 0.8), "
              f"kept {figures['kept']:,}")
        for step in figures["funnel"]:
            print(f"      {step['filter']:<16} {step['rows_in']:>10,} → {step['rows_out']:>10,}")
    small, large = args.rows
    print(f"peak RSS {large:,} / {small:,} candidates: {rss[large] / rss[small]:.2f}×")
    store = Store()
    if store.has_dataset("curation_report"):
        print(f"\nDemo funnel ({store.root}):")
        columns, table = query(store, "SELECT filter, rows_in, dropped, rows_out FROM curation_report")
        for row in table:
            print("  " + "  ".join(f"{v!s:>16}" for v in row))
        print("kept by origin:", dict(query(store, "SELECT origin, count(*) FROM curated GROUP BY 1 ORDER BY 2 DESC")[1]))
    else:
        print("\nno demo funnel: run `make demo` first")


if __name__ == "__main__":
    main()

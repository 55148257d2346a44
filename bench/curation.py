"""Curation throughput: MinHash near-duplicate filtering and the whole filter chain on 100,000
synthetic rows (target: near duplicates under 60 s on 2 cores), then the funnel of the demo
configuration if `make demo` has built `curated` under DISTILL_HOME.

    .venv/bin/python bench/curation.py [rows]

The synthetic rows are sentences drawn from a small vocabulary, a tenth of them copies of another
row with a few characters edited (near duplicates by construction) and a hundredth exact copies.
"""

import random
import sys
import time

import pyarrow as pa
import torch

from storage.catalog import query
from storage.store import Store
from training.curation import CurationSettings, curate, near_duplicates, scored

WORDS = ("teacher student token logprob divergence round rollout sample prompt answer model data tail mass "
         "carry digit problem solve write expand evolve topic skill filter select score quality").split()


def synthetic_rows(n: int, seed: int = 0) -> tuple[int, pa.Table]:
    """(how many rows are planted near duplicates, the rows)."""
    rng = random.Random(seed)
    prompts, planted = [], 0
    for i in range(n):
        if i and rng.random() < 0.10:  # a near duplicate of an earlier row: two characters edited
            text = list(prompts[rng.randrange(i)])
            for _ in range(2):
                text[rng.randrange(len(text))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
            prompts.append("".join(text))
            planted += 1
        elif i and rng.random() < 0.01:
            prompts.append(prompts[rng.randrange(i)])
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + f" #{i}")
    tokens = 4
    return planted, pa.table({
        "sample_id": [f"{i:08d}" for i in range(n)],
        "prompt": prompts,
        "completion": ["ok"] * n,
        "origin": ["labeled"] * n,
        "num_tokens": pa.array([tokens] * n, pa.int32()),
        "finish_reason": ["stop"] * n,
        "correct": pa.nulls(n, pa.bool_()),
        "answer": pa.nulls(n, pa.string()),
        "token_logprob": pa.array([[-0.1] * tokens] * n, pa.list_(pa.float32())),
        "topk_logprobs": pa.array([[[-0.1, -3.0]] * tokens] * n, pa.list_(pa.list_(pa.float32()))),
    })


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"torch threads {torch.get_num_threads()}; {n:,} synthetic rows")
    planted, table = synthetic_rows(n)
    rows = scored(table)
    started = time.perf_counter()
    dropped = near_duplicates(rows, threshold=0.8, size=5)
    seconds = time.perf_counter() - started
    print(f"near duplicates (MinHash LSH, 128 permutations, 5-char shingles, Jaccard ≥ 0.8): {seconds:.1f} s, "
          f"{n / seconds:,.0f} rows/s, {dropped.num_rows:,} dropped of {planted:,} planted with two characters edited")
    started = time.perf_counter()
    result = curate(table, eval_prompts=["teacher student token logprob divergence round rollout sample"],
                    settings=CurationSettings(target_size=n // 2))
    seconds = time.perf_counter() - started
    print(f"whole chain incl. selection to {n // 2:,}: {seconds:.1f} s")
    for step in result.funnel:
        print(f"  {step['filter']:<16} {step['rows_in']:>8,} → {step['rows_out']:>8,}")
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

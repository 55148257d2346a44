"""Labeling throughput: teacher scoring (top-k signal) against a plain batched forward pass of the
same model, generation throughput, and stored bytes per token at k=20.

    .venv/bin/python bench/labeling.py [path to a model directory]

Without a path it uses the embedded teacher from DISTILL_HOME if there is one (`make demo`), else a
freshly initialised model of the teacher's architecture (speed does not depend on the weights).
"""

import sys
import tempfile
import time

import pyarrow as pa
import torch

from storage.store import Store
from training.data.labeling import label
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.models.batches import completion_positions
from training.models.checkpoints import TEACHER_ARCHITECTURE, build_embedded
from training.tasks.arithmetic import problems

PROMPTS = 512
K = 20


def load_engine(argv: list[str]) -> tuple[HFEngine, str]:
    if len(argv) > 1:
        return HFEngine.load(argv[1], batch_size=128), argv[1]
    try:
        card = Store().read_card("teacher")
        return HFEngine.load(card.path, batch_size=128), card.path
    except FileNotFoundError:
        model, tokenizer = build_embedded(TEACHER_ARCHITECTURE, seed=0)
        return HFEngine(model, tokenizer, batch_size=128), "untrained embedded teacher architecture"


def timed(function):
    started = time.perf_counter()
    out = function()
    return out, time.perf_counter() - started


def main() -> None:
    engine, name = load_engine(sys.argv)
    print(f"model: {name}; torch threads {torch.get_num_threads()}; {PROMPTS} prompts; k={K}")
    prompts = [p.prompt for p in problems("train", PROMPTS, seed=123)]
    prompt_ids = engine.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    generations, seconds = timed(lambda: engine.generate(prompt_ids, Sampling(temperature=1.0, max_new_tokens=64)))
    new_tokens = sum(len(g.completion_ids) for g in generations)
    print(f"generation: {new_tokens / seconds:,.0f} new tokens/s ({new_tokens} tokens, {seconds:.2f} s)")

    completions = [g.completion_ids for g in generations]
    tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    padded = [
        completion_positions(pa.array(prompt_ids[s : s + 128]), pa.array(completions[s : s + 128]), engine.tokenizer.pad_token_id)[:2]
        for s in range(0, len(prompt_ids), 128)
    ]
    plain = lambda: [engine.model(input_ids=ids, attention_mask=mask) for ids, mask in padded]
    with torch.no_grad():
        plain()  # warm-up
        _, forward_seconds = timed(plain)
    _, score_seconds = timed(lambda: engine.score(prompt_ids, completions, K))
    print(f"plain forward: {tokens / forward_seconds:,.0f} tokens/s")
    print(
        f"scoring (top-{K}, token logprob, tail mass): {tokens / score_seconds:,.0f} tokens/s "
        f"= {forward_seconds / score_seconds:.2f} of the plain forward"
    )

    for dtype_name, dtype in [("float32", pa.float32()), ("float16", pa.float16())]:
        labeled, seconds = timed(lambda: label(engine, pa.table({"prompt": prompts}), Sampling(temperature=1.0), K, logprob_type=dtype))
        with tempfile.TemporaryDirectory() as directory:
            store = Store(directory)
            store.write_dataset("teacher_labeled", labeled.table)
            size = sum(path.stat().st_size for path in store.shard_paths("teacher_labeled"))
        response_tokens = labeled.statistics["tokens"]
        print(
            f"stored at k={K}, {dtype_name} logprobs: {size / response_tokens:.1f} bytes per response token "
            f"({size:,} bytes zstd Parquet for {response_tokens} tokens); end-to-end labeling "
            f"{response_tokens / seconds:,.0f} response tokens/s"
        )


if __name__ == "__main__":
    main()

"""The client check of `distill export <pairs> --format dpo`: TRL's own DPOTrainer (TRL 1.16.0) trains on the export.

    .venv/bin/python bench/trl_dpo_client.py [--pairs 10] [--steps 5]

Builds, in a temporary directory and without the hub: a tiny random Qwen2 on a byte-level BPE tokenizer with a
ChatML template; a pair table of sums (a system turn on every prompt, every third prompt after an earlier exchange;
chosen the sum, rejected the sum + 1), with its prompt ids rendered by the project (training/models/chat.py) and
its reference logprobs scored by the `hf` engine; its `dpo` export (storage/export.py) as train.parquet. Then runs
bench/trl_dpo_arm.py in bench/.venv-trl (versus_trl.py's `trl_venv` makes or updates it), which trains the model
with DPOTrainer on that file, and prints the arm's JSON: TRL's row count, steps, and per logged step the loss and
rewards/margins. Exits 1 unless the loss is finite at every step, TRL's dataset has one row per pair, TRL's token
ids of each prompt are the row's prompt_token_ids (TRL renders the conversation as the project did), and TRL's
chosen and rejected ids begin with the row's response ids.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from versus_trl import BENCH, TRL_PYTHON, trl_venv

from storage.export import export_dataset
from training.engines.hf import HFEngine
from training.models.chat import MESSAGES, prompt_rendering, render
from training.models.checkpoints import save_model, weights_hash
from training.schema.tables import with_constants, with_content_id

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "You are terse."
EARLIER = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]


def tiny_chat_model(directory: Path, texts: list[str]) -> None:
    """A random two-layer Qwen2 on a byte-level BPE tokenizer trained on `texts`; <|im_end|> ends a turn."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], chat_template=CHATML)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_model(Qwen2ForCausalLM(config), tokenizer, directory)


def pair_table(engine: HFEngine, count: int) -> pa.Table:
    """`count` pairs with the pair table's columns: prompt ids rendered with the model's template, reference
    logprobs Σ log π_ref over each response's tokens (T = 1), the reference being the model itself."""
    sums = [(i % 7 + 1, i // 7 + 2) for i in range(count)]
    prompts = pa.table({"prompt": [f"What is {a}+{b}?" for a, b in sums],
                        "messages": pa.array([EARLIER + [{"role": "user", "content": f"What is {a}+{b}?"}] if i % 3 == 2 else None
                                              for i, (a, b) in enumerate(sums)], MESSAGES),
                        "system_prompt": [SYSTEM] * count, "answer": [str(a + b) for a, b in sums]})
    chosen, rejected = [str(a + b) for a, b in sums], [str(a + b + 1) for a, b in sums]
    prompt_ids = render(engine.tokenizer, prompts)
    chosen_ids, rejected_ids = (engine.tokenizer(texts, add_special_tokens=False)["input_ids"] for texts in (chosen, rejected))
    reference = [[float(s.token_logprob.sum()) for s in engine.score(prompt_ids, ids, k=1)] for ids in (chosen_ids, rejected_ids)]
    ids = pa.list_(pa.int32())
    table = with_content_id(prompts, "prompt_id", ["prompt", "messages", "system_prompt"]).append_column(
        "prompt_token_ids", pa.array(prompt_ids, ids))
    for name, values in [("chosen_token_ids", pa.array(chosen_ids, ids)), ("rejected_token_ids", pa.array(rejected_ids, ids)),
                         ("chosen", chosen), ("rejected", rejected),
                         ("chosen_sample_id", [f"chosen{i}" for i in range(count)]),
                         ("rejected_sample_id", [f"rejected{i}" for i in range(count)]),
                         ("chosen_score", [1.0] * count), ("rejected_score", [0.0] * count), ("margin", [1.0] * count),
                         ("reference_chosen_logprob", reference[0]), ("reference_rejected_logprob", reference[1])]:
        table = table.append_column(name, pa.array(values) if isinstance(values, list) else values)
    table = with_constants(table, prompt_rendering=prompt_rendering(engine.tokenizer), judge="verifier", policy="best_vs_worst",
                           reference_weights_hash=weights_hash(engine.model))
    return with_content_id(table, "pair_id", ["prompt_id", "chosen_sample_id", "rejected_sample_id"])


def failures(result: dict, pairs: pa.Table) -> list[str]:
    """What the arm's `result` shows TRL got wrong about `pairs`, if anything."""
    found = []
    if not result["losses"] or not all(math.isfinite(loss) for loss in result["losses"]):
        found.append(f"a loss is not finite: {result['losses']}")
    if result["rows"] != pairs.num_rows:
        found.append(f"TRL's dataset has {result['rows']} rows, the pair table {pairs.num_rows}")
    if result["prompt_ids"] != pairs["prompt_token_ids"].to_pylist():
        found.append("TRL's prompt ids differ from the rows' prompt_token_ids")
    for response in ("chosen", "rejected"):
        ours = pairs[f"{response}_token_ids"].to_pylist()
        if any(theirs[: len(row)] != row for theirs, row in zip(result[f"{response}_ids"], ours)):
            found.append(f"TRL's {response} ids do not begin with the rows' {response}_token_ids")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    began = time.perf_counter()
    trl_venv()
    with tempfile.TemporaryDirectory() as directory:
        model = Path(directory, "model")
        tiny_chat_model(model, [f"What is {a}+{b}? {a + b}" for a in range(10) for b in range(10)] + [SYSTEM] * 10)
        pairs = pair_table(HFEngine.load(str(model)), args.pairs)
        data = export_dataset(pairs, "dpo", Path(directory, "export"))
        arm = subprocess.run([TRL_PYTHON, BENCH / "trl_dpo_arm.py", model, data, Path(directory, "trained"), str(args.steps)],
                             check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(arm.stdout.strip().splitlines()[-1])
    print(json.dumps({key: result[key] for key in ("rows", "steps", "losses", "margins", "accuracies", "seconds")}, indent=1))
    print(f"wall time {time.perf_counter() - began:.1f} s (the venv check and the tiny model included)")
    found = failures(result, pairs)
    print("\n".join(found) or f"ok: TRL {result['trl']} trained {result['steps']} steps on the {pairs.num_rows} exported pairs")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Labeling throughput: teacher scoring (top-k signal) against a plain batched forward pass of the
same model, generation throughput, and stored bytes per token at k=20.

    .venv/bin/python bench/labeling.py [path to a model directory]
    .venv/bin/python bench/labeling.py --real-vocabulary

Without a path it uses the embedded teacher from DISTILL_HOME if there is one (`make demo`), else a
freshly initialised model of the teacher's architecture (speed does not depend on the weights).

`--real-vocabulary` measures the stored signal at V = 151,936 (Qwen2.5's): a byte-level BPE trained
here on arithmetic text and padded with filler tokens to that size, and two freshly initialised
Qwen2-shaped teachers on it whose top-k spreads over the vocabulary: uniformly (every head row alike:
the worst case for the ids) and by frequency (head rows scaled down with the id, as frequent tokens
take the low ids of a BPE). One sampling, scored and stored at float32, float16 and q8; bytes per
token of each column as the store writes them, and the JSD loss of another model on each signal.
"""

import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.shards import write_parquet
from storage.store import Store
from training.data.labeling import label, sample, score, with_columns
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.models.batches import completion_positions
from training.models.checkpoints import TEACHER_ARCHITECTURE, build_embedded
from training.models.token_bytes import token_table
from training.tasks.arithmetic import problems
from training.trainer.losses import LossSettings, sparse_batch, sparse_kd_loss

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


REAL_VOCABULARY = 151_936


def real_vocabulary_tokenizer():
    """A byte-level BPE trained on arithmetic text, padded with filler tokens to REAL_VOCABULARY."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [p.prompt + p.solution for p in problems("train", 5000, seed=1)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([f"<|filler_{i}|>" for i in range(REAL_VOCABULARY - len(tokenizer))], special_tokens=True)
    return tokenizer


def real_vocabulary_teacher(by_frequency: bool, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=REAL_VOCABULARY, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=256)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of a few nats' spread, as a trained model's
        if by_frequency:
            model.lm_head.weight.mul_((1.0 + 4.0 / (1.0 + torch.arange(REAL_VOCABULARY) / 2000.0)).unsqueeze(-1) / 5.0)
    return model


def real_vocabulary() -> None:
    tokenizer = real_vocabulary_tokenizer()
    prompts = pa.table({"prompt": [p.prompt for p in problems("train", 128, seed=123)]})
    print(f"V = {REAL_VOCABULARY:,} (a byte-level BPE of {tokenizer.convert_tokens_to_ids('<|filler_0|>')} tokens, padded), "
          f"k = {K}, 128 prompts × 64 sampled tokens; bytes per response token as the store writes them (zstd Parquet)\n")
    print("| teacher's top-k | logprobs | topk_ids | topk_logprobs | token_logprob + tail_mass | signal | whole rows | "
          "JSD loss | vs float32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    student = real_vocabulary_teacher(by_frequency=False, seed=1)
    for by_frequency in (False, True):
        engine = HFEngine(real_vocabulary_teacher(by_frequency, seed=0), tokenizer, batch_size=32)
        responses, _, _ = sample(engine, prompts, Sampling(temperature=1.0, max_new_tokens=64))
        tokens = sum(len(c) for c in responses["completion_token_ids"].to_pylist())
        losses = {}
        for dtype in ("float32", "float16", "q8"):
            signal, _ = score(engine, responses, K, 1.0, dtype)
            table = with_columns(responses, signal)
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / "part.parquet"
                write_parquet(table, path)
                metadata = pq.ParquetFile(path).metadata
                columns = {}
                for group in range(metadata.num_row_groups):
                    for i in range(metadata.num_columns):
                        column = metadata.row_group(group).column(i)
                        name = column.path_in_schema.split(".")[0]
                        columns[name] = columns.get(name, 0) + column.total_compressed_size / tokens
                whole = path.stat().st_size / tokens
            rows = table.slice(0, 16)
            batch = sparse_batch(rows, tokenizer.pad_token_id)
            with torch.no_grad():
                logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                losses[dtype] = sparse_kd_loss(logits, batch, LossSettings(divergence="jsd"), 1.0)[0].item()
            signal_bytes = sum(columns[c] for c in ("topk_ids", "topk_logprobs", "token_logprob", "tail_mass"))
            print(f"| {'by frequency' if by_frequency else 'uniform'} | {dtype} | {columns['topk_ids']:.1f} | "
                  f"{columns['topk_logprobs']:.1f} | {columns['token_logprob'] + columns['tail_mass']:.1f} | **{signal_bytes:.1f}** | "
                  f"{whole:.1f} | {losses[dtype]:.5f} | {losses[dtype] - losses['float32']:+.1e} |", flush=True)
    with tempfile.TemporaryDirectory() as directory:  # what a student of another tokenizer reads besides the rows
        path = Path(directory) / "part.parquet"
        write_parquet(token_table(tokenizer, [tokenizer.eos_token_id]), path)
        print(f"\nThe teacher's token table (token_texts, once per tokenizer; the rows above reference it by id): "
              f"{path.stat().st_size / 1e6:.2f} MB, {path.stat().st_size / REAL_VOCABULARY:.1f} B per token id")


def main() -> None:
    if "--real-vocabulary" in sys.argv:
        real_vocabulary()
        return
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

    for dtype_name, dtype in [("float32", "float32"), ("float16", "float16"), ("q8", "q8")]:
        labeled, seconds = timed(lambda: label(engine, pa.table({"prompt": prompts}), Sampling(temperature=1.0), K, logprob_dtype=dtype))
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

"""Each `distill export` format read by the real client that consumes it, that client's own code in its own environment:

    .venv/bin/python bench/clients.py [--workdir DIR]

Builds, in a temporary directory (or DIR, kept) and without the hub: a tiny random Qwen2 teacher and a smaller Qwen2
student on one byte-level BPE vocabulary with Qwen's chat tokens (eos <|endoftext|>; <|im_end|> ends a turn), the
teacher on ChatML, and a second student tokenizer whose template puts nothing after <|im_end|>; a Store with
`teacher_labeled` (a dozen prompts, a system prompt on each, some multi-turn, one with its own system turn; fixed
replies ending with <|im_end|>, scored teacher-forced by the project's `hf` engine with `score(..., k=8)`) and
`preference_pairs` (a reply chosen over another, reference logprobs scored by the engine); and the exports
(storage/export.py): trl, messages, dpo, and axolotl once per student template; and the embedded pair (the character
tokenizer, random Llamas) with raw-text `teacher_labeled` rows (arithmetic problems and their worked solutions),
exported as `trl` (text prompt-completion), its axolotl export expected to refuse (no chat template: no conversation
to lay out). Then each client, in its own venv (a subprocess that prints JSON; the venvs are made when missing), loads
its export directory as it loads a local dataset, which ends in its own `datasets.load_dataset(dir, split="train")`
following the dataset card's configs (README.md; a warning `datasets` logs about the card is shown in the line), and:

    axolotl (bench/axolotl_arm.py, bench/.venv-axolotl; `axolotl_venv` makes it): axolotl's KD strategy
        (`type: axolotl.integrations.kd.chat_template`, built by its strategy loader) tokenizes every exported row and
        its DataCollatorForKD collates them. Asserted on the collated batch: every stored reply token j >= 1 has its
        stored top-k row (topk_ids[j]) at the position i with input_ids[i+1] = y_j, unmasked, its target_logprobs the
        stored logprobs renormalized over the top-k (atol 1e-4); axolotl's labels from the reply on are the reply's
        tokens (<|im_end|> included) and nothing after; no token of an earlier turn is labelled (the export marks them
        `training: false`, axolotl's per-message key);
        every target value is finite where the mask is 1. Reported: where the rows land (how many on unmasked
        positions, teacher rows and the export's added rows, and what the added unmasked ones teach). Then 3 steps of the
        student with axolotl's own KD loss (AxolotlKDTrainer.compute_loss: the fused Liger top-k KL on the last hidden
        state and lm_head, compiled, which runs on the CPU), asserting finite losses.
    TRL 1.16 (bench/trl_client_arms.py, bench/.venv-trl; versus_trl.py's `trl_venv` makes it): SFTTrainer on `trl`
        (its collated labels are the completion's tokens then the template's tail, ChatML's "\n", the stored prompt ids
        before them masked); GKDTrainer (lmbda 0: the dataset's completions) on `messages` (its collator's prompts are
        the stored prompt ids, its labels the completion's tokens then the tail); DistillationTrainer
        (trl/trainer/distillation_trainer.py: a `prompt` column, completions sampled on-policy) on `trl` (its tokenized
        prompts are the stored prompt ids); DPOTrainer (bench/trl_dpo_arm.py) on `dpo` (one row per pair, its prompt
        ids the stored ones, its chosen and rejected ids begin with the stored response ids); SFTTrainer and
        DistillationTrainer again on the embedded pair's text export (trained tokens: the completion through <eos>).
        Each 3 steps on the CPU in fp32, asserting finite losses.

Prints one line per client, `<client> <layout>  ok  <figures>` or `<client> <layout>  FAIL  <why>`, then the timings;
exits 1 if any fails. Not part of the test suite.

Verified with axolotl 0.19.0 (the newest on Python 3.11; its venv: torch 2.13.0 CPU, transformers 5.16.1, datasets
4.8.4, liger-kernel 0.8.1) and TRL 1.16.0 (torch 2.13.0, transformers 5.19.0, datasets 5.2.0). One run on 2 shared CPU
cores, the venvs present, took 54 s wall: this script's imports ~12 s, the build 1 s, the axolotl arm 26 s (imports 15 s,
the Liger kernel's first torch.compile ~10 s; 16 s once inductor's cache has it), the TRL arm 13 s (imports 10 s, each
trainer under 1 s). Making bench/.venv-axolotl takes about 7 minutes and 4.3 GB.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
import yaml
from tokenizers import ByteLevelBPETokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging
from versus_trl import BENCH, TRL_PYTHON, trl_venv

from storage.export import export_dataset
from storage.store import Store
from training.data.labeling import score, with_columns
from training.embedded.pair import token_rows
from training.engines.hf import HFEngine
from training.models.chat import MESSAGES, RAW, conversations, prompt_rendering, render
from training.models.checkpoints import STUDENT_ARCHITECTURE, TEACHER_ARCHITECTURE, build_embedded, model_card, save_model, weights_hash
from training.schema.tables import with_constants, with_content_id
from training.tasks.arithmetic import problems

AXOLOTL_PYTHON = BENCH / ".venv-axolotl" / "bin" / "python"
AXOLOTL = "axolotl==0.19.0"  # the newest that installs on Python 3.11
AXOLOTL_TORCH = "torch==2.13.0"
K = 8
STEPS = 3
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}:\n{{ m['content'] }}<|im_end|>{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>ASSISTANT:\n{% endif %}")  # nothing after <|im_end|>
SYSTEM = "You are a terse assistant."
EARLIER = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1 = 2."}]
OWN_SYSTEM = [{"role": "system", "content": "Answer in one word."}]
# (prompt, earlier turns or None, the reply)
ROWS = [("What is 2+3?", None, "2+3 = 5."), ("What is 7+1?", EARLIER, "7+1 = 8."),
        ("Name a primary color.", None, "Red."), ("What is the capital of France?", EARLIER, "Paris."),
        ("Spell cat backwards.", None, "tac"), ("Is 9 odd?", None, "Yes, 9 is odd."),
        ("What is 4+4?", EARLIER, "4+4 = 8."), ("Give two colors, one per line.", None, "Red.\nBlue."),
        ("What is 6+3?", OWN_SYSTEM, "Nine."), ("Is 4 odd?", None, "No, 4 is even."),
        ("What is 5+5?", EARLIER, "5+5 = 10."), ("Name a fruit.", None, "Apple.")]


def axolotl_venv() -> None:
    """bench/.venv-axolotl with axolotl 0.19.0 on torch 2.13.0 (CPU wheels as pip picks them), made when missing:
    torch first, then axolotl constrained to that torch (about 7 minutes and 4.3 GB)."""
    if AXOLOTL_PYTHON.exists():
        return
    venv = BENCH / ".venv-axolotl"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [venv / "bin" / "pip", "install", "-q"]
    subprocess.run([*pip, "-U", "pip"], check=True)
    subprocess.run([*pip, AXOLOTL_TORCH], check=True)
    (venv / "pin.txt").write_text(AXOLOTL_TORCH + "\n")
    subprocess.run([*pip, AXOLOTL, "-c", venv / "pin.txt"], check=True)


def chat_models(directory: Path) -> dict[str, Path]:
    """The teacher (ChatML), the student with ChatML and the same student with PLAIN, on one byte-level BPE tokenizer
    trained on the rows' texts; generation ends at <|im_end|> or <|endoftext|> (the tokenizer's eos), as Qwen's do."""
    corpus = [text for prompt, earlier, reply in ROWS for text in [prompt, reply] + [m["content"] for m in earlier or []]]
    corpus += [SYSTEM, "system user assistant SYSTEM USER ASSISTANT"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 10, vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    paths = {}
    for name, hidden, layers, template in [("teacher", 64, 2, CHATML), ("student", 32, 1, CHATML), ("student-plain", 32, 1, PLAIN)]:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                            additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template)
        ends = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, max_position_embeddings=256,
                             eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(hidden)  # both students the same weights
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        paths[name] = directory / name
        save_model(model, tokenizer, paths[name])
    return paths


def teacher_labeled(engine: HFEngine, logprob_dtype: str = "float32") -> pa.Table:
    """`teacher_labeled`'s columns (training/data/labeling.py label_table) for ROWS: the replies as the teacher's
    greedy responses ending at <|im_end|>, their top-K signal scored by the engine, teacher-forced."""
    tokenizer = engine.tokenizer
    prompts = pa.table({"prompt": [p for p, _, _ in ROWS],
                        "messages": pa.array([earlier + [{"role": "user", "content": p}] if earlier else None for p, earlier, _ in ROWS],
                                             MESSAGES),
                        "system_prompt": [SYSTEM] * len(ROWS), "answer": [reply for _, _, reply in ROWS]})
    prompts = with_content_id(prompts, "prompt_id", ["prompt", "messages", "system_prompt"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    completions = [ids + [end] for ids in tokenizer([reply for _, _, reply in ROWS], add_special_tokens=False)["input_ids"]]
    ids = pa.list_(pa.int32())
    responses = pa.table({"sample_index": pa.array([0] * len(ROWS), pa.int32()),
                          "prompt_token_ids": pa.array(render(tokenizer, prompts), ids),
                          "prompt_rendering": [prompt_rendering(tokenizer)] * len(ROWS),
                          "completion_token_ids": pa.array(completions, ids),
                          "completion": tokenizer.batch_decode(completions, skip_special_tokens=True),
                          "finish_reason": ["stop"] * len(ROWS),
                          "num_tokens": pa.array([len(c) for c in completions], pa.int32())})
    signal, _ = score(engine, responses, K, 1.0, logprob_dtype)
    table = with_columns(with_columns(prompts, responses), signal)
    table = table.append_column("correct", pa.array([True] * len(ROWS)))
    card = model_card("tiny-teacher", engine.model, tokenizer)
    table = with_constants(table, teacher=card.name, teacher_revision=pa.scalar(None, pa.string()), teacher_weights_hash=card.weights_hash,
                           tokenizer_hash=card.tokenizer_hash, sampling=json.dumps({"temperature": 0.0}), run_id="clients")
    return with_content_id(table, "sample_id", ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash", "sampling"])


def preference_pairs(engine: HFEngine, labeled: pa.Table) -> pa.Table:
    """A pair table over the labeled rows: each row's response chosen over the next row's, with the reference
    logprobs Σ log π_ref of each response (the teacher as reference, T = 1)."""
    count = labeled.num_rows
    other = [(i + 1) % count for i in range(count)]
    prompts = labeled.select(["prompt_id", "prompt", "messages", "system_prompt", "prompt_token_ids", "prompt_rendering"])
    chosen_ids = labeled["completion_token_ids"].to_pylist()
    rejected_ids = [chosen_ids[j] for j in other]
    prompt_ids = prompts["prompt_token_ids"].to_pylist()
    reference = [[float(s.token_logprob.sum()) for s in engine.score(prompt_ids, ids, k=1)] for ids in (chosen_ids, rejected_ids)]
    texts = labeled["completion"].to_pylist()
    sample_ids = labeled["sample_id"].to_pylist()
    ids = pa.list_(pa.int32())
    columns = {"chosen_token_ids": pa.array(chosen_ids, ids), "rejected_token_ids": pa.array(rejected_ids, ids),
               "chosen": texts, "rejected": [texts[j] for j in other], "chosen_sample_id": sample_ids,
               "rejected_sample_id": [sample_ids[j] for j in other], "chosen_score": [1.0] * count, "rejected_score": [0.0] * count,
               "margin": [1.0] * count, "reference_chosen_logprob": reference[0], "reference_rejected_logprob": reference[1]}
    table = prompts
    for name, values in columns.items():
        table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values))
    table = with_constants(table, judge="verifier", policy="best_vs_worst", reference_weights_hash=weights_hash(engine.model))
    return with_content_id(table, "pair_id", ["prompt_id", "chosen_sample_id", "rejected_sample_id"])


def template_tails(tokenizer, labeled: pa.Table) -> list[list[int]]:
    """Per row, the ids `tokenizer`'s template renders after the reply (ChatML: "\\n" after <|im_end|>)."""
    replies = [c + [{"role": "assistant", "content": text}] for c, text in zip(conversations(labeled), labeled["completion"].to_pylist())]
    whole = tokenizer(tokenizer.apply_chat_template(replies, tokenize=False), add_special_tokens=False)["input_ids"]
    prompts, completions = render(tokenizer, labeled), labeled["completion_token_ids"].to_pylist()
    return [ids[len(p) + len(c):] for ids, p, c in zip(whole, prompts, completions)]


TRUTH = ["sample_id", "prompt_token_ids", "completion_token_ids", "topk_ids", "topk_logprobs"]  # per sample, what the arms check


def embedded_labeled(directory: Path) -> tuple[dict[str, Path], pa.Table]:
    """The embedded pair (random weights: the layout is what is checked) and raw-text `teacher_labeled` rows on it:
    arithmetic problems with their worked solutions ending at <eos>, scored teacher-forced by the engine."""
    models = {}
    for name, architecture, seed in [("embedded-teacher", TEACHER_ARCHITECTURE, 0), ("embedded-student", STUDENT_ARCHITECTURE, 1)]:
        model, tokenizer = build_embedded(architecture, seed)
        models[name] = directory / name
        save_model(model, tokenizer, models[name])
    engine = HFEngine.load(str(models["embedded-teacher"]))
    chosen = problems("train", len(ROWS), 0)
    prompts = with_content_id(pa.table({"prompt": [q.prompt for q in chosen], "answer": [str(q.answer) for q in chosen]}),
                              "prompt_id", ["prompt"])
    tokens = token_rows(engine.tokenizer, prompts["prompt"].to_pylist(), [q.solution for q in chosen])
    responses = with_columns(tokens, pa.table({
        "sample_index": pa.array([0] * len(chosen), pa.int32()), "prompt_rendering": [RAW] * len(chosen),
        "completion": [q.solution for q in chosen], "finish_reason": ["stop"] * len(chosen),
        "num_tokens": pa.array([len(c) for c in tokens["completion_token_ids"].to_pylist()], pa.int32())}))
    signal, _ = score(engine, responses, K, 1.0)
    card = model_card("embedded-teacher", engine.model, engine.tokenizer)
    table = with_constants(with_columns(with_columns(prompts, responses), signal), teacher=card.name,
                           teacher_weights_hash=card.weights_hash, tokenizer_hash=card.tokenizer_hash,
                           sampling=json.dumps({"temperature": 0.0}), run_id="clients")
    return models, with_content_id(table, "sample_id", ["prompt_id", "sample_index", "completion_token_ids", "teacher_weights_hash"])


def build(directory: Path, logprob_dtype: str = "float32") -> dict:
    """The models, the Store, the exports and truth.json (what the arms compare against); returns the arms' config."""
    began = time.perf_counter()
    models = chat_models(directory / "models")
    engine = HFEngine.load(str(models["teacher"]))
    labeled = teacher_labeled(engine, logprob_dtype)
    pairs = preference_pairs(engine, labeled)
    store = Store(directory / "store")
    store.write_dataset("teacher_labeled", labeled)
    store.write_dataset("preference_pairs", pairs)
    exports, dropped = {}, {}
    for name, dataset, format, tokenizer_dir in [("trl", "teacher_labeled", "trl", None), ("messages", "teacher_labeled", "messages", None),
                                                 ("dpo", "preference_pairs", "dpo", None),
                                                 ("axolotl-chatml", "teacher_labeled", "axolotl", models["student"]),
                                                 ("axolotl-plain", "teacher_labeled", "axolotl", models["student-plain"])]:
        tokenizer = HFEngine.load(str(tokenizer_dir)).tokenizer if tokenizer_dir else None
        path, dropped[name] = export_dataset(store, dataset, format, directory / "exports" / name, tokenizer=tokenizer)
        exports[name] = str(path.parent)
    embedded, raw = embedded_labeled(directory / "models")  # raw text: the trl export; axolotl has no conversation to lay out
    models |= embedded
    raw_store = Store(directory / "embedded-store")
    raw_store.write_dataset("teacher_labeled", raw)
    path, dropped["trl-embedded"] = export_dataset(raw_store, "teacher_labeled", "trl", directory / "exports" / "trl-embedded")
    exports["trl-embedded"] = str(path.parent)
    try:
        export_dataset(raw_store, "teacher_labeled", "axolotl", directory / "exports" / "axolotl-embedded",
                       tokenizer=HFEngine.load(str(embedded["embedded-student"])).tokenizer)
        refused = None
    except ValueError as error:
        refused = str(error)
    tails = template_tails(engine.tokenizer, labeled) + [[] for _ in range(raw.num_rows)]  # raw text: nothing after <eos>
    both = pa.concat_tables([labeled.select(TRUTH), raw.select(TRUTH)])
    truth = {"samples": {sid: {"prompt_ids": p, "completion_ids": c, "topk_ids": i, "topk_logprobs": lp, "tail": t}
                         for (sid, p, c, i, lp), t in zip(zip(*(both[name].to_pylist() for name in TRUTH)), tails)},
             "pairs": {pid: {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                       for pid, p, c, r in zip(pairs["pair_id"].to_pylist(), pairs["prompt_token_ids"].to_pylist(),
                                               pairs["chosen_token_ids"].to_pylist(), pairs["rejected_token_ids"].to_pylist())}}
    (directory / "truth.json").write_text(json.dumps(truth))
    return {"models": {name: str(path) for name, path in models.items()}, "exports": exports, "dropped": dropped,
            "truth": str(directory / "truth.json"), "work": str(directory / "work"), "steps": STEPS,
            "temperature": labeled["temperature"][0].as_py(), "rows": labeled.num_rows, "pairs": pairs.num_rows,
            "axolotl_yaml": axolotl_yaml(), "embedded_rows": raw.num_rows, "axolotl_embedded_refused": refused,
            "build_seconds": round(time.perf_counter() - began, 1)}


def axolotl_yaml() -> dict:
    """The axolotl YAML docs/export.md gives users (its ```yml block): the axolotl arm builds axolotl's config from it."""
    block = (BENCH.parent / "docs" / "export.md").read_text().split("```yml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def run_arm(python: Path, script: str, config: dict, directory: Path) -> tuple[dict, float, str]:
    """Runs `script` with `python` on config.json; returns (its JSON, seconds, the error's last lines or "")."""
    path = directory / f"{Path(script).stem}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(directory / "hf-datasets-cache"), "PYTHONWARNINGS": "ignore"}
    began = time.perf_counter()
    done = subprocess.run([python, BENCH / script, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - began
    (directory / f"{Path(script).stem}.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {}, seconds, f"{script} exited {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    return json.loads(lines[-1]), seconds, ""


ARMS = [("axolotl_arm.py", AXOLOTL_PYTHON, ["axolotl-chatml", "axolotl-plain"]),
        ("trl_client_arms.py", TRL_PYTHON, ["sft", "gkd", "distillation", "dpo", "sft-embedded", "distillation-embedded"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="build here and keep it (default: a temporary directory)")
    parser.add_argument("--logprob-dtype", default="float32", choices=["float32", "float16", "q8"],
                        help="how teacher_labeled stores the logprobs (q8: codec topk-q8-v1)")
    args = parser.parse_args()
    began = time.perf_counter()
    setup = time.perf_counter()
    trl_venv()
    axolotl_venv()
    setup = time.perf_counter() - setup
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.workdir.resolve() if args.workdir else Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        config = build(directory, args.logprob_dtype)
        lines, timings, failed = [], [f"venv checks {setup:.1f} s", f"build {config['build_seconds']} s"], False
        for script, python, names in ARMS:
            result, seconds, error = run_arm(python, script, config, directory)
            arms = {n: result[n]["seconds"] for n in names if n in result}
            timings.append(f"{script} {seconds:.1f} s (start and imports {seconds - sum(arms.values()):.1f} s"
                           + "".join(f", {n} {s} s" for n, s in arms.items()) + ")")
            for name in names:
                arm = result.get(name, {"client": name, "layout": "", "failures": [error or f"{script} gave no result for {name}"]})
                failed |= bool(arm["failures"])
                verdict = "FAIL  " + "; ".join(arm["failures"]) if arm["failures"] else "ok  " + arm["figures"]
                lines.append(f"{arm['client']} {arm['layout']}  {verdict}")
        refused = config["axolotl_embedded_refused"]  # the embedded pair renders raw text: the axolotl export must say so
        failed |= not refused
        lines.append("distill export --format axolotl (embedded pair, raw text)  " + (f"ok  refused: {refused}" if refused else
                                                                                     "FAIL  it wrote rows without a conversation"))
    print("\n".join(lines))
    print(f"timings: {'; '.join(timings)}; total {time.perf_counter() - began:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

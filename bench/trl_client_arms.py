"""The TRL side of bench/clients.py: TRL 1.16.0's trainers on the `trl`, `messages` and `dpo` exports, run in
bench/.venv-trl (torch, transformers, trl, datasets; no hub):

    bench/.venv-trl/bin/python bench/trl_client_arms.py config.json

config.json (clients.py writes it): exports and models (directories by name), truth (the stored ids by sample_id and
pair_id), work (a scratch directory), steps. Every export is loaded with `datasets.load_dataset(dir, split="train")`
(the dataset card's configs); every trainer runs `steps` steps on the CPU in fp32 (lr 1e-3, batch 4, DPO 2), logging
each step's loss:

    sft           SFTTrainer on `trl` (prompt-completion, conversational), the student: its collated batch of all rows
                  trains on (labels != -100) the completion's tokens then the template's tail (ChatML: "\\n" after
                  <|im_end|>), and the tokens before them are the stored prompt ids, masked
    gkd           GKDTrainer (trl.experimental.gkd) on `messages`, student and teacher, lmbda 0 (the dataset's
                  completions, never on-policy samples), JSD β 0.5: its collator's prompts are the stored prompt ids
                  and its labels the completion's tokens then the tail
    distillation  DistillationTrainer (trl/trainer/distillation_trainer.py) on `trl`: it takes the `prompt` column
                  and samples the completions on-policy (at most 8 tokens), generalized JSD β 1 (its default, reverse
                  KL); its tokenized prompts (`_tokenize_prompts`, what it generates from) are the stored prompt ids
    dpo           DPOTrainer on `dpo` (bench/trl_dpo_arm.py), the teacher against itself: one row per pair, its
                  prompt ids the stored ones, its chosen and rejected ids begin with the stored response ids

Prints one JSON line: per arm client, layout, figures, failures, seconds.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import trl
from datasets import load_dataset
from datasets_warnings import with_warnings
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, DistillationTrainer, SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl_dpo_arm import dpo_arm


def load(directory: str):
    """`datasets.load_dataset(directory, split="train")`, which follows the dataset card's configs, and its warnings."""
    return with_warnings(load_dataset, directory, split="train")


def loaded(dataset, warnings: list[str]) -> str:
    return f"load_dataset(dir) {len(dataset)} rows" + "".join(f" (datasets warns: {w[:160]})" for w in dict.fromkeys(warnings))


def common(config: dict, name: str) -> dict:
    return {"output_dir": str(Path(config["work"], name)), "max_steps": config["steps"], "learning_rate": 1e-3, "logging_steps": 1,
            "use_cpu": True, "bf16": False, "fp16": False, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0}


def model(config: dict, name: str):
    return AutoModelForCausalLM.from_pretrained(config["models"][name], dtype=torch.float32)


def losses(trainer, steps: int) -> tuple[list[float], list[str]]:
    """The logged losses, and a failure unless there is one per step, all finite."""
    found = [round(entry["loss"], 5) for entry in trainer.state.log_history if "loss" in entry]
    return found, [] if len(found) == steps and all(math.isfinite(loss) for loss in found) else [f"losses {found}"]


def trained_rows(tokenizer, dataset, input_ids, labels, attention, truth: dict) -> tuple[int, list[str]]:
    """Rows whose trained tokens (labels != -100) are the stored completion then the template's tail, and whose tokens
    before them are the stored prompt ids; failures for the others."""
    good, failures = 0, []
    for b, sample_id in enumerate(dataset["sample_id"]):
        stored = truth[sample_id]
        ids = [t for t, m in zip(input_ids[b].tolist(), attention[b].tolist()) if m]
        kept = [label for label, m in zip(labels[b].tolist(), attention[b].tolist()) if m]
        first = next((p for p, label in enumerate(kept) if label != -100), len(kept))
        trained = [t for t, label in zip(ids, kept) if label != -100]
        if trained == stored["completion_ids"] + stored["tail"] and ids[:first] == stored["prompt_ids"] and ids[first:] == trained:
            good += 1
        elif len(failures) < 3:
            failures.append(f"row {b}: trains on {tokenizer.convert_ids_to_tokens(trained)} after {len(ids[:first])} masked tokens; "
                            f"stored: {tokenizer.convert_ids_to_tokens(stored['completion_ids'])} + tail "
                            f"{tokenizer.convert_ids_to_tokens(stored['tail'])} after {len(stored['prompt_ids'])} prompt tokens")
    return good, failures


def tail_text(tokenizer, truth: dict) -> str:
    return repr(tokenizer.decode(next(iter(truth.values()))["tail"]))


def sft(config: dict, truth: dict, pair: str = "") -> dict:
    """SFTTrainer on the `trl` export of the chat pair, or with `pair` "embedded-" of the embedded pair (raw text)."""
    dataset, warned = load(config["exports"]["trl-embedded" if pair else "trl"])
    tokenizer = AutoTokenizer.from_pretrained(config["models"][f"{pair}student"])
    args = SFTConfig(per_device_train_batch_size=4, gradient_checkpointing=False, **common(config, f"{pair}sft"))
    trainer = SFTTrainer(model=model(config, f"{pair}student"), args=args, train_dataset=dataset, processing_class=tokenizer)
    rows = trainer.train_dataset
    batch = trainer.data_collator([{key: row[key] for key in ("input_ids", "completion_mask", "labels") if key in row} for row in rows])
    attention = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    good, failures = trained_rows(tokenizer, rows, batch["input_ids"], batch["labels"], attention, truth)
    trainer.train()
    found, bad = losses(trainer, config["steps"])
    failures += bad + ([] if good == len(dataset) else [f"{good}/{len(dataset)} rows"])
    tail = f"+ the template's tail {tail_text(tokenizer, truth)}" if not pair else "(through <eos>)"
    return {"rows": len(dataset), "layout": "trl (prompt-completion, " + ("text: the embedded pair)" if pair else "conversational)"),
            "failures": failures, "figures": f"{loaded(dataset, warned)}; {good}/{len(dataset)} collated rows train on exactly the "
                                             f"completion's tokens {tail}, the stored prompt ids masked; losses {found}"}


def gkd(config: dict, truth: dict) -> dict:
    dataset, warned = load(config["exports"]["messages"])
    tokenizer = AutoTokenizer.from_pretrained(config["models"]["student"])
    args = GKDConfig(per_device_train_batch_size=4, lmbda=0.0, beta=0.5, temperature=1.0, max_new_tokens=8, seq_kd=False,
                     gradient_checkpointing=False, **common(config, "gkd"))
    trainer = GKDTrainer(model=model(config, "student"), teacher_model=model(config, "teacher"), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    good, failures = trained_rows(tokenizer, dataset, batch["input_ids"], batch["labels"], batch["attention_mask"], truth)
    prompts = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(batch["prompts"].tolist(), batch["prompt_attention_mask"].tolist())]
    same = sum(p == truth[s]["prompt_ids"] for p, s in zip(prompts, dataset["sample_id"]))
    trainer.train()
    found, bad = losses(trainer, config["steps"])
    failures += bad + ([] if good == len(dataset) else [f"{good}/{len(dataset)} rows"])
    failures += [] if same == len(dataset) else [f"{same}/{len(dataset)} collator prompts are the stored prompt ids"]
    return {"rows": len(dataset), "layout": "messages", "failures": failures,
            "figures": f"{loaded(dataset, warned)}; collator: {same}/{len(dataset)} prompts = stored prompt ids, {good}/{len(dataset)} "
                       f"labels = completion + tail {tail_text(tokenizer, truth)}; lmbda 0; losses {found}"}


def distillation(config: dict, truth: dict, pair: str = "") -> dict:
    """DistillationTrainer on the `trl` export of the chat pair, or with `pair` "embedded-" of the embedded pair."""
    dataset, warned = load(config["exports"]["trl-embedded" if pair else "trl"])
    tokenizer = AutoTokenizer.from_pretrained(config["models"][f"{pair}student"], padding_side="left")
    args = DistillationConfig(per_device_train_batch_size=4, max_completion_length=8, gradient_checkpointing=False,
                              **common(config, f"{pair}distillation"))
    trainer = DistillationTrainer(model=model(config, f"{pair}student"), teacher_model=model(config, f"{pair}teacher"), args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in dataset])
    same = sum(p == truth[s]["prompt_ids"] for p, s in zip(prompt_ids, dataset["sample_id"]))
    trainer.train()
    found, bad = losses(trainer, config["steps"])
    failures = bad + ([] if same == len(dataset) else [f"{same}/{len(dataset)} tokenized prompts are the stored prompt ids"])
    return {"rows": len(dataset), "layout": "trl (its `prompt` column; completions sampled on-policy" + (
                ", the embedded pair's text)" if pair else ")"), "failures": failures,
            "figures": f"{loaded(dataset, warned)}; {same}/{len(dataset)} tokenized prompts = stored prompt ids; losses {found}"}


def dpo(config: dict, pairs: dict) -> dict:
    dataset, warned = load(config["exports"]["dpo"])
    result = dpo_arm(config["models"]["teacher"], dataset, str(Path(config["work"], "dpo")), config["steps"])
    stored = [pairs[pair_id] for pair_id in dataset["pair_id"]]
    finite = len(result["losses"]) == config["steps"] and all(map(math.isfinite, result["losses"]))
    failures = [] if finite else [f"losses {result['losses']}"]
    if result["rows"] != len(stored):
        failures.append(f"TRL's dataset has {result['rows']} rows, the export {len(stored)}")
    if result["prompt_ids"] != [row["prompt_ids"] for row in stored]:
        failures.append("TRL's prompt ids differ from the rows' prompt_token_ids")
    for response in ("chosen", "rejected"):
        if any(theirs[: len(row[f"{response}_ids"])] != row[f"{response}_ids"] for theirs, row in zip(result[f"{response}_ids"], stored)):
            failures.append(f"TRL's {response} ids do not begin with the rows' {response}_token_ids")
    return {"rows": len(dataset), "layout": "dpo (conversational preference)", "failures": failures,
            "figures": f"{loaded(dataset, warned)}; TRL {result['rows']} rows, prompt ids = stored, chosen/rejected ids begin "
                       f"with the stored ids; losses {[round(x, 5) for x in result['losses']]}, margins "
                       f"{[round(x, 4) for x in result['margins']]}"}


ARMS = {"sft": ("SFTTrainer", sft), "gkd": ("GKDTrainer", gkd), "distillation": ("DistillationTrainer", distillation),
        "dpo": ("DPOTrainer", dpo),
        "sft-embedded": ("SFTTrainer", lambda config, truth: sft(config, truth, "embedded-")),
        "distillation-embedded": ("DistillationTrainer", lambda config, truth: distillation(config, truth, "embedded-"))}


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    truth = json.loads(Path(config["truth"]).read_text())
    torch.set_num_threads(2)
    result = {}
    for name, (trainer, arm) in ARMS.items():
        began = time.perf_counter()
        try:
            found = arm(config, truth["pairs" if name == "dpo" else "samples"])
            expected = config["pairs" if name == "dpo" else "embedded_rows" if name.endswith("-embedded") else "rows"]
            if found.pop("rows") != expected:
                found["failures"].append(f"load_dataset(dir) does not give the export's {expected} rows")
        except Exception as error:  # noqa: BLE001 - reported as the arm's failure
            found = {"layout": name, "figures": "", "failures": [f"{type(error).__name__}: {str(error)[:300]}"]}
        result[name] = {"client": f"trl {trl.__version__} {trainer}", **found, "seconds": round(time.perf_counter() - began, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

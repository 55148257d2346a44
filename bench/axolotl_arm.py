"""The axolotl side of bench/clients.py: axolotl's own KD code on `axolotl` exports, run in bench/.venv-axolotl:

    bench/.venv-axolotl/bin/python bench/axolotl_arm.py config.json

config.json (clients.py writes it): exports and models (directories by name), truth (the stored ids and signal by
sample_id), temperature (the stored signal's), rows, dropped, steps. For each student template (axolotl-chatml,
axolotl-plain): loads the export directory with axolotl's loader (`load_dataset_with_config`, which ends in
`datasets.load_dataset(dir, split="train")`, following the card's configs); builds the dataset's strategy as axolotl's
config loader does (`axolotl.prompt_strategies.load("axolotl.integrations.kd.chat_template", ...)`, i.e.
KDStrategyLoaderV2 → ChatTemplateStrategyWithKDv2; chat_template tokenizer_default, train_on_inputs false, eot_tokens
[<|im_end|>] since the tokenizer's eos is <|endoftext|>, temperature the stored signal's, kd_temperature 1); tokenizes
every row with it; collates them all with DataCollatorForKD (padded to a multiple of 64, as axolotl's KD plugin builds
it); checks the collated batch against the truth (see clients.py); and trains the student `steps` AdamW steps (lr 1e-3)
on that batch with AxolotlKDTrainer.compute_loss: the fused Liger top-k KL (compiled, as the trainer builds it) on the
last hidden state and lm_head, weighted as axolotl's KD example (kd_ce_alpha 0.1, kd_alpha 0.9). Falls back to the
uncompiled kernel, then to axolotl's pure-torch top-k forward KL, and says which ran. Prints one JSON line: per
template its client, layout, figures, failures and seconds.
"""

import copy
import json
import math
import sys
import time
from importlib.metadata import version
from types import SimpleNamespace

import torch
from axolotl.integrations.kd.collator import DataCollatorForKD
from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss
from axolotl.integrations.kd.topk_logprob.forward_kl import loss as topk_forward_kl
from axolotl.integrations.kd.trainer import AxolotlKDTrainer
from axolotl.prompt_strategies import load as load_strategy
from axolotl.utils.data.shared import load_dataset_with_config
from axolotl.utils.dict import DictDefault
from datasets_warnings import with_warnings
from transformers import AutoModelForCausalLM, AutoTokenizer

KD = {"kd_ce_alpha": 0.1, "kd_alpha": 0.9, "kd_temperature": 1.0, "kd_beta": 0.0, "kd_normalize_topk": None}  # axolotl's KD README
KEYS = ["input_ids", "attention_mask", "labels", "target_logprobs", "target_token_ids", "target_mask"]
TEMPLATES = {"axolotl-chatml": ("student", "ChatML student"),
             "axolotl-plain": ("student-plain", "student template with nothing after <|im_end|>")}


def load(ds_cfg: DictDefault):
    """The dataset as axolotl's loader loads a local directory (`load_dataset_with_config`: `load_from_disk`, failing
    that `datasets.load_dataset(dir, split="train")`, which follows the dataset card's configs), and `datasets`'s
    warnings."""
    return with_warnings(load_dataset_with_config, ds_cfg, use_auth_token=False)


def loaded(dataset, warnings: list[str]) -> str:
    return f"axolotl's loader {len(dataset)} rows" + "".join(f" (datasets warns: {w[:160]})" for w in dict.fromkeys(warnings))


def kd_loss_fn(compiled: bool) -> LigerFusedLinearKLTopKLogprobLoss:
    """The loss AxolotlKDTrainer.__init__ builds (compiled is its default, True)."""
    args = SimpleNamespace(**KD)
    return LigerFusedLinearKLTopKLogprobLoss(args.kd_ce_alpha, args.kd_alpha, args.kd_temperature, args.kd_beta or 0.0, compiled=compiled,
                                             compute_ce_loss=bool(args.kd_ce_alpha), normalize_topk=args.kd_normalize_topk)


def train(student: str, batch: dict, steps: int) -> tuple[list[float], str]:
    """`steps` AdamW steps of the student on `batch` with AxolotlKDTrainer's compute_loss; the losses and which loss ran:
    the compiled Liger kernel (the trainer's), else uncompiled, else axolotl's pure-torch top-k forward KL."""
    errors = []
    for name in ("liger compiled", "liger uncompiled", "torch top-k forward KL"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = SimpleNamespace(_kd_loss_fn=kd_loss_fn(name == "liger compiled"))
        losses = []
        try:
            for _ in range(steps):
                if name.startswith("liger"):
                    loss = AxolotlKDTrainer.compute_loss(trainer, model, batch)
                else:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = topk_forward_kl(logits, batch["target_token_ids"], batch["target_logprobs"], batch["target_mask"],
                                           kd_temperature=KD["kd_temperature"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(round(float(loss), 5))
            return losses, name + (f" (after: {'; '.join(errors)})" if errors else "")
        except Exception as error:  # noqa: BLE001 - the next loss is the fallback
            errors.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    return [], "; ".join(errors)


def check(tokenizer, dataset, batch: dict, truth: dict, top_k: int) -> tuple[list[str], dict]:
    """What the collated `batch` gets wrong against the stored signal, and the counts."""
    failures, counts = [], {"aligned": 0, "expected": 0, "max_diff": 0.0, "teacher_unmasked": 0, "teacher_rows": 0,
                            "extra_unmasked": 0, "extra_rows": 0, "extra_taught": set(), "first_row_masked": 0,
                            "earlier_rows": 0, "earlier_tokens": 0}
    mask = batch["target_mask"]
    if not torch.isfinite(batch["target_logprobs"][mask.bool()]).all():
        failures.append("a target logprob is not finite where the mask is 1")
    for b, row in enumerate(dataset):
        stored = truth[row["sample_id"]]
        y, length = stored["completion_ids"], int(batch["attention_mask"][b].sum())
        ids, labels = batch["input_ids"][b, :length].tolist(), batch["labels"][b, :length].tolist()
        start = max((s for s in range(length - len(y) + 1) if ids[s:s + len(y)] == y), default=None)
        if start is None:
            failures.append(f"row {b}: the reply's ids are not in axolotl's input_ids")
            continue
        trained = [p for p, label in enumerate(labels) if label != -100]
        if [p for p in trained if p >= start] != list(range(start, start + len(y))):
            failures.append(f"row {b}: axolotl trains on {tokenizer.convert_ids_to_tokens([ids[p] for p in trained if p >= start])}, "
                            f"the reply is {tokenizer.convert_ids_to_tokens(y)}")
        earlier = [p for p in trained if p < start]  # earlier turns carry `training: false`: axolotl labels none of them
        counts["earlier_rows"] += bool(earlier)
        counts["earlier_tokens"] += len(earlier)
        if earlier:
            failures.append(f"row {b}: axolotl labels {len(earlier)} tokens of earlier turns (their `training: false` unread)")
        counts["first_row_masked"] += int(mask[b, start - 1, 0] == 0)
        for j in range(1, len(y)):
            i = start + j - 1
            expected_lp = torch.log_softmax(torch.tensor(stored["topk_logprobs"][j][:top_k]), -1)
            diff = float((batch["target_logprobs"][b, i] - expected_lp).abs().max())
            counts["expected"] += 1
            counts["max_diff"] = max(counts["max_diff"], diff)
            if (ids[i + 1] == y[j] and batch["target_token_ids"][b, i].tolist() == stored["topk_ids"][j][:top_k]
                    and bool(mask[b, i].all()) and diff <= 1e-4):
                counts["aligned"] += 1
            elif len(failures) < 6:
                failures.append(f"row {b}: reply token {j} ({tokenizer.convert_ids_to_tokens(y[j])!r}) is not at position {i} "
                                f"with its stored row (ids {batch['target_token_ids'][b, i].tolist()} vs {stored['topk_ids'][j][:top_k]}, "
                                f"mask {mask[b, i].tolist()}, logprob diff {diff:.2g})")
        rows = len(row["logprobs"])
        for r in range(rows):
            p = length - rows + r
            unmasked = bool(mask[b, p, 0])
            if r < len(y):
                counts["teacher_rows"] += 1
                counts["teacher_unmasked"] += unmasked
            else:
                counts["extra_rows"] += 1
                counts["extra_unmasked"] += unmasked
                if unmasked:
                    counts["extra_taught"].add(tokenizer.convert_ids_to_tokens(int(batch["target_token_ids"][b, p, 0])))
    counts["extra_taught"] = sorted(counts["extra_taught"])
    return failures, counts


def arm(name: str, config: dict, truth: dict) -> dict:
    began = time.perf_counter()
    model_name, described = TEMPLATES[name]
    student = config["models"][model_name]
    tokenizer = AutoTokenizer.from_pretrained(student)
    documented = config["axolotl_yaml"]  # docs/export.md's YAML: its KD keys, and its dataset entry pointed at this export
    KD.update({key: value for key, value in documented.items() if key in KD})
    cfg = DictDefault({"chat_template": "tokenizer_default", "sequence_len": 512, "train_on_inputs": False,
                       **{key: value for key, value in documented.items() if key not in ("datasets", "plugins")}})
    ds_cfg = DictDefault({**documented["datasets"][0], "path": config["exports"][name], "split": "train",
                          "temperature": config["temperature"]})
    dataset, warned = load(ds_cfg)
    strategy = load_strategy(ds_cfg["type"], tokenizer, cfg, ds_cfg)
    tokenized = [strategy.tokenize_prompt(copy.deepcopy(row)) for row in dataset]
    top_k = len(tokenized[0]["target_logprobs"][-1])
    collator = DataCollatorForKD(tokenizer, padding=True, pad_to_multiple_of=64, return_tensors="pt")
    batch = dict(collator([{key: row[key] for key in KEYS} for row in tokenized]))
    failures, counts = check(tokenizer, dataset, batch, truth, top_k)
    losses, loss_name = train(student, batch, config["steps"])
    if len(losses) != config["steps"] or not all(math.isfinite(loss) for loss in losses):
        failures.append(f"losses {losses} ({loss_name})")
    if len(dataset) != config["rows"] - sum(config["dropped"][name].values()):
        failures.append(f"axolotl's loader gives {len(dataset)} rows, the export {config['rows']} less {config['dropped'][name]}")
    c = counts
    figures = (f"{loaded(dataset, warned)} ({type(strategy).__name__}, top_k {top_k}); {c['aligned']}/{c['expected']} reply tokens "
               f"j>=1 have their stored row at the position before them, unmasked (max |Δ logprob| {c['max_diff']:.1e}); y_0's row "
               f"masked in {c['first_row_masked']}/{len(dataset)} rows; rows on unmasked positions: teacher {c['teacher_unmasked']}/"
               f"{c['teacher_rows']}, added {c['extra_unmasked']}/{c['extra_rows']} (teaching {c['extra_taught']}); earlier turns' labels "
               f"(`training: false`): {c['earlier_tokens']} tokens in {c['earlier_rows']} rows; batch "
               f"{tuple(batch['input_ids'].shape)}; {loss_name} losses {losses}")
    return {"client": f"axolotl {version('axolotl')}", "layout": f"axolotl ({described})", "figures": figures, "failures": failures,
            "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    truth = json.loads(open(config["truth"]).read())["samples"]
    torch.set_num_threads(2)
    result = {}
    for name in TEMPLATES:
        try:
            result[name] = arm(name, config, truth)
        except Exception as error:  # noqa: BLE001 - reported as the arm's failure
            result[name] = {"client": f"axolotl {version('axolotl')}", "layout": f"axolotl ({TEMPLATES[name][1]})", "figures": "",
                            "failures": [f"{type(error).__name__}: {error}"], "seconds": 0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

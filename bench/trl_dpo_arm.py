"""TRL 1.16.0's DPOTrainer on a `dpo` export (the DPO arm of bench/clients.py, which imports `dpo_arm`), run in
bench/.venv-trl (it imports torch, transformers, trl and datasets only; no hub):

    bench/.venv-trl/bin/python bench/trl_dpo_arm.py MODEL_DIR EXPORT_DIR OUTPUT_DIR STEPS

Loads the export with `datasets.load_dataset(EXPORT_DIR, split="train")` (its dataset card's configs), as it is:
DPOTrainer sees a conversational preference dataset (`prompt` a list of {role, content}) and tokenizes each row with
the model's chat template: the prompt with the generation prompt, prompt + chosen and prompt + rejected, the
responses being what follows the prompt; it keeps only those ids (`pair_id` and `margin` are not its columns). Trains
MODEL_DIR for STEPS steps of 2 pairs against a frozen copy of itself (TRL's default reference: the model reloaded from
MODEL_DIR; β 0.1, sigmoid loss), on the CPU in fp32, and prints one JSON line: trl (its version), rows (TRL's dataset
length), steps, seconds (trainer.train() only), per logged step the loss, rewards/margins and rewards/accuracies, and
the prompt, chosen and rejected ids of each row.
"""

import json
import sys
import time

import torch
import trl
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def dpo_arm(model_dir: str, dataset: Dataset, output: str, steps: int) -> dict:
    """DPOTrainer on `dataset` (a `dpo` export as `datasets` loads it); see the module docstring."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=output, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                     use_cpu=True, bf16=False, fp16=False, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    rows = trainer.train_dataset
    return {
        "trl": trl.__version__, "rows": len(rows), "steps": trainer.state.global_step, "seconds": round(seconds, 2),
        "losses": [entry["loss"] for entry in logged], "margins": [entry["rewards/margins"] for entry in logged],
        "accuracies": [entry["rewards/accuracies"] for entry in logged],
        **rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict(),
    }


def main() -> None:
    model_dir, data, output, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(2)
    print(json.dumps(dpo_arm(model_dir, load_dataset(data, split="train"), output, steps)))


if __name__ == "__main__":
    main()

"""The TRL arm of bench/versus_trl.py: TRL's GKDTrainer (trl.experimental.gkd, TRL 1.16.0) on the demo's
models, run in bench/.venv-trl (it imports torch, transformers, trl, datasets and accelerate only):

    bench/.venv-trl/bin/python bench/trl_gkd_arm.py config.json

config.json: student, teacher (checkpoint dirs), prompts (JSONL of {"messages": [user, assistant]}),
output, steps, batch_size, learning_rate, warmup_steps, beta, max_new_tokens, seed. Trains the student,
saves it to output (safetensors, with the student's own tokenizer) and writes output/result.json:
steps, seconds (trainer.train() only) and completion_tokens.

The character tokenizer has no chat template; TRL's collator renders messages with one. The copy
given to TRL gets the template `<bos>` + user content (+ assistant content + `<eos>`), which its
collator tokenizes without special tokens: the prompt ids are those of tokenizer(prompt,
add_special_tokens=True), as the project renders a raw prompt (asserted on the first prompt).

Completion tokens: each on-policy batch's generated tokens up to and including the first <eos> (or
all max_new_tokens), i.e. the positions GKDTrainer's loss is taken over (labels ≠ -100).
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
            "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


class CountingGKDTrainer(GKDTrainer):
    completion_tokens = 0

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        input_ids, attention_mask, labels = super().generate_on_policy_outputs(model, inputs, generation_config)
        self.completion_tokens += int((labels != -100).sum())
        return input_ids, attention_mask, labels


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(config["student"])
    tokenizer.save_pretrained(config["output"])  # the student's tokenizer as it came, without the template
    tokenizer.chat_template = TEMPLATE
    student = AutoModelForCausalLM.from_pretrained(config["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(config["teacher"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=config["prompts"], split="train")
    args = GKDConfig(
        output_dir=config["output"], max_steps=config["steps"], per_device_train_batch_size=config["batch_size"],
        gradient_accumulation_steps=1, learning_rate=config["learning_rate"], warmup_steps=config["warmup_steps"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, adam_beta2=0.98,
        weight_decay=0.01, max_grad_norm=1.0, lmbda=1.0, beta=config["beta"], temperature=1.0,
        max_new_tokens=config["max_new_tokens"], seq_kd=False, train_sampling_strategy="sequential", seed=config["seed"],
        use_cpu=True, bf16=False, fp16=False, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer)
    first = dataset[0]["messages"][0]["content"]
    assert trainer.data_collator([dataset[0]])["prompts"][0].tolist() == tokenizer(first, add_special_tokens=True)["input_ids"]
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    trainer.model.save_pretrained(config["output"], safe_serialization=True)
    result = {"steps": trainer.state.global_step, "seconds": seconds, "completion_tokens": trainer.completion_tokens}
    (Path(config["output"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

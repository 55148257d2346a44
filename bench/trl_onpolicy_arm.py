"""The TRL arms of bench/versus_trl.py: TRL 1.16.0's on-policy trainers on the demo's models, run in
bench/.venv-trl (it imports torch, transformers, trl, datasets and accelerate only):

    bench/.venv-trl/bin/python bench/trl_onpolicy_arm.py config.json

config.json: trainer ("distillation": trl.DistillationTrainer, the maintained one; "gkd":
trl.experimental.gkd.GKDTrainer), student, teacher (checkpoint dirs), prompts (JSONL of
{"prompt": text, "messages": [user, assistant]}), output, steps, batch_size, learning_rate,
warmup_steps, beta, max_new_tokens, seed. Trains the student, saves it to output (safetensors, with
the student's own tokenizer) and writes output/result.json: steps, seconds (trainer.train() only) and
completion_tokens.

Both take the prompts in the file's order (no shuffle), sample every batch from the student (GKD:
lmbda 1), fp32 on the CPU without gradient checkpointing (DistillationConfig turns it and bf16 on by
default). DistillationTrainer reads the plain `prompt`, which its tokenizer renders with special
tokens, i.e. <bos> + prompt, as the project renders a raw prompt. GKDTrainer's collator renders
`messages` with a chat template; the character tokenizer has none, so the copy given to GKDTrainer gets
`<bos>` + user content (+ assistant content + `<eos>`), which its collator tokenizes without special
tokens. Both renderings are asserted equal to tokenizer(prompt, add_special_tokens=True) on the first
prompt.

Completion tokens: each on-policy batch's generated tokens up to and including the first <eos> (or all
max_new_tokens), i.e. the positions each loss is taken over.
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, DistillationTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
            "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


class CountingGKDTrainer(GKDTrainer):
    completion_tokens = 0

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        input_ids, attention_mask, labels = super().generate_on_policy_outputs(model, inputs, generation_config)
        self.completion_tokens += int((labels != -100).sum())
        return input_ids, attention_mask, labels


class CountingDistillationTrainer(DistillationTrainer):
    completion_tokens = 0

    def _generate(self, prompts):
        prompt_ids, completion_ids, *rest = super()._generate(prompts)
        self.completion_tokens += sum(len(ids) for ids in completion_ids)  # cut after the first <eos>, which is kept
        return prompt_ids, completion_ids, *rest


def shared_arguments(config: dict) -> dict:
    """The TrainingArguments both trainers take alike: the schedule, optimizer and precision of our arm."""
    return dict(output_dir=config["output"], max_steps=config["steps"], per_device_train_batch_size=config["batch_size"],
                gradient_accumulation_steps=1, learning_rate=config["learning_rate"], warmup_steps=config["warmup_steps"],
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, adam_beta2=0.98,
                weight_decay=0.01, max_grad_norm=1.0, beta=config["beta"], temperature=1.0, seed=config["seed"],
                use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_strategy="no",
                save_strategy="no", report_to="none", disable_tqdm=True)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(config["student"])
    tokenizer.save_pretrained(config["output"])  # the student's tokenizer as it came, without the template
    student = AutoModelForCausalLM.from_pretrained(config["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(config["teacher"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=config["prompts"], split="train")
    first = dataset[0]["prompt"]
    expected = tokenizer(first, add_special_tokens=True)["input_ids"]
    if config["trainer"] == "gkd":
        tokenizer.chat_template = TEMPLATE
        args = GKDConfig(**shared_arguments(config), lmbda=1.0, max_new_tokens=config["max_new_tokens"], seq_kd=False,
                         train_sampling_strategy="sequential")
        trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset.remove_columns("prompt"),
                                     processing_class=tokenizer)
        assert trainer.data_collator([{"messages": dataset[0]["messages"]}])["prompts"][0].tolist() == expected
    else:
        args = DistillationConfig(**shared_arguments(config), max_completion_length=config["max_new_tokens"], top_k=0, top_p=1.0,
                                  shuffle_dataset=False)
        trainer = CountingDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                              train_dataset=dataset.remove_columns("messages"), processing_class=tokenizer)
        assert trainer._tokenize_prompts([first])[0][0] == expected
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    trainer.model.save_pretrained(config["output"], safe_serialization=True)
    result = {"steps": trainer.state.global_step, "seconds": seconds, "completion_tokens": trainer.completion_tokens}
    (Path(config["output"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

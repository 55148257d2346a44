"""Greedy exact match of a model on a task's problems."""

import torch

from training.tasks.arithmetic import Problem, verify


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def exact_match(model, tokenizer, problems: list[Problem], max_new_tokens: int = 96) -> float:
    """Share of problems whose greedy completion ends in `#### <the right answer>`."""
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    return sum(verify(c, p.answer) for c, p in zip(completions, problems)) / len(problems)

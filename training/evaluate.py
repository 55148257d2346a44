"""Evaluation: exact match (greedy and sampled) and the teacher–student divergence on the
student's own samples."""

import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.engines.base import SamplingParams
from training.engines.hf import HFEngine
from training.kd import Objective, dense_kd_loss, sparse_positions
from training.tasks.arithmetic import Problem, verify, verify_column


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


@torch.no_grad()
def evaluate(student, tokenizer, prompts: list[str], answers: list[str], teacher=None, seed: int = 0,
             max_new_tokens: int = 96) -> dict[str, float]:
    """greedy_exact_match, sampled_exact_match (temperature 1), and, given a teacher, the mean
    per-token reverse KL(q‖p) of teacher p and student q on the student's own samples."""
    engine = HFEngine(student, tokenizer, batch_size=256)
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_column = pa.array(answers, pa.string())
    metrics = {}
    for name, temperature in [("greedy_exact_match", 0.0), ("sampled_exact_match", 1.0)]:
        generations = engine.generate(prompt_ids, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
        correct = verify_column(pa.array([g.text for g in generations], pa.string()), answer_column)
        metrics[name] = pc.mean(pc.cast(correct, pa.float64())).as_py()
    if teacher is not None:
        rows = pa.table({
            "prompt_token_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
            "completion_token_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
        })
        input_ids, attention_mask, rows_index, positions, targets = sparse_positions(rows, tokenizer.pad_token_id)
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        _, parts = dense_kd_loss(student_logits, teacher_logits, rows_index, positions, targets, Objective("reverse_kl"))
        metrics["reverse_kl_on_student_samples"] = parts["divergence"]
    return metrics

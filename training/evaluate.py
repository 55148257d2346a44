"""Evaluation: exact match (greedy and sampled) under the task's verifier, and the teacher–student
divergence on the student's own samples; one path for every model and every asset."""

import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.batches import completion_positions
from training.chat import render
from training.engines.base import Generation, SamplingParams
from training.engines.hf import HFEngine
from training.kd import LossSettings, dense_kd_loss
from training.models import load_model
from training.tasks import Task

EVAL_BATCH_SIZE = 256


def _verified(engine: HFEngine, prompt_ids: list[list[int]], answers: pa.Array, task: Task, temperature: float, seed: int,
              max_new_tokens: int) -> tuple[float | None, list[Generation]]:
    """One completion per prompt and the share the task verifies (None when no prompt has a
    reference answer); returns (share, completions)."""
    generations = engine.generate(prompt_ids, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    correct = task.verify(pa.array([g.text for g in generations], pa.string()), answers)
    return pc.mean(pc.cast(correct, pa.float64())).as_py(), generations


def exact_match(model, tokenizer, prompts: pa.Table, task: Task, temperature: float = 0.0, seed: int = 0,
                max_new_tokens: int = 96) -> float | None:
    """Share of `prompts` (prompt, answer) whose completion the task verifies (greedy at T = 0)."""
    engine = HFEngine(model, tokenizer, batch_size=EVAL_BATCH_SIZE)
    return _verified(engine, render(tokenizer, prompts), prompts["answer"], task, temperature, seed, max_new_tokens)[0]


@torch.no_grad()
def evaluate(student, tokenizer, prompts: pa.Table, task: Task, teacher=None, seed: int = 0,
             max_new_tokens: int = 96) -> dict[str, float]:
    """greedy_exact_match, sampled_exact_match (temperature 1), and, given a teacher, the mean
    per-token reverse KL(q‖p) of teacher p and student q on the student's own samples."""
    engine = HFEngine(student, tokenizer, batch_size=EVAL_BATCH_SIZE)
    prompt_ids = render(tokenizer, prompts)
    metrics = {}
    for name, temperature in [("greedy_exact_match", 0.0), ("sampled_exact_match", 1.0)]:
        metrics[name], generations = _verified(engine, prompt_ids, prompts["answer"], task, temperature, seed, max_new_tokens)
    if teacher is not None:
        input_ids, attention_mask, rows, positions, targets = completion_positions(
            pa.array(prompt_ids, pa.list_(pa.int32())), pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
            tokenizer.pad_token_id,
        )
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        _, parts = dense_kd_loss(student_logits, teacher_logits, rows, positions, targets, LossSettings(divergence="reverse_kl"))
        metrics["reverse_kl_on_student_samples"] = parts["divergence"]
    return metrics


def evaluate_checkpoints(cards: dict[str, dict], teacher_card: dict, prompts: pa.Table, task: Task, seed: int = 0,
                         log=print) -> dict[str, dict[str, float]]:
    """`evaluate` for each named model card; every model but the teacher itself also gets its
    reverse KL to the teacher on its own samples. Returns name → metrics."""
    teacher, teacher_tokenizer = load_model(teacher_card["path"], teacher_card.get("revision"))
    results = {}
    for name, card in cards.items():
        if card["weights_hash"] == teacher_card["weights_hash"]:  # the teacher itself: no divergence to itself
            results[name] = evaluate(teacher, teacher_tokenizer, prompts, task, None, seed)
        else:
            model, tokenizer = load_model(card["path"], card.get("revision"))
            results[name] = evaluate(model, tokenizer, prompts, task, teacher, seed)
        log(f"{name}: {results[name]}")
    return results

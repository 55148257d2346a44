"""Evaluation: one path for every model and every asset.

Task metrics (None when no eval prompt has a reference answer):
    greedy_exact_match, sampled_exact_match (T = 1)       the share the task verifies
Task-free metrics, against the teacher p (each model q renders the prompts with its own template):
    reverse_kl_on_student_samples         mean over tokens y_t ~ q of KL(q‖p)(· | x, y_<t)
    teacher_logprob_on_student_samples    mean over tokens y_t ~ q of log p(y_t | x, y_<t)
    forward_kl_on_teacher_samples         mean over tokens y_t ~ p of KL(p‖q)(· | x, y_<t)
    student_nll_on_teacher_samples        mean over tokens y_t ~ p of −log q(y_t | x, y_<t)
The teacher's samples (T = 1, seeded) are held-out teacher responses, drawn once per evaluation.
"""

import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.engines.base import Generation
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.models.batches import completion_positions
from training.models.chat import render
from training.models.checkpoints import load_model
from training.schema.cards import ModelCard
from training.tasks import Task
from training.trainer.divergences import forward_kl, reverse_kl
from training.trainer.losses import nll, student_logprobs_at

EVAL_BATCH_SIZE = 256


def _verified(engine: HFEngine, prompt_ids: list[list[int]], answers: pa.Array, task: Task, temperature: float, seed: int,
              max_new_tokens: int) -> tuple[float | None, list[Generation]]:
    """One completion per prompt and the share the task verifies (None when no prompt has a
    reference answer); returns (share, completions)."""
    generations = engine.generate(prompt_ids, Sampling(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
    correct = task.verify(pa.array([g.text for g in generations], pa.string()), answers)
    return pc.mean(pc.cast(correct, pa.float64())).as_py(), generations


def exact_match(model, tokenizer, prompts: pa.Table, task: Task, temperature: float = 0.0, seed: int = 0) -> float | None:
    """Share of `prompts` (prompt, answer) whose completion the task verifies (greedy at T = 0)."""
    engine = HFEngine(model, tokenizer, batch_size=EVAL_BATCH_SIZE)
    return _verified(engine, render(tokenizer, prompts), prompts["answer"], task, temperature, seed, task.completion_tokens)[0]


def completion_logprobs(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_token_id: int):
    """log softmax of `model` at every completion position of prompt ⊕ completion: (N, V), and the N targets."""
    input_ids, attention_mask, rows, positions, targets = completion_positions(
        pa.array(prompt_ids, pa.list_(pa.int32())), pa.array(completions, pa.list_(pa.int32())), pad_token_id
    )
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return student_logprobs_at(logits, rows.to(device), positions.to(device)), targets.to(device)


@torch.no_grad()
def _against_teacher(student, tokenizer, teacher, teacher_tokenizer, student_ids: list[list[int]], teacher_ids: list[list[int]],
                     completions: list[list[int]], sampled_by_student: bool) -> dict[str, float]:
    """Per-token means over `completions` (sampled by the student, else by the teacher) of the
    metrics in the module docstring, each model on its own rendering of the prompts, in batches of
    EVAL_BATCH_SIZE sequences."""
    sums, tokens = {"divergence": 0.0, "logprob": 0.0}, 0
    for start in range(0, len(completions), EVAL_BATCH_SIZE):
        batch = slice(start, start + EVAL_BATCH_SIZE)
        log_q, targets = completion_logprobs(student, student_ids[batch], completions[batch], tokenizer.pad_token_id)
        log_p, _ = completion_logprobs(teacher, teacher_ids[batch], completions[batch], teacher_tokenizer.pad_token_id)
        if sampled_by_student:
            sums["divergence"] += reverse_kl(log_p, log_q).sum().item()
            sums["logprob"] += -nll(log_p, targets).sum().item()
        else:
            sums["divergence"] += forward_kl(log_p, log_q).sum().item()
            sums["logprob"] += nll(log_q, targets).sum().item()
        tokens += len(targets)
    names = (("reverse_kl_on_student_samples", "teacher_logprob_on_student_samples") if sampled_by_student
             else ("forward_kl_on_teacher_samples", "student_nll_on_teacher_samples"))
    return {name: sums[part] / max(1, tokens) for name, part in zip(names, ("divergence", "logprob"))}


def teacher_samples(teacher, teacher_tokenizer, prompts: pa.Table, seed: int = 0, max_new_tokens: int = 96) -> list[list[int]]:
    """Held-out teacher responses: one sample (T = 1) per eval prompt."""
    engine = HFEngine(teacher, teacher_tokenizer, batch_size=EVAL_BATCH_SIZE)
    params = Sampling(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    return [g.completion_ids for g in engine.generate(render(teacher_tokenizer, prompts), params)]


@torch.no_grad()
def evaluate(student, tokenizer, prompts: pa.Table, task: Task, teacher=None, seed: int = 0, max_new_tokens: int | None = None,
             teacher_tokenizer=None, teacher_responses: list[list[int]] | None = None) -> dict[str, float]:
    """The task metrics, and given a teacher the task-free ones (see the module docstring);
    `teacher_responses` are the teacher's samples, drawn here when not given; completions get
    `max_new_tokens`, by default the task's `completion_tokens`."""
    max_new_tokens = max_new_tokens or task.completion_tokens
    engine = HFEngine(student, tokenizer, batch_size=EVAL_BATCH_SIZE)
    prompt_ids = render(tokenizer, prompts)
    metrics = {}
    for name, temperature in [("greedy_exact_match", 0.0), ("sampled_exact_match", 1.0)]:
        metrics[name], generations = _verified(engine, prompt_ids, prompts["answer"], task, temperature, seed, max_new_tokens)
    if teacher is not None:
        teacher_tokenizer = teacher_tokenizer or tokenizer
        if teacher_responses is None:
            teacher_responses = teacher_samples(teacher, teacher_tokenizer, prompts, seed, max_new_tokens)
        own = [g.completion_ids for g in generations]
        teacher_ids = render(teacher_tokenizer, prompts)
        for completions, sampled_by_student in [(own, True), (teacher_responses, False)]:
            metrics.update(_against_teacher(student, tokenizer, teacher, teacher_tokenizer, prompt_ids, teacher_ids, completions,
                                            sampled_by_student))
    return metrics


def evaluate_checkpoints(cards: dict[str, ModelCard], teacher_card: ModelCard, prompts: pa.Table, task: Task, seed: int = 0,
                         log=print) -> dict[str, dict[str, float]]:
    """`evaluate` for each named model card; every model but the teacher itself (and a student of
    another tokenizer, whose tokens the teacher's do not meet one to one) also gets the task-free
    metrics against the teacher, on one set of teacher samples. Returns name → metrics."""
    teacher, teacher_tokenizer = load_model(teacher_card.path, teacher_card.revision)
    responses = None
    results = {}
    for name, card in cards.items():
        if card.weights_hash == teacher_card.weights_hash:  # the teacher itself: no divergence to itself
            results[name] = evaluate(teacher, teacher_tokenizer, prompts, task, None, seed)
        elif card.tokenizer_hash != teacher_card.tokenizer_hash:  # per-token divergences need one tokenizer: the task's only
            results[name] = evaluate(*load_model(card.path, card.revision), prompts, task, None, seed)
        else:
            responses = responses or teacher_samples(teacher, teacher_tokenizer, prompts, seed)
            model, tokenizer = load_model(card.path, card.revision)
            results[name] = evaluate(model, tokenizer, prompts, task, teacher, seed, teacher_tokenizer=teacher_tokenizer,
                                     teacher_responses=responses)
        log(f"{name}: {results[name]}")
    return results

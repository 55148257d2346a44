"""The engine interface every backend implements: `generate` and `score`, on token ids.

Token ids go in and out (never decoded strings, which are lossy), so the transformers, vLLM and
OpenAI-compatible backends are interchangeable and their stored results comparable.
"""

from dataclasses import dataclass
from typing import Protocol

from training.engines.sampling import Sampling
from training.schema.signal import SparseSignal


@dataclass
class Generation:
    """One sampled completion of prompt `prompt_index`; `sample_index` counts its n samples."""

    prompt_index: int
    sample_index: int
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an end-of-turn id, which completion_ids includes, or a stop string) or "length"
    signal: SparseSignal | None = None  # the sparse signal of the completion, when generate was asked for logprobs


def shortest_prefix(tokenizer, ids: list[int], reaches) -> int | None:
    """The fewest of `ids` whose decoded text satisfies `reaches(text)` (a property that, once true,
    stays true for longer prefixes), or None when all of them do not: a binary search, a few decodes."""
    def decoded(n: int) -> bool:
        return reaches(tokenizer.decode(ids[:n], skip_special_tokens=True))

    if not decoded(len(ids)):
        return None
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if decoded(middle) else (middle + 1, high)
    return low


def stop_string_end(tokenizer, ids: list[int], stop: list[str]) -> int | None:
    """How many of `ids` it takes for the decoded text to contain a stop string (the completing token
    included), or None."""
    end = shortest_prefix(tokenizer, ids, lambda text: any(s in text for s in stop)) if stop else None
    return None if end is None else max(end, 1)  # the completing token is at least the first


class EngineRequestsFailed(RuntimeError):
    """Some items of a batch failed after their retries; `completed` maps item index → result for the
    rest, so a cache can keep them and a re-run only redoes the failed ones."""

    def __init__(self, failed: int, total: int, first_error: str, completed: dict):
        super().__init__(f"{failed} of {total} items failed after retries; the first error: {first_error}")
        self.failed, self.total, self.completed = failed, total, completed


class Engine(Protocol):
    """A loaded model behind one of the backends: a teacher (labeling, scoring) or a student (rollouts).

    Logprobs are raw model logprobs (before any sampling processor): log_softmax(logits / T).
    """

    backend: str  # "hf", "vllm" or "openai"
    tokenizer: object
    end_of_turn_ids: list[int]  # generation stops at each (`training.models.end_of_turn_ids`)
    context_length: int  # the most tokens prompt + completion may have

    def check_signal(self, k: int, temperature: float) -> None:
        """Raises, before any work, if this engine cannot return the top-k signal at `temperature`."""

    def generate(self, prompt_ids: list[list[int]], params: Sampling, logprobs: int = 0) -> list[Generation]:
        """n completions per prompt, ordered by (prompt_index, sample_index); with logprobs=k each
        carries the top-k signal (temperature 1) of its own tokens."""

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        """The sparse signal of p(· | prompt, completion_<t) at every completion position t."""

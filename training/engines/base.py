"""The engine interface every backend implements: `generate` and `score`, on token ids.

Token ids go in and out (never decoded strings, which are lossy), so the transformers, vLLM and
OpenAI-compatible backends are interchangeable and their stored results comparable.
"""

from dataclasses import dataclass
from typing import Protocol

from training.signal import SparseSignal


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be ≥ 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")


@dataclass
class Generation:
    """One sampled completion of prompt `prompt_index`; `sample_index` counts its n samples."""

    prompt_index: int
    sample_index: int
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" (ended with <eos>, which completion_ids includes) or "length"


class Engine(Protocol):
    """A loaded model behind one of the backends."""

    tokenizer: object
    context_length: int  # the most tokens prompt + completion may have

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]:
        """n completions per prompt, ordered by (prompt_index, sample_index)."""

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        """The sparse signal of p(· | prompt, completion_<t) at every completion position t."""

"""The `none` task: prompts without reference answers or a verifier (free-form questions).

Nothing is judged correct or wrong (`correct` and `reward` stay null); a written input is the first
line of the teacher's output; synthesis needs configured topics.
"""

import pyarrow as pa

from training.tasks.instructions import SELF_INSTRUCT, Instruction, first_line


class NoReferenceTask:
    name = "none"
    templates = SELF_INSTRUCT
    completion_tokens = 96

    def prompts(self, split: str, n: int, seed: int) -> pa.Table:
        raise ValueError(f"task {self.name!r} has no generated prompts: set source 'files' or 'datasets'")

    def verify(self, completions: pa.Array, answers: pa.Array) -> pa.Array:
        return pa.nulls(len(completions), pa.bool_())

    def first_error(self, prompt: str, completion: str) -> int | None:
        return None

    def written_input(self, text: str) -> tuple[str, str | None] | None:
        line = first_line(text)
        return (line, None) if line else None

    def can_evolve(self, prompt: str) -> bool:
        return True

    def default_topics(self) -> dict[str, float]:
        return {}

    def following_report(self, instructions: list[Instruction], written: list[str | None], seeds: list[str]) -> dict:
        return {}

"""What the teacher is asked to write (expansion, evolution, synthesis) and how the request is
phrased: the types every task and the dataset builders share (`training/data/expansion.py` uses them)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Templates:
    """How instructions are written. `expand` has `{demonstrations}` (each one `demonstration`, with
    `{index}` and `{prompt}`) and `{next_index}`; `evolve` has `{seed}`; `synthesize` has `{topic}`."""

    expand: str
    demonstration: str
    evolve: str
    synthesize: str

    def expand_text(self, demonstrations: list[str]) -> str:
        shown = "".join(self.demonstration.format(index=i + 1, prompt=d) for i, d in enumerate(demonstrations))
        return self.expand.format(demonstrations=shown, next_index=len(demonstrations) + 1)


@dataclass
class Instruction:
    """One request to the teacher: the text, the operator, and what it was built from."""

    text: str
    operator: str  # "expand", "evolve" or "synthesize"
    parents: list[int]  # seed rows used (demonstrations or the evolved seed); empty for synthesis
    topic: str | None = None


# for instruction-following teachers: Self-Instruct's task-generation prompt, Evol-Instruct's in-depth
# rewriting prompt, and an UltraChat-style question prompt for a topic (a task may bring its own)
SELF_INSTRUCT = Templates(
    expand="Come up with a series of tasks:\n{demonstrations}Task {next_index}:",
    demonstration="Task {index}: {prompt}\n",
    evolve=(
        "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more "
        "complex version that famous AI systems find harder to handle, but that humans still understand and "
        "can answer. Add one more constraint or requirement, or increase the reasoning steps it needs. The "
        "rewritten prompt must be self-contained and should not add more than 20 words.\n"
        "#The Given Prompt#:\n{seed}\n#Rewritten Prompt#:\n"
    ),
    synthesize="Write one new, self-contained question about {topic}. Write only the question.\nQuestion:",
)


def first_line(text: str) -> str | None:
    """A written input: the first non-empty line of the output, stripped."""
    lines = [line.strip() for line in text.strip().split("\n")]
    return lines[0] if lines and lines[0] else None

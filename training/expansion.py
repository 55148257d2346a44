"""Expansion and synthesis: the teacher writes new inputs (Xu et al. 2024, §3.1).

    expansion   x ~ p_T(x | I ⊕ c)   I an instruction template, c demonstrations drawn from the seeds
                                     (Self-Instruct), or one seed to rewrite harder (Evol-Instruct)
    synthesis   x ~ p_T(x | I ⊕ m)   m meta-information: a topic or skill (UltraChat, Phi)

`write_inputs` samples the teacher's continuations and parses each into an input: its first line,
stripped, or what the task's validator accepts when the task has one. Outputs that do not parse
are counted and dropped. The kept inputs are then labeled like any prompt (`training.labeling.label`).
"""

import random
from dataclasses import dataclass
from typing import Callable

from training.engines.base import Engine, SamplingParams
from training.labeling import sample


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


TEMPLATES = {
    # the instruction language the embedded teacher is trained on (training.tasks.arithmetic_instructions)
    "embedded": Templates(
        expand="[expand] {demonstrations} >", demonstration="{prompt};", evolve="[evolve] {seed} >", synthesize="[{topic}] >"
    ),
    # for instruction-following teachers: Self-Instruct's task-generation prompt, Evol-Instruct's
    # in-depth rewriting prompt, and an UltraChat-style question prompt for a topic
    "self_instruct": Templates(
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
    ),
}


@dataclass
class Instruction:
    """One request to the teacher: the text, the operator, and what it was built from."""

    text: str
    operator: str  # "expand", "evolve" or "synthesize"
    parents: list[int]  # seed rows used (demonstrations or the evolved seed); empty for synthesis
    topic: str | None = None


def expansion_instructions(rng: random.Random, seeds: list[str], n: int, demonstrations: int, templates: Templates):
    """`n` Self-Instruct requests, each with `demonstrations` seeds drawn without replacement."""
    if len(seeds) < demonstrations:
        raise ValueError(f"{len(seeds)} seed prompts are fewer than demonstrations={demonstrations}; lower it")
    out = []
    for _ in range(n):
        chosen = rng.sample(range(len(seeds)), demonstrations)
        out.append(Instruction(templates.expand_text([seeds[s] for s in chosen]), "expand", chosen))
    return out


def evolution_instructions(seeds: list[str], rows: list[int], templates: Templates):
    """One Evol-Instruct request per chosen seed row."""
    return [Instruction(templates.evolve.format(seed=seeds[r]), "evolve", [r]) for r in rows]


def synthesis_instructions(rng: random.Random, topics: dict[str, float], n: int, templates: Templates):
    """`n` requests, topics drawn in proportion to their weights."""
    names = list(topics)
    drawn = rng.choices(names, weights=[topics[t] for t in names], k=n)
    return [Instruction(templates.synthesize.format(topic=t), "synthesize", [], t) for t in drawn]


def first_line(text: str) -> str | None:
    """A written input: the first non-empty line of the output, stripped."""
    lines = [line.strip() for line in text.strip().split("\n")]
    return lines[0] if lines and lines[0] else None


def write_inputs(
    engine: Engine, instructions: list[Instruction], sampling: SamplingParams, parse: Callable[[str], str | None] = first_line
) -> list[str | None]:
    """The teacher writes one input per instruction; `parse` maps its output to an input, or to None
    when the output is not one (counted by the caller and dropped)."""
    if sampling.n != 1:
        raise ValueError("write one input per instruction (n=1); ask for more instructions instead")
    if not instructions:
        return []
    written, too_long, _ = sample(engine, [i.text for i in instructions], sampling, "drop")
    if too_long:
        raise ValueError(
            f"{too_long} instructions do not fit the teacher's context with max_new_tokens={sampling.max_new_tokens}: "
            "use fewer demonstrations or shorter templates"
        )
    return [parse(text) for text in written["completion"].to_pylist()]

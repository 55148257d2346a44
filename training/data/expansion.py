"""Expansion and synthesis: the teacher writes new inputs (Xu et al. 2024, §3.1).

    expansion   x ~ p_T(x | I ⊕ c)   I an instruction template, c demonstrations drawn from the seeds
                                     (Self-Instruct), or one seed to rewrite harder (Evol-Instruct)
    synthesis   x ~ p_T(x | I ⊕ m)   m meta-information: a topic or skill (UltraChat, Phi)

`write_inputs` samples the teacher's continuations; `written_prompts` keeps those the task accepts
as inputs (`Task.written_input`: for the embedded task a well-formed problem, with its reference
answer computed; otherwise the first line). Outputs that do not parse are counted and dropped. The
kept inputs are then labeled like any prompt (`training.labeling.label_table`).
"""

import dataclasses
import random
from typing import TYPE_CHECKING

import pyarrow as pa

from training.data.labeling import sample
from training.engines.base import Engine
from training.engines.sampling import Sampling
from training.models.chat import with_conversation_columns
from training.schema.tables import with_content_id
from training.tasks.instructions import SELF_INSTRUCT, Instruction, Templates

if TYPE_CHECKING:
    from training.tasks import Task

ORIGIN = {"expand": "expanded", "evolve": "evolved", "synthesize": "synthesized"}  # the `origin` of a written row


def templates_for(task: "Task", preset: str, **overrides: str | None) -> Templates:
    """The instruction templates: the task's own (`preset` "task") or Self-Instruct's, with any
    configured template in place of the preset's."""
    base = task.templates if preset == "task" else SELF_INSTRUCT
    return dataclasses.replace(base, **{name: text for name, text in overrides.items() if text is not None})


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


def instruction_table(instructions: list[Instruction], seeds: list[str]) -> pa.Table:
    """Instructions as rows (instruction_index, text, operator, parent_prompts, topic): what a shard
    of the writing work reads (`instructions_of` turns a shard back into instructions and seeds)."""
    return pa.table({
        "instruction_index": pa.array(range(len(instructions)), pa.int32()),
        "text": pa.array([i.text for i in instructions], pa.string()),
        "operator": pa.array([i.operator for i in instructions], pa.string()),
        "parent_prompts": pa.array([[seeds[p] for p in i.parents] for i in instructions], pa.list_(pa.string())),
        "topic": pa.array([i.topic for i in instructions], pa.string()),
    })


def instructions_of(rows: pa.Table) -> tuple[list[Instruction], list[str]]:
    """(instructions, the seeds they name, numbered within the shard) from rows of `instruction_table`."""
    instructions, seeds = [], []
    for row in rows.to_pylist():
        instructions.append(Instruction(row["text"], row["operator"], list(range(len(seeds), len(seeds) + len(row["parent_prompts"]))),
                                        row["topic"]))
        seeds += row["parent_prompts"]
    return instructions, seeds


def write_inputs(engine: Engine, instructions: list[Instruction], sampling: Sampling) -> list[str]:
    """The teacher's raw output for each instruction, one sample each."""
    if sampling.n != 1:
        raise ValueError("write one input per instruction (n=1); ask for more instructions instead")
    if not instructions:
        return []
    written, too_long, _ = sample(engine, pa.table({"prompt": [i.text for i in instructions]}), sampling, "drop")
    if too_long:
        raise ValueError(
            f"{too_long} instructions do not fit the teacher's context with max_new_tokens={sampling.max_new_tokens}: "
            "use fewer demonstrations or shorter templates"
        )
    return written["completion"].to_pylist()


def written_prompts(instructions: list[Instruction], outputs: list[str], seeds: list[str], task: "Task",
                    system_prompt: str | None = None, first_index: int = 0) -> tuple[pa.Table, dict]:
    """The valid inputs among the teacher's outputs, as a prompt table (prompt_id, prompt, messages,
    system_prompt (the seeds'), answer, origin, instruction, instruction_index, parent_prompts,
    topic; `task.written_input` decides validity and the reference answer), and the report:
    instructions, unparsed outputs, and how well the outputs follow their instructions. The
    instructions are numbered from `first_index` (where a shard of them starts)."""
    parsed = [task.written_input(text) for text in outputs]
    kept = [i for i, found in enumerate(parsed) if found is not None]
    if not kept:
        raise ValueError(f"none of the teacher's {len(instructions)} outputs is a valid input: check the templates and the teacher")
    prompts = with_conversation_columns(pa.table({"prompt": pa.array([parsed[i][0] for i in kept], pa.string())}), system_prompt)
    prompts = pa.table({
        **{name: prompts[name] for name in prompts.column_names},
        "answer": pa.array([parsed[i][1] for i in kept], pa.string()),
        "origin": pa.array([ORIGIN[instructions[i].operator] for i in kept], pa.string()),
        "instruction": pa.array([instructions[i].text for i in kept], pa.string()),
        "instruction_index": pa.array([first_index + i for i in kept], pa.int32()),
        "parent_prompts": pa.array([[seeds[p] for p in instructions[i].parents] for i in kept], pa.list_(pa.string())),
        "topic": pa.array([instructions[i].topic for i in kept], pa.string()),
    })
    written = [found[0] if found else None for found in parsed]
    report = {"instructions": len(instructions), "unparsed_outputs": len(instructions) - len(kept),
              **task.following_report(instructions, written, seeds)}
    prompts = with_content_id(prompts, "prompt_id", ["prompt", "messages", "system_prompt"])
    return prompts.select(["prompt_id", *prompts.column_names[:-1]]), report

r"""Tasks: what "correct" means for a set of prompts, and what the teacher may write for it.

A `Task` is chosen by name: the `task` setting of `seed_prompts` and `eval_set`, stored in their
`task` column, so that every asset downstream reads it from its data. `get_task(name)` returns it.

    arithmetic   the embedded task: worked multi-digit arithmetic, `#### <number>`, exact verifier,
                 and the embedded teacher's instruction language for writing new problems
    arithmetic_chain  four dependent additions and subtractions per problem, 193 tokens of steps
                 on average, where one wrong step derails the rest (GKD's setting for on-policy gains)
    none         prompts without a verifier (free-form questions): `correct` stays null

and for prompts with reference answers, from files or datasets (answers.py):

    gsm8k            the number after the first `#### `, commas, `$` and trailing zeros aside
    boxed            the content of the last `\boxed{...}`, LaTeX spacing and `\left`/`\right` aside
    exact            the whole completion, case and runs of whitespace aside
    regex:<pattern>  the group `answer` of the pattern's first match, as `exact`
    module:function  the user's `function(completion, reference) -> bool | float` (≥ 0.5 is correct)

A new task is one module with a class that implements `Task`, and one line in `TASKS`.
"""

from typing import Protocol

import pyarrow as pa

from training.tasks.answers import BoxedTask, ExactTask, FunctionTask, GSM8KTask, RegexTask
from training.tasks.arithmetic_task import ArithmeticChainTask, ArithmeticTask
from training.tasks.instructions import Instruction, Templates
from training.tasks.no_reference import NoReferenceTask


class Task(Protocol):
    name: str
    templates: Templates  # how instructions to write new inputs are phrased (`templates: task`)
    completion_tokens: int  # the tokens an eval completion may take: a whole solution, with room

    def prompts(self, split: str, n: int, seed: int) -> pa.Table:
        """`n` generated (prompt, answer) rows of `split` ("train" or "eval"); tasks without a
        generator raise, naming the settings that load prompts from files or datasets."""

    def verify(self, completions: pa.Array, answers: pa.Array) -> pa.Array:
        """Per row: is the completion's final answer the reference answer? Null without a reference."""

    def first_error(self, prompt: str, completion: str) -> int | None:
        """The character offset where the completion's first wrong step starts, where the task can
        tell (a teacher's correction keeps what comes before it); None when it cannot, or nothing is wrong."""

    def written_input(self, text: str) -> tuple[str, str | None] | None:
        """The input a teacher output states and its reference answer (None when the task cannot
        compute one), or None when the output is not a valid input of this task."""

    def can_evolve(self, prompt: str) -> bool:
        """Whether a seed prompt has a harder variant (Evol-Instruct)."""

    def default_topics(self) -> dict[str, float]:
        """Topic → weight for synthesis when none are configured; empty when the task has none."""

    def following_report(self, instructions: list[Instruction], written: list[str | None], seeds: list[str]) -> dict:
        """Shares of written inputs that do what their instruction asked (empty when unknowable)."""


TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "arithmetic_chain": ArithmeticChainTask, "none": NoReferenceTask,
                          "gsm8k": GSM8KTask, "boxed": BoxedTask, "exact": ExactTask}


def get_task(name: str) -> Task:
    """The task a name stands for: one of `TASKS`, `regex:<pattern>`, or `module.path:function`."""
    if name in TASKS:
        return TASKS[name]()
    if name.startswith("regex:"):
        return RegexTask(name.removeprefix("regex:"))
    if ":" in name:
        return FunctionTask(name)
    raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)}, regex:<pattern> with a group (?P<answer>...), "
                     "or module.path:function for your own verifier")


def task_name_of(table: pa.Table) -> str:
    """The name of the task of a prompt table (seed_prompts, eval_set): its `task` column's one value."""
    names = table["task"].unique().drop_null().to_pylist() if "task" in table.column_names else []
    if len(names) != 1:
        raise ValueError(f"the prompts name tasks {names}, not one: re-materialize seed_prompts and eval_set with one `task`")
    return names[0]


def task_of(table: pa.Table) -> Task:
    """The task of a prompt table (seed_prompts, eval_set), from its `task` column."""
    return get_task(task_name_of(table))

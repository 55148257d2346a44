"""The `arithmetic` task: the problems and verifier of `arithmetic.py` with the instruction language
of `arithmetic_instructions.py`, behind the `Task` seam."""

import pyarrow as pa

from training.tasks.arithmetic import ArithmeticConfig, parse_chain, parse_prompt, parse_worked, problems, verify_column
from training.tasks.arithmetic_instructions import LANGUAGE, all_topics, can_evolve, following_report, written_problem
from training.tasks.instructions import Instruction


class ArithmeticTask:
    name = "arithmetic"
    templates = LANGUAGE

    def __init__(self, config: ArithmeticConfig = ArithmeticConfig()):
        self.config = config

    @property
    def completion_tokens(self) -> int:
        return self.config.completion_tokens

    def prompts(self, split: str, n: int, seed: int) -> pa.Table:
        chosen = problems(split, n, seed, self.config)
        return pa.table({"prompt": [p.prompt for p in chosen], "answer": [str(p.answer) for p in chosen]})

    def verify(self, completions: pa.Array, answers: pa.Array) -> pa.Array:
        return verify_column(completions, answers)

    def first_error(self, prompt: str, completion: str) -> int | None:
        problem = parse_worked(prompt)
        return problem.first_wrong_step(completion) if problem else None

    def written_input(self, text: str) -> tuple[str, str | None] | None:
        problem = written_problem(text, self.config)
        return (problem.prompt, str(problem.answer)) if problem else None

    def can_evolve(self, prompt: str) -> bool:
        problem = parse_prompt(prompt)
        return problem is not None and can_evolve(problem, self.config)

    def default_topics(self) -> dict[str, float]:
        return {topic: 1.0 for topic in all_topics(self.config)}

    def following_report(self, instructions: list[Instruction], written: list[str | None], seeds: list[str]) -> dict:
        """Per operator: the share of valid problems and of problems that follow the instruction."""
        report = {}
        for operator in sorted({i.operator for i in instructions}):
            rows = [r for r, i in enumerate(instructions) if i.operator == operator]
            requested = [self._requested(instructions[r], seeds) for r in rows]
            report.update(following_report(operator, requested, [written[r] for r in rows]))
        return report

    @staticmethod
    def _requested(instruction: Instruction, seeds: list[str]):
        """What an instruction asked for: the demonstrations, the seed, or the topic."""
        if instruction.operator == "expand":
            return [parse_prompt(seeds[p]) for p in instruction.parents]
        if instruction.operator == "evolve":
            return parse_prompt(seeds[instruction.parents[0]])
        return instruction.topic


class ArithmeticChainTask(ArithmeticTask):
    """`arithmetic_chain`: four dependent additions and subtractions per problem (`a+b-c+d-e=`, 193
    tokens of steps on average), where one wrong step changes every later state. The embedded models
    learn it with 320 positions. Its inputs are chains: a teacher's written input counts when it
    states one; there is no instruction language for writing them (no topics, nothing to evolve)."""

    name = "arithmetic_chain"

    def __init__(self, config: ArithmeticConfig = ArithmeticConfig(chain=4, context_length=320, completion_tokens=288)):
        super().__init__(config)

    def written_input(self, text: str) -> tuple[str, str | None] | None:
        chain = parse_chain(text.strip().split("\n")[0])
        return (chain.prompt, str(chain.answer)) if chain and len(chain.operations) == self.config.chain else None

    def can_evolve(self, prompt: str) -> bool:
        return False

    def default_topics(self) -> dict[str, float]:
        return {}

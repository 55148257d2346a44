"""The embedded teacher's instruction language: besides solving problems, it writes new ones.

    [expand] 12+7=;30+18=;5+4=; >     →  47+31=     Self-Instruct: a new problem like the demonstrations
    [evolve] 12+7= >                  →  312+57=    Evol-Instruct (in depth): a harder variant, the same
                                                    operation with one digit more
    [op=mul digits=3 carries=2] >     →  347*6=     synthesis from meta-information (UltraChat, Phi)

So that the tiny teacher really does expansion and synthesis, it is trained on these alongside the
worked solutions (`instruction_examples`), and what it writes is checked here: `written_problem`
parses an output, `follows` says whether it does what the instruction asked.
"""

import random

from training.tasks.arithmetic import ArithmeticConfig, Problem, is_eval, parse_prompt, problems, sample_problem
from training.tasks.instructions import Templates

OPERATIONS = {"+": "add", "-": "sub", "*": "mul"}
LANGUAGE = Templates(expand="[expand] {demonstrations} >", demonstration="{prompt};", evolve="[evolve] {seed} >", synthesize="[{topic}] >")


def topic(problem: Problem) -> str:
    """The meta-information of a problem: `op=add digits=3 carries=1`."""
    return f"op={OPERATIONS[problem.op]} digits={problem.digits} carries={problem.carries}"


def all_topics(config: ArithmeticConfig = ArithmeticConfig()) -> list[str]:
    """Every topic the train split has problems of, in a fixed order."""
    found = {(list(OPERATIONS).index(p.op), p.digits, p.carries, topic(p)) for p in problems("train", 20_000, 0, config, False)}
    return [name for *_, name in sorted(found)]


def written_problem(text: str, config: ArithmeticConfig = ArithmeticConfig()) -> Problem | None:
    """The problem a teacher output states (its first line), if the task poses it at these digit ranges."""
    problem = parse_prompt(text.strip().split("\n")[0])
    if problem is None:
        return None
    limit = max_digits(problem.op, config)
    return problem if problem.digits <= limit else None


def max_digits(op: str, config: ArithmeticConfig) -> int:
    return {"+": config.max_digits_add, "-": config.max_digits_sub, "*": config.max_digits_mul}[op]


def can_evolve(seed: Problem, config: ArithmeticConfig = ArithmeticConfig()) -> bool:
    """A seed has a harder variant when it can take one digit more."""
    return seed.digits < max_digits(seed.op, config)


def follows(operator: str, instruction_input, written: Problem | None) -> bool:
    """Whether `written` does what the instruction asked.

    expand: an operation of the demonstrations, and not a copy of one; evolve: the seed's operation
    with one digit more; synthesize: exactly the requested topic.
    """
    if written is None:
        return False
    if operator == "expand":
        return written.op in {d.op for d in instruction_input} and written not in instruction_input
    if operator == "evolve":
        return written.op == instruction_input.op and written.digits == instruction_input.digits + 1
    return topic(written) == instruction_input


def following_report(operator: str, inputs: list, written: list[str | None]) -> dict:
    """Shares of the teacher's outputs for one operator that are valid problems and that follow the
    instruction; for synthesis also the share matching each field of the topic."""
    problems_written = [written_problem(w) if w is not None else None for w in written]
    n = max(len(written), 1)
    report = {
        f"{operator}_valid_share": sum(p is not None for p in problems_written) / n,
        f"{operator}_follows_share": sum(follows(operator, i, p) for i, p in zip(inputs, problems_written)) / n,
    }
    if operator == "synthesize":
        for field in ("op", "digits", "carries"):
            wanted = lambda t: dict(part.split("=") for part in t.split())[field]
            report[f"synthesize_{field}_match_share"] = sum(
                p is not None and wanted(topic(p)) == wanted(i) for i, p in zip(inputs, problems_written)
            ) / n
    return report


def _harder(rng: random.Random, seed: Problem) -> Problem:
    digits = seed.digits + 1
    a = rng.randint(10 ** (digits - 1), 10**digits - 1)
    if seed.op == "*":
        return Problem(a, "*", rng.randint(0, 9))
    b_digits = rng.randint(1, digits)
    b = rng.randint(0 if b_digits == 1 else 10 ** (b_digits - 1), 10**b_digits - 1)
    return Problem(a, seed.op, min(b, a) if seed.op == "-" else b)


def instruction_examples(rng: random.Random, n: int, config: ArithmeticConfig = ArithmeticConfig()) -> list[tuple[str, str]]:
    """`n` (instruction, written problem) pairs, a third of each operator, all drawn from the train split."""
    examples = []
    train_problem = lambda: next(p for p in iter(lambda: sample_problem(rng, config), None) if not is_eval(p, config))
    for i in range(n):
        operator = ("expand", "evolve", "synthesize")[i % 3]
        target = train_problem()
        if operator == "expand":
            demonstrations = [next(p for p in iter(train_problem, None) if p.op == target.op) for _ in range(rng.randint(2, 3))]
            examples.append((LANGUAGE.expand_text([p.prompt for p in demonstrations]), target.prompt))
        elif operator == "evolve":
            while not can_evolve(target, config):
                target = train_problem()
            harder = _harder(rng, target)
            while is_eval(harder, config):
                harder = _harder(rng, target)
            examples.append((LANGUAGE.evolve.format(seed=target.prompt), harder.prompt))
        else:
            examples.append((LANGUAGE.synthesize.format(topic=topic(target)), target.prompt))
    return examples

"""The embedded `arithmetic` task: multi-digit problems with worked, digit-by-digit steps.

A problem is `a+b=`, `a-b=` (a ≥ b) or `a*b=` (b one digit). The answer walks the digits from the
right, one step per digit, GSM8K-style chain of thought made synthetic and exact:

    347+856=   →   7+6+0=3c1|3;4+5+1=0c1|03;3+8+1=2c1|203;c1|1203;#### 1203
    x op y ± carry = digit, carry-out (c) or borrow-out (b), | the answer digits so far;
    a last carry gets a step of its own, so the answer is a copy of the last digits
    47*8=      →   7*8=56+0=6c5|6;4*8=32+5=7c3|76;c3|376;#### 376   (the product is written first)

The final answer follows `####`, as in GSM8K; `verify_column` compares only that number.

A chain (`ArithmeticConfig.chain` operations, the `arithmetic_chain` task) links additions and
subtractions left to right, each result the next one's first operand, restated with the rest of the
chain as a step of its own:

    347+856-129+45=   →   7+6+0=3c1|3;...;c1|1203;1203-129+45=;3-9-0=4b1|4;...;1074+45=;...;#### 1119

so one wrong step early changes every later state: 150+ tokens where a single step can derail the rest.

Splits are decided by a hash of the problem text, so train and eval are disjoint by construction
and every seeded stream is reproducible.
"""

import hashlib
import random
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

ANSWER_RE = re.compile(r"####\s*(?P<answer>-?\d+)")


@dataclass(frozen=True)
class ArithmeticConfig:
    """Digit ranges per operation; `eval_fraction` of the problem space is held out for eval."""

    max_digits_add: int = 3
    max_digits_sub: int = 3
    max_digits_mul: int = 3
    eval_fraction: float = 0.1
    chain: int = 1  # operations per problem: above 1, a `Chain` of additions and subtractions
    context_length: int = 128  # the embedded models' positions: the longest prompt and solution fit
    completion_tokens: int = 96  # the most tokens a solution takes, with room


class Worked:
    """A problem solved in `;`-separated steps (`steps`, written by the subclass) and `#### answer`."""

    answer: int

    def steps(self, rng: random.Random | None = None, varied: bool = False, mistake_at: int | None = None) -> list[str]:
        raise NotImplementedError

    def digit_step_count(self) -> int:
        raise NotImplementedError

    @property
    def solution(self) -> str:
        """The reference solution: short worked steps, then `#### answer`."""
        return ";".join(self.steps()) + f";#### {self.answer}"

    def written(self, rng: random.Random) -> str:
        """A solution with each step written short or long at random: as correct as `solution`."""
        return ";".join(self.steps(rng, varied=True)) + f";#### {self.answer}"

    def first_wrong_step(self, completion: str) -> int | None:
        """The character offset where `completion`'s first wrong step starts: the first `;`-separated
        step that is neither the short nor the long form of the true step at its place (steps after
        a mistake continue from the true state, so each step is judged on its own), or the final
        answer; None when every step and the answer are right."""
        forms = [{short, long} for short, long in zip(self.steps(), self.steps(_LONG, varied=True))] + [{f"#### {self.answer}"}]
        offset = 0
        for index, step in enumerate(completion.split(";")):
            if index >= len(forms) or step.strip() not in forms[index]:
                return offset if index < len(forms) or step.strip() else None
            offset += len(step) + 1
        return offset if offset <= len(completion) else None

    def corrected(self, rng: random.Random) -> tuple[str, str]:
        """(prefix, continuation): varied steps up to a wrong digit step, then the true steps after it
        and the true answer. Trained on these, a teacher has an opinion on a student's wrong prefix:
        carry on from the true state, not from the mistake."""
        steps = self.steps(rng, varied=True, mistake_at=rng.randrange(self.digit_step_count()))
        text = ";".join(steps + [f"#### {self.answer}"])
        cut = text.index(";", self.first_wrong_step(text)) + 1
        return text[:cut], text[cut:]


@dataclass(frozen=True)
class Problem(Worked):
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    def digit_steps(self) -> list[tuple[int, int, int, int]]:
        """(x, y, digit, carry_out) per digit of `a` (or of the longer operand), from the right."""
        a_digits = [int(d) for d in reversed(str(self.a))]
        if self.op == "*":
            b_digits = [self.b] * len(a_digits)
        else:
            width = max(len(a_digits), len(str(self.b)))
            a_digits += [0] * (width - len(a_digits))
            b_digits = [int(d) for d in reversed(str(self.b))]
            b_digits += [0] * (width - len(b_digits))
        carry, steps = 0, []
        for x, y in zip(a_digits, b_digits):
            total = {"+": x + y + carry, "-": x - y - carry, "*": x * y + carry}[self.op]
            carry_out = int(total < 0) if self.op == "-" else total // 10
            steps.append((x, y, total % 10, carry_out))
            carry = carry_out
        return steps

    @property
    def carries(self) -> int:
        """How many digit steps carry (or borrow) into the next one."""
        return sum(carry_out > 0 for *_, carry_out in self.digit_steps())

    def digit_step_count(self) -> int:
        return len(self.digit_steps())

    @property
    def digits(self) -> int:
        """Digits of the longer operand."""
        return max(len(str(self.a)), len(str(self.b)))

    def steps(self, rng: random.Random | None = None, varied: bool = False, mistake_at: int | None = None) -> list[str]:
        """The worked steps, without `#### answer`. A digit step can be written two valid ways: short,
        `7+6+0=3c1|3`, or long, `7+6+0=13=3c1|3`, which shows the step's total first; `varied` takes
        either at even odds per step (`rng`), else all are short (the reference solution).
        `mistake_at=i` writes digit step i wrong, a wrong digit or carry as a student errs (`rng`),
        while every other step stays true: the steps after it continue from the true state."""
        carry, suffix, steps = 0, "", []
        flag = "b" if self.op == "-" else "c"
        for index, (x, y, digit, carry_out) in enumerate(self.digit_steps()):
            text = f"{x}*{y}={x * y}+{carry}" if self.op == "*" else f"{x}{self.op}{y}{self.op}{carry}"
            if varied and rng.random() < 0.5:
                text += f"={digit - 10 * carry_out if self.op == '-' else digit + 10 * carry_out}"  # the step's total
            shown_digit, shown_carry = _wrong_step(rng, self.op, digit, carry_out) if index == mistake_at else (digit, carry_out)
            steps.append(f"{text}={shown_digit}{flag}{shown_carry}|{shown_digit}{suffix}")
            suffix = f"{digit}{suffix}"
            carry = carry_out
        if carry and self.op != "-":
            steps.append(f"c{carry}|{carry}{suffix}")
        return steps

class _AlwaysLong:
    """The `rng` of `Problem.steps` that writes every step in its long form."""

    @staticmethod
    def random() -> float:
        return 0.0


_LONG = _AlwaysLong()


@dataclass(frozen=True)
class Chain(Worked):
    """`a op b op c …` with + and −, left to right: each link is a `Problem` whose first operand is the
    result before it, restated with the rest of the chain (`1203-129+45=`) before its digit steps."""

    a: int
    operations: tuple[tuple[str, int], ...]

    @property
    def prompt(self) -> str:
        return f"{self.a}" + "".join(f"{op}{b}" for op, b in self.operations) + "="

    def links(self) -> list[Problem]:
        links, value = [], self.a
        for op, b in self.operations:
            links.append(Problem(value, op, b))
            value = links[-1].answer
        return links

    @property
    def answer(self) -> int:
        return self.links()[-1].answer

    def digit_step_count(self) -> int:
        return sum(link.digit_step_count() for link in self.links())

    def steps(self, rng: random.Random | None = None, varied: bool = False, mistake_at: int | None = None) -> list[str]:
        """Each link's steps, the links after the first restated with the rest of the chain
        (`1203-129+45=`), so that a link's operands are the first two numbers of the line before its
        steps, as in a one-operation prompt; `mistake_at` counts digit steps over the whole chain, and
        every step after it continues from the true state."""
        steps, before = [], 0
        for index, link in enumerate(self.links()):
            rest = "".join(f"{op}{b}" for op, b in self.operations[index:])
            steps += [f"{link.a}{rest}="] if index else []
            inside = mistake_at - before if mistake_at is not None and 0 <= mistake_at - before < link.digit_step_count() else None
            steps += link.steps(rng, varied, inside)
            before += link.digit_step_count()
        return steps


def _wrong_step(rng: random.Random, op: str, digit: int, carry_out: int) -> tuple[int, int]:
    """A step's (digit, carry) with one of them wrong, at even odds."""
    if rng.random() < 0.5:
        return rng.choice([d for d in range(10) if d != digit]), carry_out
    carries = range(9) if op == "*" else range(2)
    return digit, rng.choice([c for c in carries if c != carry_out])


def extract_answer(completion: str) -> int | None:
    match = ANSWER_RE.search(completion)
    return int(match.group("answer")) if match else None


def integer_text(texts: pa.Array) -> pa.Array:
    """Integers written one way, as text: no leading zeros, no `-0` (`0984` → `984`). Compared as
    text, an answer of any length is read (a student may write 20 digits; int64 holds 18)."""
    texts = pc.replace_substring_regex(texts, r"^(-?)0*(\d+)$", r"\1\2")
    return pc.replace_substring_regex(texts, r"^-0$", "0")


def verify_column(completions: pa.Array, answers: pa.Array) -> pa.Array:
    """Exact match on the final answer, per row: the first `#### N` in the completion equals the
    reference; null where there is no integer reference answer."""
    found = pc.struct_field(pc.extract_regex(completions, ANSWER_RE.pattern), "answer")
    is_integer = pc.fill_null(pc.match_substring_regex(answers, r"^-?\d+$"), False)
    reference = pc.if_else(is_integer, answers, None)
    matches = pc.fill_null(pc.equal(integer_text(found), integer_text(reference)), False)
    return pc.if_else(is_integer, matches, pa.scalar(None, pa.bool_()))


def parse_prompt(prompt: str) -> Problem | None:
    """The problem a prompt states, or None when it is not a well-formed problem of this task."""
    match = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt.strip())
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    if op == "-" and a < b:
        return None
    if op == "*" and b > 9:
        return None
    return Problem(a, op, b)


def parse_chain(prompt: str) -> Chain | None:
    """The chain a prompt states (two or more operations, + and −, no result below 0), or None."""
    if re.fullmatch(r"\d+(?:[+\-]\d+){2,}=", prompt.strip()) is None:
        return None
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    chain = Chain(numbers[0], tuple(zip(re.findall(r"[+\-]", prompt), numbers[1:])))
    return chain if all(link.op == "+" or link.a >= link.b for link in chain.links()) else None


def parse_worked(prompt: str) -> Problem | Chain | None:
    """The problem or chain a prompt states, or None."""
    return parse_prompt(prompt) or parse_chain(prompt)


def is_eval(problem: Problem | Chain, config: ArithmeticConfig) -> bool:
    """The held-out split: a fixed hash bucket of the problem text."""
    digest = hashlib.sha256(problem.prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < config.eval_fraction


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def sample_chain(rng: random.Random, config: ArithmeticConfig) -> Chain:
    """`config.chain` operations on numbers of up to `max_digits_add` digits; a subtraction is drawn
    only when it keeps the result at 0 or above."""
    a = value = _number(rng, config.max_digits_add)
    operations = []
    for _ in range(config.chain):
        b = _number(rng, config.max_digits_add)
        op = rng.choice("+-") if b <= value else "+"
        operations.append((op, b))
        value = value + b if op == "+" else value - b
    return Chain(a, tuple(operations))


def sample_problem(rng: random.Random, config: ArithmeticConfig) -> Problem | Chain:
    if config.chain > 1:
        return sample_chain(rng, config)
    op = rng.choice("+-*")
    if op == "+":
        return Problem(_number(rng, config.max_digits_add), op, _number(rng, config.max_digits_add))
    if op == "-":
        a, b = _number(rng, config.max_digits_sub), _number(rng, config.max_digits_sub)
        return Problem(max(a, b), op, min(a, b))
    return Problem(_number(rng, config.max_digits_mul), op, rng.randint(0, 9))


def problems(
    split: str, n: int, seed: int, config: ArithmeticConfig = ArithmeticConfig(), distinct: bool = True
) -> list[Problem | Chain]:
    """`n` problems of `split` ("train" or "eval"), the same for the same seed.

    distinct=True gives a dataset (no repeats); distinct=False an i.i.d. stream, which keeps the
    share of short problems (there are only 100 one-digit additions) as the generator draws them.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"arithmetic/{split}/{seed}")
    want_eval = split == "eval"
    chosen: dict[str, Problem] | list[Problem] = {} if distinct else []
    attempts = 0
    while len(chosen) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"the {split} split has fewer than {n} distinct problems at these digit ranges")
        problem = sample_problem(rng, config)
        if is_eval(problem, config) != want_eval:
            continue
        if distinct:
            chosen.setdefault(problem.prompt, problem)
        else:
            chosen.append(problem)
    return list(chosen.values()) if distinct else chosen

r"""Tasks that check a final answer against the reference answer of prompts from files or datasets.

    gsm8k            the number after the first `#### ` (lm-eval-harness: `#### (\-?[0-9\.\,]+)`),
                     written plainly: no commas, leading `$`, trailing `.` or trailing zeros after the
                     point (`$1,234.50` → `1234.5`, `18.00` → `18`)
    boxed            the content of the last `\boxed{...}` (braces nested one level deep, as in
                     `\boxed{\frac{1}{2}}`) without `$`, `\left`, `\right`, whitespace or a trailing `.`
                     (as MATH's `strip_string` drops spaces)
    exact            the whole completion, trimmed, lower case, runs of whitespace as one space
    regex:<pattern>  the group `answer` of the pattern's first match (RE2), normalized as `exact`
    module:function  the user's `function(completion, reference) -> bool | float`, called once per row
                     with a reference; a float counts as correct when ≥ 0.5

A row is correct when the completion's answer equals the reference's; null without a reference,
False when the completion states no answer. A gsm8k or boxed reference may be a whole solution
(its answer is extracted the same way) or the bare answer.

Prompts come from files or datasets; written inputs and everything else are `none`'s.
"""

import importlib

import pyarrow as pa
import pyarrow.compute as pc

from training.tasks.no_reference import NoReferenceTask

GSM8K_ANSWER = r"#### (?P<answer>-?[0-9.,]+)"
LAST_BOXED = r"(?s).*\\boxed\{(?P<answer>(?:[^{}]|\{[^{}]*\})*)\}"  # greedy `.*`: the last one
REGEX_EXAMPLE = r"regex:Answer: (?P<answer>\S+)"


def extract(texts: pa.Array, pattern: str) -> pa.Array:
    """The group `answer` of the first match of `pattern` per text, null where it does not match."""
    return pc.struct_field(pc.extract_regex(texts, pattern), "answer")


def plain_number(texts: pa.Array) -> pa.Array:
    """A number without commas, leading `$`, trailing `.` or trailing zeros after the point."""
    texts = pc.replace_substring_regex(pc.utf8_trim_whitespace(texts), r",|^\$|\.$", "")  # $1,234. → 1234
    return pc.replace_substring_regex(texts, r"\.0*$|(\.[0-9]*?)0+$", r"\1")  # 18.00 → 18, 2.50 → 2.5


def plain_latex(texts: pa.Array) -> pa.Array:
    """LaTeX without `$`, `\\left`, `\\right`, whitespace or a trailing `.`."""
    texts = pc.replace_substring_regex(texts, r"\\?\$|\\(?:left|right)\b|\s+", "")
    return pc.replace_substring_regex(texts, r"\.$", "")


def normalized(texts: pa.Array) -> pa.Array:
    """Trimmed, lower case, runs of whitespace as one space (curation's `normalized`)."""
    return pc.utf8_lower(pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, r"\s+", " ")))


class AnswerTask(NoReferenceTask):
    """A task whose rows are correct when `answer(completions)` equals `reference(answers)`, both
    normalized answers (null where there is none), which each subclass defines."""

    def verify(self, completions: pa.Array, answers: pa.Array) -> pa.Array:
        matches = pc.fill_null(pc.equal(self.answer(completions), self.reference(answers)), False)
        return pc.if_else(pc.is_null(answers), pa.scalar(None, pa.bool_()), matches)


class GSM8KTask(AnswerTask):
    name = "gsm8k"

    def answer(self, completions: pa.Array) -> pa.Array:
        return plain_number(extract(completions, GSM8K_ANSWER))

    def reference(self, answers: pa.Array) -> pa.Array:
        return plain_number(pc.coalesce(extract(answers, GSM8K_ANSWER), answers))


class BoxedTask(AnswerTask):
    name = "boxed"

    def answer(self, completions: pa.Array) -> pa.Array:
        return plain_latex(extract(completions, LAST_BOXED))

    def reference(self, answers: pa.Array) -> pa.Array:
        return plain_latex(pc.coalesce(extract(answers, LAST_BOXED), answers))


class ExactTask(AnswerTask):
    name = "exact"

    def answer(self, completions: pa.Array) -> pa.Array:
        return normalized(completions)

    def reference(self, answers: pa.Array) -> pa.Array:
        return normalized(answers)


class RegexTask(ExactTask):
    def __init__(self, pattern: str):
        self.name, self.pattern = f"regex:{pattern}", pattern
        try:
            groups = pc.extract_regex(pa.array([], pa.string()), pattern).type
        except pa.ArrowInvalid as error:
            raise ValueError(f"task {self.name!r}: {error}; write an RE2 pattern whose other groups are "
                             f"non-capturing (?:...), e.g. {REGEX_EXAMPLE}") from error
        if groups.get_field_index("answer") < 0:
            raise ValueError(f"task {self.name!r} has no group named `answer`: name the answer's group, e.g. {REGEX_EXAMPLE}")

    def answer(self, completions: pa.Array) -> pa.Array:
        return normalized(extract(completions, self.pattern))


class FunctionTask(AnswerTask):
    def __init__(self, spec: str):
        self.name = spec
        module_name, _, function_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({error}): install it or add "
                             "its directory to PYTHONPATH; the task is module.path:function") from error
        self.function = getattr(module, function_name, None)
        if not callable(self.function):
            raise ValueError(f"task {spec!r}: module {module_name!r} has no function {function_name!r}: define "
                             f"{function_name}(completion: str, reference: str) -> bool | float there")

    def verify(self, completions: pa.Array, answers: pa.Array) -> pa.Array:
        """The user's function per row with a reference; True, or a score ≥ 0.5, is correct."""
        rows = zip(completions.to_pylist(), answers.to_pylist())
        return pa.array([None if reference is None else bool(self.function(completion, reference) >= 0.5)
                         for completion, reference in rows], pa.bool_())

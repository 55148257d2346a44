"""The answer-verifying tasks: gsm8k, boxed, exact, regex:<pattern> and the user's module:function."""

import importlib
import re
import sys

import pyarrow as pa
import pytest

from training.data.expansion import SELF_INSTRUCT
from training.tasks import get_task

USER_VERIFIERS = '''
calls = []

def overlap(completion, reference):
    calls.append(reference)
    words = set(reference.split())
    return len(words & set(completion.split())) / len(words)

def same(completion, reference):
    return completion.strip() == reference

NOT_A_FUNCTION = 1
'''


def verify(name: str, rows: list[tuple[str, str | None]]) -> list[bool | None]:
    completions, answers = zip(*rows)
    return get_task(name).verify(pa.array(completions, pa.string()), pa.array(answers, pa.string())).to_pylist()


@pytest.fixture
def user_verifiers(tmp_path, monkeypatch):
    """A module `user_verifiers` on the path, fresh for each test."""
    (tmp_path / "user_verifiers.py").write_text(USER_VERIFIERS)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "user_verifiers", raising=False)
    return tmp_path


def test_gsm8k_compares_the_first_hash_answer_as_a_plain_number():
    assert verify("gsm8k", [
        ("so 1000 + 234 = 1,234\n#### 1,234", "1234"),
        ("#### 18.00", "18"),
        ("#### 18.", "$18"),
        ("#### 2.50", "2.5"),
        ("#### 100", "10"),
        ("#### -3", "She has 5 - 8 = -3 apples.\n#### -3"),
        ("#### 7\n#### 8", "8"),
        ("####8", "8"),
        ("the answer is 5", "5"),
        ("#### 5", None),
    ]) == [True, True, True, True, False, True, False, False, False, None]


def test_boxed_compares_the_last_box_as_plain_latex():
    assert verify("boxed", [
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{3}, no wait: \boxed{4}", "4"),
        (r"\boxed{3}, no wait: \boxed{4}", "3"),
        (r"$\boxed{ \left( 1, 2 \right) }$.", "(1,2)"),
        (r"\boxed{x=2.}", r"Solving, $\boxed{x = 2}$"),
        (r"\boxed{\$5}", "5"),
        (r"\boxed{\leftarrow}", "arrow"),
        ("the answer is 4", "4"),
        (r"\boxed{4}", None),
    ]) == [True, True, False, True, True, True, False, False, None]


def test_exact_compares_whole_normalized_texts():
    assert verify("exact", [
        ("  The   Answer\n", "the answer"),
        ("\nParis", "paris"),
        ("the answers", "the answer"),
        ("Paris", None),
    ]) == [True, True, False, None]


def test_verifiers_read_chunked_columns():
    table = pa.concat_tables([pa.table({"completion": ["#### 4"], "answer": ["4"]}),
                              pa.table({"completion": ["#### 5"], "answer": ["4"]})])
    assert table["completion"].num_chunks == 2
    assert get_task("gsm8k").verify(table["completion"], table["answer"]).to_pylist() == [True, False]


def test_regex_compares_the_answer_group_normalized():
    task = get_task(r"regex:Answer: (?P<answer>\S+)")
    assert task.name == r"regex:Answer: (?P<answer>\S+)"
    assert verify(task.name, [
        ("I think... Answer: PARIS", "paris"),
        ("Answer: Lyon", "paris"),
        ("answer: paris", "paris"),
        ("Answer: 4", None),
    ]) == [True, False, False, None]


@pytest.mark.parametrize("pattern, error", [
    (r"Answer: (\S+)", "unnamed groups"),
    (r"(?P<answer>\S+", "missing \\)"),
    (r"Result: (?P<result>\S+)", "no group named `answer`"),
])
def test_regex_errors_say_what_to_write(pattern, error):
    with pytest.raises(ValueError, match=error) as raised:
        get_task(f"regex:{pattern}")
    assert r"regex:Answer: (?P<answer>\S+)" in str(raised.value)


def test_a_user_function_scores_rows_with_a_reference(user_verifiers):
    assert verify("user_verifiers:overlap", [
        ("a b", "a b"),
        ("a", "a b"),
        ("a", "a b c"),
        ("a", None),
    ]) == [True, True, False, None]
    assert importlib.import_module("user_verifiers").calls == ["a b", "a b", "a b c"]
    assert verify("user_verifiers:same", [(" 4\n", "4"), ("5", "4")]) == [True, False]
    assert get_task("user_verifiers:same").name == "user_verifiers:same"


@pytest.mark.parametrize("spec, error", [
    ("no_such_module_for_tasks:check", "cannot import module 'no_such_module_for_tasks'"),
    ("user_verifiers:missing", "module 'user_verifiers' has no function 'missing'"),
    ("user_verifiers:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
])
def test_a_user_function_that_cannot_be_used_is_named(user_verifiers, spec, error):
    with pytest.raises(ValueError, match=error):
        get_task(spec)


@pytest.mark.parametrize("name", ["gsm8k", "boxed", "exact", r"regex:(?P<answer>\d+)"])
def test_answer_tasks_load_prompts_and_write_inputs_like_none(name):
    task = get_task(name)
    assert get_task(task.name).name == name
    with pytest.raises(ValueError, match=re.escape(f"task {name!r} has no generated prompts")):
        task.prompts("train", 4, 0)
    assert task.written_input("\n  What is 2+2?\nmore") == ("What is 2+2?", None) and task.written_input(" \n") is None
    assert task.can_evolve("What is 2+2?") and task.default_topics() == {} and task.following_report([], [], []) == {}
    assert task.templates is SELF_INSTRUCT


def test_an_unknown_task_lists_the_choices():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'") as raised:
        get_task("gsm9k")
    for choice in ["arithmetic", "none", "gsm8k", "boxed", "exact", "regex:<pattern>", "module.path:function"]:
        assert choice in str(raised.value)

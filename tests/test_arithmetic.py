import random

import pyarrow as pa

from training.tasks import get_task
from training.tasks.arithmetic import (
    ArithmeticConfig,
    Chain,
    Problem,
    extract_answer,
    is_eval,
    parse_chain,
    parse_prompt,
    problems,
    sample_problem,
    verify_column,
)


def replay_steps(problem: Problem) -> int:
    """The answer read off the worked steps alone: the last running answer digits."""
    return int(problem.solution.split(";")[-2].split("|")[1])


def test_worked_steps_reach_the_answer():
    rng = random.Random(0)
    for _ in range(2000):
        problem = sample_problem(rng, ArithmeticConfig())
        assert replay_steps(problem) == problem.answer, problem
        assert problem.solution.endswith(f"#### {problem.answer}")
        assert extract_answer(problem.solution) == problem.answer


def test_examples_of_the_format():
    assert Problem(347, "+", 856).solution == "7+6+0=3c1|3;4+5+1=0c1|03;3+8+1=2c1|203;c1|1203;#### 1203"
    assert Problem(47, "*", 8).solution == "7*8=56+0=6c5|6;4*8=32+5=7c3|76;c3|376;#### 376"
    assert Problem(302, "-", 15).solution == "2-5-0=7b1|7;0-1-1=8b1|87;3-0-1=2b0|287;#### 287"


def step_results(solution: str) -> list[str]:
    """What each step concludes (`3c1|3`, `c1|1203`, `#### 1203`), however it was written."""
    return [step.split("=")[-1] for step in solution.split(";")]


def test_a_step_written_long_or_short_and_a_corrected_solution_reach_the_true_answer():
    """The teacher's training data: varied steps conclude as the reference does; after a wrong step
    the continuation carries on from the true state, so a wrong prefix still ends in the true answer."""
    rng = random.Random(0)
    extra_lengths = set()
    for _ in range(2000):
        problem = sample_problem(rng, ArithmeticConfig())
        written = problem.written(rng)
        assert step_results(written) == step_results(problem.solution)
        extra_lengths.add(len(written) - len(problem.solution))
        prefix, continuation = problem.corrected(rng)
        assert prefix.endswith(";") and extract_answer(continuation) == problem.answer
        results, reference = step_results(prefix + continuation), step_results(problem.solution)
        wrong = [i for i, (got, want) in enumerate(zip(results, reference)) if got != want]
        assert wrong == [prefix.count(";") - 1], (prefix, continuation)  # one wrong step: the prefix's last
    assert len(extra_lengths) > 3  # long steps appear, in varying numbers
    assert Problem(347, "+", 856).steps(random.Random(1), varied=True)[0] == "7+6+0=13=3c1|3"
    assert Problem(302, "-", 15).steps(random.Random(1), varied=True)[0] == "2-5-0=-3=7b1|7"


def test_generator_is_seeded_and_splits_are_disjoint():
    assert problems("train", 300, 1) == problems("train", 300, 1)
    assert problems("train", 300, 1) != problems("train", 300, 2)
    train = {p.prompt for p in problems("train", 5000, 0)}
    evals = {p.prompt for p in problems("eval", 500, 0)}
    assert len(evals) == 500 and not train & evals
    config = ArithmeticConfig()
    assert all(is_eval(parse_prompt(p), config) for p in evals)


def test_iid_stream_keeps_repeats():
    stream = problems("train", 5000, 0, distinct=False)
    assert len(stream) == 5000 and len({p.prompt for p in stream}) < 5000


def test_verifier_reads_only_the_final_answer():
    assert extract_answer("1+2+0=3c0|3;#### 3") == 3
    assert extract_answer("no answer here") is None
    completions = pa.array(["####  -12", "#### 13", "13", "#### 12", "nothing", "#### 5", None])
    answers = pa.array(["-12", "12", "13", "12", "12", None, "3"])
    assert verify_column(completions, answers).to_pylist() == [True, False, False, True, False, None, False]
    # any length, written with leading zeros: a student's 20-digit answer is wrong, not an error
    completions = pa.array(["#### 66666666776766666666", "#### 0984", "#### -0", "#### 123456789012345678901234"])
    answers = pa.array(["984", "984", "0", "123456789012345678901234"])
    assert verify_column(completions, answers).to_pylist() == [False, True, True, True]


def test_parse_prompt_rejects_what_the_task_does_not_pose():
    assert parse_prompt("12+7=") == Problem(12, "+", 7)
    assert parse_prompt("3-12=") is None and parse_prompt("12*34=") is None and parse_prompt("hello") is None


def test_a_chain_links_its_operations_and_one_wrong_step_is_found_where_it_is():
    chain = Chain(347, (("+", 856), ("-", 129)))
    assert chain.prompt == "347+856-129=" and chain.answer == 1074 and parse_chain(chain.prompt) == chain
    assert chain.solution == ("7+6+0=3c1|3;4+5+1=0c1|03;3+8+1=2c1|203;c1|1203;1203-129=;"
                              "3-9-0=4b1|4;0-2-1=7b1|74;2-1-1=0b0|074;1-0-0=1b0|1074;#### 1074")
    wrong = chain.solution.replace("0-2-1=7b1|74", "0-2-1=6b1|64")  # the second link's second digit step
    assert chain.first_wrong_step(wrong) == chain.solution.index("0-2-1")
    assert parse_chain("12-30+4=") is None and parse_chain("12+7=") is None  # below zero; one operation

    task = get_task("arithmetic_chain")
    rows = task.prompts("train", 300, 0)
    rng = random.Random(0)
    for prompt, answer in zip(rows["prompt"].to_pylist(), rows["answer"].to_pylist()):
        chain = parse_chain(prompt)
        assert len(chain.operations) == task.config.chain and str(chain.answer) == answer
        assert len(prompt) + len(chain.solution) + 2 <= task.config.context_length  # <bos> … <eos> fit the models
        assert len(chain.solution) < task.config.completion_tokens
        prefix, continuation = chain.corrected(rng)  # one wrong digit step, then the true state: the true answer
        assert chain.first_wrong_step(prefix + continuation) == len(prefix) - len(prefix[:-1].split(";")[-1]) - 1
        assert extract_answer(continuation) == chain.answer and task.first_error(prompt, chain.written(rng)) is None
    assert task.verify(pa.array([parse_chain(p).solution for p in rows["prompt"].to_pylist()]), rows["answer"]).to_pylist() == [True] * 300

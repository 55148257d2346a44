"""The whole offline graph at its embedded defaults (a few minutes): the teacher reaches its target,
the warm-started student sits well under it, and offline distillation raises the student's exact
match. The figures every later result is read against."""

import dagster as dg

from assets.datasets import eval_set, seed_prompts, teacher_labeled
from assets.models import student_model, teacher_model
from assets.students import evals, offline_student
from pipelines.catalog import query
from pipelines.resources import DistillStore, TeacherEngine
from pipelines.store import Store


def test_offline_distillation_raises_exact_match(instance, distill_home):
    result = dg.materialize(
        [teacher_model, student_model, seed_prompts, eval_set, teacher_labeled, offline_student, evals],
        instance=instance,
        resources={"store": DistillStore(), "teacher_engine": TeacherEngine()},
        run_config={"ops": {"seed_prompts": {"config": {"num_prompts": 1024}}, "eval_set": {"config": {"num_prompts": 200}}}},
    )
    assert result.success
    _, rows = query(Store(distill_home), "SELECT model, value FROM evals WHERE metric = 'greedy_exact_match'")
    exact_match = dict(rows)
    assert exact_match["teacher"] >= 0.9
    assert 0.2 <= exact_match["student"] <= 0.6
    assert exact_match["offline_student"] >= exact_match["student"] + 0.1

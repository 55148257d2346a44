"""The house rules that keep one place for each thing: imports run one way
(training ← storage ← assets ← pipelines), asset modules never import each other, and a task is
chosen through the Task seam."""

import ast
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from training.tasks import get_task, task_of

ROOT = Path(__file__).parent.parent
FORBIDDEN = {
    "training": {"dagster", "storage", "assets", "pipelines"},
    "storage": {"dagster", "assets", "pipelines"},
    "assets": {"pipelines"},
}
SHARED_ASSET_MODULES = {"config", "executor", "publish", "resources", "partitions", "student_runs"}  # beside the assets, not assets


def imported_packages(path: Path) -> set[str]:
    """Every module a file imports, as written (dotted)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_one_way(layer):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / layer).rglob("*.py")
        for name in imported_packages(path)
        if name.split(".")[0] in FORBIDDEN[layer]
    }
    assert not wrong


def test_asset_modules_do_not_import_each_other():
    asset_modules = {p.stem for p in (ROOT / "assets").glob("*.py")} - SHARED_ASSET_MODULES - {"__init__"}
    wrong = {
        f"assets/{path.name} imports {name}"
        for path in (ROOT / "assets").glob("*.py")
        for name in imported_packages(path)
        if name.startswith("assets.") and name.split(".")[1] in asset_modules
    }
    assert not wrong


def test_tasks_are_chosen_by_name_and_read_from_the_data():
    arithmetic, free_form = get_task("arithmetic"), get_task("none")
    completions, answers = pa.array(["#### 4", "#### 5"]), pa.array(["4", "4"])
    assert arithmetic.verify(completions, answers).to_pylist() == [True, False]
    assert free_form.verify(completions, answers).to_pylist() == [None, None]
    assert arithmetic.written_input("12+7=\nmore") == ("12+7=", "19") and arithmetic.written_input("hello") is None
    assert free_form.written_input("\n  What is a prime?\nmore") == ("What is a prime?", None)
    assert arithmetic.default_topics() and not free_form.default_topics()
    assert task_of(pa.table({"task": ["none", "none"]})).name == "none"
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="not one"):
        task_of(pa.table({"task": ["none", "arithmetic"]}))


def test_training_runs_without_dagster_and_commands_exit_without_leak_warnings():
    """The training modules import no dagster, so training runs as a plain command; and a command
    that loads the code location exits with its output last, not nanobind's leak report (it came
    from a duckdb type object kept alive past exit, see storage/catalog.py). One process for both."""
    code = ("import sys, training.distill, training.evaluate, training.rollouts, storage.catalog; print('dagster' in sys.modules); "
            "from assets.curation import curated; print('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "done"] and "leaked" not in done.stderr, done.stderr[-2000:]
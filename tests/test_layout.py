"""The house rules that keep one place for each thing: imports run one way
(training ← storage ← assets ← pipelines, and inside training/ from its lower rooms to its higher
ones), no module imports itself back, asset modules never import each other, and a task is chosen
through the Task seam."""

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
# training/'s rooms, lowest first: a room imports only the rooms before it (and itself)
TRAINING_ROOMS = ["tasks", "schema", "models", "engines", "data", "feedback", "trainer", "evals", "rounds", "launch", "embedded"]
# beside the assets, not assets
SHARED_ASSET_MODULES = {"config", "executor", "inputs", "publish", "resources", "partitions", "round_steps", "runs", "student_runs"}


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


def test_training_rooms_import_only_lower_rooms():
    assert sorted(p.name for p in (ROOT / "training").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(TRAINING_ROOMS)
    assert not [p.name for p in (ROOT / "training").glob("*.py") if p.name != "__init__.py"], "every module lives in a room"
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for room in TRAINING_ROOMS
        for path in (ROOT / "training" / room).rglob("*.py")
        for name in imported_packages(path)
        if name.startswith("training.") and name.split(".")[1] in TRAINING_ROOMS
        and TRAINING_ROOMS.index(name.split(".")[1]) > TRAINING_ROOMS.index(room)
    }
    assert not wrong


def test_no_import_loops():
    """No chain of imports between the project's modules leads back to where it started (imports
    inside functions count too: they hide loops rather than remove them)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for layer in ["training", "storage", "assets", "pipelines"] for p in (ROOT / layer).rglob("*.py")}
    graph = {name: {target for target in imported_packages(path) if target in modules and target != name}
             for name, path in modules.items()}
    for name, path in modules.items():  # `from package import module` imports the module too
        tree = ast.parse(path.read_text())
        graph[name] |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                        for alias in node.names if f"{node.module}.{alias.name}" in modules}
    state: dict[str, int] = {}

    def loop_from(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path + [name, target]
            if target not in state and (found := loop_from(target, path + [name])):
                return found
        state[name] = 2
        return None

    loops = [found for name in sorted(graph) if name not in state and (found := loop_from(name, []))]
    assert not loops, " → ".join(loops[0])


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
    code = ("import sys, training.trainer.loop, training.evals.evaluate, training.data.rollouts, storage.catalog; "
            "print('dagster' in sys.modules); "
            "from assets.curation import curated; print('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "done"] and "leaked" not in done.stderr, done.stderr[-2000:]

"""Every example in README.md and docs/*.md runs: each ```sql statement and each inline `SELECT …`
through the DuckDB catalog, each `distill …` command (in a ```bash block or inline) through the CLI in
process, each ```python block, each ```yaml run config validated against the Dagster jobs' config
schema and the assets' and resources' `Config` classes. They run on a store built once per session:
a copy of the tiny offline graph (`tiny_offline_store`), curated, a stored round r001 and an online
round r002.

An example that cannot run here (a hub id, a GPU, a cluster, the network) carries a visible marker on
the line before its block: `<!-- not run here: <why> -->`; the marked ones are skipped, and counted in
`test_marked_examples_are_few_and_say_why`. A query that may rightly return no rows on the tiny store
carries `<!-- may be empty here: <why> -->`; every other query must return rows.
"""

import contextlib
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from conftest import copy_store

from pipelines.cli import main as distill
from storage.catalog import query, refresh_catalog
from storage.store import Store

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run here:\s*(?P<why>[^>]+?)\s*-->")
MAY_BE_EMPTY = re.compile(r"<!--\s*may be empty here:\s*(?P<why>[^>]+?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
INLINE = re.compile(r"(?<!`)`(?P<code>(?:\.venv/bin/)?distill [^`]+|(?i:select) [^`]+)`(?!`)")
MOST_MARKED = 8  # examples that need a hub, a GPU, a cluster or the network: a few, never most


@dataclass(frozen=True)
class Example:
    kind: str  # sql | distill | python | yaml
    text: str
    where: str  # file:line
    not_run: str | None = None  # why it cannot run here
    may_be_empty: str | None = None

    def __str__(self):
        return self.where


def sql_statements(block: str) -> list[tuple[int, str]]:
    """The statements of a SQL block with the line each starts on (0: the block's first): comment
    lines dropped, split at `;` (no example quotes one)."""
    statements, current, first = [], [], None
    for number, line in enumerate(block.splitlines()):
        code = "" if line.strip().startswith("--") else line
        for piece in re.split(r"(;)", code):
            if piece == ";":
                if "".join(current).strip():
                    statements.append((first, "\n".join(current).strip()))
                current, first = [], None
            elif piece.strip():
                first = number if first is None else first
                current.append(piece)
    if "".join(current).strip():
        statements.append((first, "\n".join(current).strip()))
    return statements


def distill_argv(line: str) -> list[str] | None:
    """The arguments of a `distill …` command line (after `distill` or `.venv/bin/distill`), else None."""
    words = shlex.split(line, comments=True)
    if words and (words[0] == "distill" or words[0].endswith("/bin/distill")):
        return words[1:]
    return None


def examples_of(path: Path) -> list[Example]:
    lines = path.read_text().splitlines()
    name = path.relative_to(ROOT).as_posix()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if not NOT_RUN.search(lines[i]) and not lines[i].lstrip().startswith("<!--"):
                for match in INLINE.finditer(lines[i]):
                    code = match.group("code")
                    kind = "distill" if distill_argv(code) is not None else "sql"
                    found.append(Example(kind, code, f"{name}:{i + 1}"))
            i += 1
            continue
        start, lang = i, fence.group("lang")
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            i += 1
        body = "\n".join(lines[start + 1 : i])
        i += 1
        before = [line for line in lines[max(0, start - 3) : start] if line.strip()]
        marker = next((m for m in map(NOT_RUN.search, before[-1:]) if m), None)
        empty = next((m for m in map(MAY_BE_EMPTY.search, before[-1:]) if m), None)
        common = dict(not_run=marker and marker.group("why"), may_be_empty=empty and empty.group("why"))
        if lang == "sql":
            found += [Example("sql", s, f"{name}:{start + 2 + n}", **common) for n, s in sql_statements(body)]
        elif lang in ("bash", "sh", "shell"):
            for offset, line in enumerate(body.replace("\\\n", " ").splitlines()):
                if distill_argv(line) is not None:
                    found.append(Example("distill", line.strip(), f"{name}:{start + 2 + offset}", **common))
        elif lang in ("python", "yaml"):
            found.append(Example(lang, body, f"{name}:{start + 1}", **common))
    return found


EXAMPLES = [example for path in DOCUMENTS for example in examples_of(path)]
RUNNABLE = [e for e in EXAMPLES if e.kind != "yaml"]
RUN_CONFIGS = [e for e in EXAMPLES if e.kind == "yaml"]


@pytest.fixture(scope="session")
def docs_store(tiny_offline_store, tmp_path_factory):
    """A copy of the tiny offline store with what the docs query besides, at the least cost: `curated`
    (with its report and dropped rows, from teacher_labeled alone: DuckDB, no model), a stored round
    r001 (test_rounds' tiny round, two training steps), an online round r002 (its training only:
    `online_feedback`, no eval) and the offline feedback datasets (judgments and pairs, no training)."""
    from test_rounds import RESOURCES, run_round

    from assets.curation import curated
    from assets.feedback import preference_pairs_dataset, student_samples, teacher_judgments
    from assets.rounds import online_feedback, student_checkpoint

    home = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_HOME", str(home / "distill"))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        (home / "dagster").mkdir()
        store = copy_store(tiny_offline_store, home / "distill")
        with dg.DagsterInstance.get() as instance:
            # the 30-step teacher is unsure and wrong: the confidence filter and the verifier would
            # leave nothing, so they are loosened (duplicates are still dropped)
            loose = {"min_mean_logprob": -5.0, "max_mean_entropy": 5.0, "drop_unfinished": False, "use_verifier": False}
            made = dg.materialize([curated], instance=instance, resources=RESOURCES,
                                  run_config={"ops": {"curated": {"config": loose}}}, raise_on_error=False)
            assert made.success, made.get_step_failure_events()
            assert run_round(instance, "r001", student_checkpoint={"steps": 2}).success
            online = {"online": True, "mix": 1.0, "steps": 2, "batch_size": 4, "online_rollouts": {"num_prompts": 8, "k": 8}}
            assert run_round(instance, "r002", selection=[student_checkpoint, online_feedback], student_checkpoint=online).success
            feedback = {"student_samples": {"num_prompts": 6, "sampling": {"n": 2, "max_new_tokens": 30}},
                        "teacher_judgments": {"k": 8},
                        "preference_pairs": {"strategy": "all", "max_pairs_per_prompt": 2}}
            judged = dg.materialize([curated, student_samples, teacher_judgments, preference_pairs_dataset],
                                    selection=[student_samples, teacher_judgments, preference_pairs_dataset], instance=instance,
                                    resources=RESOURCES, run_config={"ops": {k: {"config": v} for k, v in feedback.items()}})
            assert judged.success
    refresh_catalog(store)
    return store


@pytest.fixture(scope="session")
def docs_workdir(docs_store, tmp_path_factory):
    """The directory examples run in: `.distill` is the docs store (as after `make demo`), and
    `exports/` holds what the docs' export commands write (the Python examples load it)."""
    workdir = tmp_path_factory.mktemp("docs_workdir")
    (workdir / ".distill").symlink_to(docs_store.root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for example in RUNNABLE:
            argv = distill_argv(example.text) if example.kind == "distill" else None
            if argv and argv[0] == "export" and not example.not_run:
                assert run_distill(docs_store, argv)[0] == 0, example
    return workdir


def run_distill(store: Store, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = distill(["--home", str(store.root), *argv])
        except SystemExit as exit:  # argparse refuses the arguments
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("example", RUNNABLE, ids=str)
def test_example_runs(example, docs_store, docs_workdir, monkeypatch):
    if example.not_run:
        pytest.skip(f"not run here: {example.not_run}")
    monkeypatch.chdir(docs_workdir)
    if example.kind == "sql":
        try:
            _, rows = query(docs_store, example.text)
        except Exception as error:
            pytest.fail(f"{example.where}: the query fails as printed:\n{example.text}\n{type(error).__name__}: {error}")
        assert rows or example.may_be_empty, f"{example.where}: no rows from\n{example.text}"
    elif example.kind == "distill":
        argv = distill_argv(example.text)
        code, out, err = run_distill(docs_store, argv)
        assert code == 0, f"{example.where}: `{example.text}` exits {code}:\n{err}"
        if argv[0] in ("query", "datasets"):  # a header, a rule, then rows
            assert len(out.splitlines()) > 2 or example.may_be_empty, f"{example.where}: no rows from `{example.text}`:\n{out}"
        if argv[0] == "export":
            assert out.startswith("wrote ") and Path(out.splitlines()[0].split(" ", 1)[1]).is_file(), out
    else:
        import datasets  # the examples load Parquet with it: its cache goes to the test's directory

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(docs_workdir, "hf_cache"))
        exec(compile(example.text, example.where, "exec"), {})


def asset_config_class(job: dg.JobDefinition, op_name: str):
    """The `Config` class an asset's function takes as `config`, or None."""
    node = job.graph.node_named(op_name)
    function = node.definition.compute_fn.decorated_fn
    parameter = inspect.signature(function).parameters.get("config")
    return parameter.annotation if parameter is not None else None


@pytest.mark.parametrize("example", RUN_CONFIGS, ids=str)
def test_run_config_is_valid(example):
    """A YAML block is launchpad run config: valid for the job that has its ops (Dagster's schema: names
    and types), and for each op's and resource's `Config` class (ranges and checks)."""
    from pipelines.definitions import defs

    config = yaml.safe_load(example.text)
    assert isinstance(config, dict) and set(config) <= {"ops", "resources"}, f"{example.where}: not run config"
    ops = config.get("ops", {})
    jobs = [defs.resolve_job_def(name) for name in ("distill_offline", "distill_feedback", "distill_round", "distill_round_online",
                                                    "distill_round_preference")]
    job = next((j for j in jobs if set(ops) <= {n.name for n in j.graph.nodes}), None)
    assert job is not None, f"{example.where}: no job has every op of {sorted(ops)}"
    try:
        dg.validate_run_config(job, config)
    except dg.DagsterInvalidConfigError as error:
        pytest.fail(f"{example.where}: invalid for {job.name}:\n{error}")
    for name, entry in ops.items():
        settings = asset_config_class(job, name)
        assert settings is not None, f"{example.where}: {name} takes no config"
        settings(**entry["config"])
    for name, entry in config.get("resources", {}).items():
        type(defs.resources[name])(**entry["config"])


def test_marked_examples_are_few_and_say_why():
    """The docs have examples of every kind, and only a few are marked as not runnable here (a marked
    run config is still validated)."""
    marked = [e for e in EXAMPLES if e.not_run]
    kinds = {e.kind for e in EXAMPLES}
    assert kinds == {"sql", "distill", "python", "yaml"}, kinds
    assert len([e for e in RUNNABLE if not e.not_run]) >= 20, [str(e) for e in RUNNABLE]
    assert len(marked) <= MOST_MARKED, [f"{e}: {e.not_run}" for e in marked]


def test_a_corrupted_example_fails(docs_store):
    """The failure this test exists for: commit 8047afb turned FROM into `F0.71–0.89M` in every query."""
    corrupted = next(e for e in RUNNABLE if e.kind == "sql" and " FROM " in e.text).text.replace(" FROM ", " F0.71–0.89M ", 1)
    with pytest.raises(Exception):
        query(docs_store, corrupted)
    assert run_distill(docs_store, ["query", corrupted])[0] == 1


def test_named_files_exist():
    """Every module or directory of the project the docs name in backticks (`training/trainer/losses.py`,
    `training/tasks/`) exists."""
    named = re.compile(r"`((?:training|assets|storage|pipelines|bench|tests|docs)/(?:[\w/-]*/|[\w./-]*\.py))`")
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in DOCUMENTS for name in named.findall(path.read_text())
               if not (ROOT / name).exists()]
    assert not missing, missing


def test_named_environment_variables_are_read():
    """Every DISTILL_* variable the docs tell a user to set is one the code reads."""
    code = "\n".join(p.read_text() for d in ("training", "assets", "storage", "pipelines") for p in (ROOT / d).rglob("*.py"))
    code += (ROOT / "Makefile").read_text()
    named = {name for path in DOCUMENTS for name in re.findall(r"\bDISTILL_[A-Z_]+\b", path.read_text())}
    unread = {name for name in named if not re.search(rf"\b{name}\b", code)}
    assert named and not unread, f"named in the docs, read nowhere: {sorted(unread)}"


def test_no_number_range_inside_a_word():
    """Commit 8047afb's corruption: `Lo0.72–0.89` for LoRA, `0.40–0.72S` for RSS."""
    glued = re.compile(r"[A-Za-z_$][0-9]+\.[0-9]+–[0-9]|[0-9]\.[0-9]+–[0-9]+\.[0-9]+[A-Za-z_]")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in DOCUMENTS
             for number, line in enumerate(path.read_text().splitlines(), 1) if glued.search(line)]
    assert not found, found

"""Shared fixtures: tiny real chat models on disk, a vLLM engine and server on one of them, the tiny
offline graph's store, and a fresh DISTILL_HOME / DAGSTER_HOME per test.

`make test` runs the suite on two pytest-xdist workers, a test file at a time on each (`-n 2 --dist
loadfile`: a file's tests share its module fixtures and the vLLM server), the longest files first
(`LONGEST_FILES`), and what tests of several files share is built once for the whole run
(`built_once`). `pytest` without `-n` runs them all in
one process. (`--dist loadgroup` would group tests across files, but pytest-xdist 3.8 cannot tag
pytest 9's node ids with their group.)"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at test time: everything is built locally
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# vLLM's engine core in the calling process, not a spawned one: the same engine and API, started in
# ~5 s instead of ~30 s (each spawned process re-imports torch and vllm on 2 cores)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import dagster as dg
import pytest
import torch

from training.models.checkpoints import save_model
from training.tasks.arithmetic import problems

# one thread per process, here and in the processes the tests start: the tiny models' matrices gain
# nothing from a second, and on cores shared with the other worker two threads wait on each other
# (a round's eval took 104 s on two threads and 3.5 s on one, with other work running)
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, … under pytest-xdist; None in one process


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` once for the whole test run, in a directory every worker reads: under
    pytest-xdist the first worker to ask builds it while the others wait on a file lock (the pattern
    pytest-xdist documents); a build that failed is tried again by the next."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    directory = (root.parent if WORKER else root) / name
    with FileLock(f"{directory}.lock"):
        if not (directory / ".built").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (directory / ".built").touch()
    return directory


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER_TEMPLATE = (  # the student's: the same tokens, laid out differently
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}"
)


def build_chat_pair(directory):
    """A Qwen2 teacher and a smaller Qwen2 student (not Llama) on one byte-level BPE tokenizer trained
    here, with Qwen's chat tokens: <|im_end|> ends a turn and is listed in generation_config's
    eos_token_id beside the tokenizer's eos <|endoftext|>. Their chat templates differ."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [p.prompt + " " + str(p.answer) for p in problems("train", 400, 0)] + ["What is the capital of France? Paris."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    paths = {}
    for name, hidden, layers, template in [("teacher", 64, 2, CHATML), ("student", 32, 1, OTHER_TEMPLATE)]:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                            additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template)
        ends = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, max_position_embeddings=256,
                             eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(len(name))
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        paths[name] = directory / name
        save_model(model, tokenizer, paths[name])
    return paths


@pytest.fixture(scope="session")
def chat_pair(request):
    return build_shared_chat_pair(request.config)


@pytest.fixture(scope="session")
def tiny_model_dir(chat_pair):
    """The tiny model the engine tests share: the chat pair's teacher, a randomly initialised Qwen2 on a
    byte-level BPE tokenizer, whose <|im_end|> ends a turn (the embedded Llama is trained by the
    pipeline tests)."""
    return chat_pair["teacher"]


@pytest.fixture
def distill_home(tmp_path, monkeypatch):
    home = tmp_path / "distill"
    monkeypatch.setenv("DISTILL_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    os.makedirs(tmp_path / "dagster")
    return home


@pytest.fixture
def instance(distill_home):
    with dg.DagsterInstance.get() as dagster_instance:
        yield dagster_instance


VLLM_MAX_LOGPROBS = 8  # the server's --max-logprobs: k above it must be refused with that flag named
SERVER_API_KEY = "test-key-from-the-environment"


@pytest.fixture(scope="session")
def resident_vllm_engine():
    """Holds the tests' offline vLLM engine for the session (see `vllm_engine`); closed at its end."""
    held = {}
    yield held
    if held:
        held.pop("engine").close()


@pytest.fixture
def vllm_engine(resident_vllm_engine, tiny_model_dir):
    """One offline vLLM engine on the tiny checkpoint, shared by the tests (start-up ~15 s). Its engine
    core runs in this process, whose vLLM parallel state every in-process engine shares: when another
    engine's shutdown took it down (test_teacher_cache's), the shared engine is started again."""
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    from training.engines.vllm import VLLMEngine

    if not resident_vllm_engine or not model_parallel_is_initialized():
        if resident_vllm_engine:
            resident_vllm_engine.pop("engine").close()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        resident_vllm_engine["engine"] = VLLMEngine(str(tiny_model_dir), max_model_len=128, max_logprobs=16)
    return resident_vllm_engine["engine"]


# the files that take a worker longest (seconds on 2 cores, both workers busy, 2026-12-04), dealt out first so
# that the short ones fill in at the end (`--no-loadscope-reorder` keeps this order); test_engine_openai late,
# once the vLLM server the controller started is up
LONGEST_FILES = {"test_ray.py": 128, "test_docs.py": 68, "test_ui.py": 62, "test_rounds.py": 60, "test_chat.py": 60,
                 "test_teachers.py": 85, "test_alignment.py": 55, "test_distill.py": 47, "test_teacher_cache.py": 37,
                 "test_feedback.py": 36, "test_dead_runs.py": 33,
                 "test_engine_openai.py": 28, "test_sharded_work.py": 22, "test_curated_pipeline.py": 21, "test_pool.py": 20,
                 "test_layout.py": 15, "test_pipeline.py": 11}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: a file's tests keep their order


SHARED_SERVER = "DISTILL_TEST_VLLM_SERVER"  # "port log_path" of the server pytest-xdist's controller started
SERVER_TESTS = Path(__file__).parent / "test_engine_openai.py"  # the file whose tests use the vLLM server


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts its workers, which inherit the environment
def pytest_sessionstart(session):
    """Under pytest-xdist, the controller starts the vLLM server (niceness 19, in the cores' idle time)
    before the workers start, when the run includes the server's tests: its start-up (~40 s) then
    overlaps the first tests instead of holding up the worker that reaches them."""
    config = session.config
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [Path.cwd()]
    if WORKER or not config.getoption("numprocesses", None) or not any(p == SERVER_TESTS or p in SERVER_TESTS.parents for p in paths):
        return
    stack = contextlib.ExitStack()
    config.add_cleanup(stack.close)  # at unconfigure, which runs even when the session does not finish
    log_path = Path(config._tmp_path_factory.getbasetemp()) / "vllm_server.log"
    _, port, _ = stack.enter_context(served_tiny_model(build_shared_chat_pair(config)["teacher"], log_path, 19))
    os.environ[SHARED_SERVER] = f"{port} {log_path}"


def build_shared_chat_pair(config) -> dict[str, Path]:
    directory = built_once(config._tmp_path_factory, "chat_pair", build_chat_pair)
    return {name: directory / name for name in ("teacher", "student")}


@pytest.hookimpl(trylast=True)  # after -k and -m deselected what they deselect
def pytest_collection_finish(session):
    """In one process, the vLLM server starts before the first test, so that its start-up overlaps them."""
    session.config.starts_vllm_server = not WORKER and any("vllm_server" in item.fixturenames for item in session.items)


@contextlib.contextmanager
def served_tiny_model(tiny_model_dir, log_path, niceness: int = 0):
    """A real `vllm.entrypoints.openai.api_server` on the tiny checkpoint, on 127.0.0.1 (in the
    background at `niceness` 19, it takes the cores where the tests leave them idle); it requires an
    API key, given to it (and to the engines) through the environment only. Yields (process, port, log
    path); stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SERVER_API_KEY}
    command = ["nice", "-n", str(niceness), sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", str(VLLM_MAX_LOGPROBS),
               "--dtype", "float32", "--max-model-len", "128", "--enforce-eager"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield process, port, log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session", autouse=True)
def vllm_server_process(request, tmp_path_factory):
    """In one process, the session's vLLM server, launched before the first test when any collected
    test needs it (start-up ~40 s)."""
    if not request.config.starts_vllm_server:
        yield None
        return
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    with served_tiny_model(request.getfixturevalue("tiny_model_dir"), log_path, niceness=19) as served:
        yield served


@pytest.fixture(scope="session")
def vllm_server(vllm_server_process, tiny_model_dir, tmp_path_factory):
    """The base URL of the session's vLLM server, once it answers /health (under pytest-xdist started
    here, by the worker that runs the first test that needs it)."""
    with contextlib.ExitStack() as stack:
        if shared := os.environ.get(SHARED_SERVER):  # pytest-xdist's controller runs it
            port, log_path = shared.split(" ", 1)
            served = None, int(port), log_path
        else:
            served = vllm_server_process or stack.enter_context(
                served_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("vllm_server") / "server.log"))
        server, port, log_path = served
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if (server is not None and server.poll() is not None) or time.monotonic() > deadline:
                    if server is not None:
                        server.kill()
                    raise RuntimeError(f"the vLLM server did not start; see {log_path}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"


def build_tiny_offline_run(home: Path):
    """The whole offline graph with its checks at test_pipeline's tiny settings, in `home`'s store and
    Dagster home; what the tests read of the run goes to `home/run.json`."""
    from test_pipeline import ASSETS, CHECKS, RESOURCES, run_config

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_HOME", str(home / "distill"))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        (home / "dagster").mkdir()
        with dg.DagsterInstance.get() as instance:
            names = [a.key.to_user_string() for a in ASSETS]
            result = dg.materialize(ASSETS + CHECKS, instance=instance, resources=RESOURCES, run_config=run_config(names),
                                    raise_on_error=False)
            streamed = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.step_key == "offline_student"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    (home / "run.json").write_text(json.dumps({"success": result.success, "run_id": result.run_id, "checks": checks, "streamed": streamed}))


@pytest.fixture(scope="session")
def tiny_offline_run(tmp_path_factory):
    """The tiny offline graph, materialized once per test run (`built_once`): (store path, what the tests
    read of the run: success, run_id, checks, the log lines streamed from the `offline_student` step;
    its DAGSTER_HOME). Tests that change a store take a copy (`copy_store`)."""
    home = built_once(tmp_path_factory, "tiny_offline", build_tiny_offline_run)
    return home / "distill", json.loads((home / "run.json").read_text()), home / "dagster"


@pytest.fixture(scope="session")
def tiny_offline_store(tiny_offline_run):
    """The tiny offline graph's store (see `tiny_offline_run`), once it materialized."""
    path, run, _ = tiny_offline_run
    assert run["success"]
    return path


def copy_store(template, destination):
    """A copy of a whole store (relative links and card paths make it valid where it lands), its
    catalog rebuilt for the new place."""
    import shutil

    from storage.catalog import refresh_catalog
    from storage.store import Store

    shutil.copytree(template, destination, symlinks=True, ignore=shutil.ignore_patterns("catalog.*"))
    store = Store(destination)
    refresh_catalog(store)
    return store

"""Shared fixtures: tiny real chat models on disk, a vLLM engine and server on one of them, and a fresh
DISTILL_HOME / DAGSTER_HOME per test."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

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

torch.set_num_threads(2)


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
def chat_pair(tmp_path_factory):
    return build_chat_pair(tmp_path_factory.mktemp("chat_pair"))


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
def vllm_engine(tiny_model_dir):
    """One offline vLLM engine on the tiny checkpoint for the whole session (start-up ~30 s)."""
    from training.engines.vllm import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine(str(tiny_model_dir), max_model_len=128, max_logprobs=16)
    yield engine
    engine.close()


@pytest.hookimpl(trylast=True)  # after -k and -m deselected what they deselect
def pytest_collection_modifyitems(config, items):
    config.starts_vllm_server = any("vllm_server" in item.fixturenames for item in items)
    background = [item for item in items if "offline_graph" in item.fixturenames]
    items[:] = [item for item in items if item not in background] + background  # they read the background graph: last
    config.starts_offline_graph = bool(background)


@contextlib.contextmanager
def niced_process(command: list[str], log_path, env: dict):
    """`command` in the background at the lowest CPU priority (nice 19), so that it takes the cores only
    where the tests leave them idle; output to `log_path`; stopped on exit if still running."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(["nice", "-n", "19", *command], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session", autouse=True)
def offline_graph_process(request, tmp_path_factory):
    """test_distillation_works's offline graph (a teacher trained to its target: ~4 min on one core),
    executed by Dagster in a background process launched before the first test, on one thread
    (`niced_process`): it trains on the cycles the other tests leave idle (most of them keep one core
    busy, or wait on processes they start)."""
    if not request.config.starts_offline_graph:
        yield None
        return
    home = tmp_path_factory.mktemp("offline_graph")
    (home / "dagster").mkdir()
    env = {**os.environ, "DISTILL_HOME": str(home / "distill"), "DAGSTER_HOME": str(home / "dagster"), "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(__file__), "test_distillation_works.py")
    with niced_process([sys.executable, script], home / "graph.log", env) as process:
        yield process, home


@pytest.fixture(scope="session")
def offline_graph(offline_graph_process):
    """The home (distill/, dagster/) of the background offline graph, once it finished successfully."""
    process, home = offline_graph_process
    try:
        process.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, (home / "graph.log").read_text()[-4000:]
    return home


@pytest.fixture(scope="session", autouse=True)
def vllm_server_process(request, tmp_path_factory):
    """One real `vllm.entrypoints.openai.api_server` on 127.0.0.1 for the session, launched before the
    first test when any collected test needs it, so that its start-up (~40 s) overlaps other tests
    (`niced_process`).
    It requires an API key, given to it (and to the engines) through the environment only."""
    if not request.config.starts_vllm_server:
        yield None
        return
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SERVER_API_KEY}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", str(VLLM_MAX_LOGPROBS),
               "--dtype", "float32", "--max-model-len", "128", "--enforce-eager"]
    with niced_process(command, log_path, env) as server:
        yield server, port, log_path


@pytest.fixture(scope="session")
def vllm_server(vllm_server_process):
    """The base URL of the session's vLLM server, once it answers /health."""
    server, port, log_path = vllm_server_process
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the vLLM server did not start; see {log_path}")
            time.sleep(1)
    return base_url


@pytest.fixture(scope="session")
def tiny_offline_run(tmp_path_factory):
    """The whole offline graph with its checks at test_pipeline's tiny settings, materialized once per
    session in a store and Dagster home of its own: (store path, run result, the log lines streamed
    from the `offline_student` step). Tests that change a store take a copy (`copy_store`)."""
    from test_pipeline import ASSETS, CHECKS, RESOURCES, run_config

    home = tmp_path_factory.mktemp("tiny_offline")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILL_HOME", str(home / "distill"))
        patch.setenv("DAGSTER_HOME", str(home / "dagster"))
        (home / "dagster").mkdir()
        with dg.DagsterInstance.get() as instance:
            names = [a.key.to_user_string() for a in ASSETS]
            result = dg.materialize(ASSETS + CHECKS, instance=instance, resources=RESOURCES, run_config=run_config(names),
                                    raise_on_error=False)
            streamed = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.step_key == "offline_student"]
    return home / "distill", result, streamed


@pytest.fixture(scope="session")
def tiny_offline_store(tiny_offline_run):
    """The tiny offline graph's store (see `tiny_offline_run`), once it materialized."""
    path, result, _ = tiny_offline_run
    assert result.success
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

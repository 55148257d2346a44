"""The OpenAI-compatible engine against a real vLLM api_server on 127.0.0.1, and the three engines'
agreement on the same checkpoint and sequences."""

import json
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from conftest import SERVER_API_KEY, VLLM_MAX_LOGPROBS
from test_engine_vllm import PROMPTS, K, assert_same_signal, hf_engine, sequences  # noqa: F401 (fixture)

from storage.store import Store
from training.engines.base import EngineRequestsFailed
from training.engines.cache import CachedEngine, TeacherCache
from training.engines.openai import OpenAIEngine
from training.engines.sampling import Sampling
from training.models.checkpoints import model_card
from training.schema.signal import signal_columns, signals_from_columns


def server_engine(base_urls, tiny_model_dir, tokenizer, **kwargs):
    options = {"api_key": SERVER_API_KEY, "max_retries": 1, "backoff_s": 0.05, **kwargs}
    return OpenAIEngine(base_urls, str(tiny_model_dir), tokenizer, **options)


def test_three_engines_agree_and_store_interchangeable_parquet(hf_engine, vllm_engine, vllm_server, tiny_model_dir, tmp_path):
    server = server_engine([vllm_server], tiny_model_dir, hf_engine.tokenizer)
    assert server.context_length == vllm_engine.context_length == 127
    prompts, completions = sequences(hf_engine)
    reference = hf_engine.score(prompts, completions, K)
    tables = {}
    for engine in (vllm_engine, server):
        signals = engine.score(prompts, completions, K)
        for expected, got in zip(reference, signals):
            assert_same_signal(expected, got)
        store = Store(tmp_path / engine.backend)
        store.write_dataset("signal", pa.table(signal_columns(signals)))
        tables[engine.backend] = store.read_dataset("signal")
    hf = Store(tmp_path / "hf")
    hf.write_dataset("signal", pa.table(signal_columns(reference)))
    tables["hf"] = hf.read_dataset("signal")
    assert tables["hf"].schema == tables["vllm"].schema == tables["openai"].schema
    for name in ("vllm", "openai"):
        for expected, got in zip(reference, signals_from_columns(tables[name])):
            assert_same_signal(expected, got)
    for engine in (vllm_engine, server):  # k = 0: each token's own logprob only (objective kl_advantage)
        for expected, got in zip(hf_engine.score(prompts, completions, 0), engine.score(prompts, completions, 0)):
            assert got.topk_ids.shape == (len(got.token_logprob), 0) and len(got.token_logprob)
            assert_same_signal(expected, got)


def test_server_generates_like_the_offline_engine(hf_engine, vllm_engine, vllm_server, tiny_model_dir):
    server = server_engine([vllm_server, vllm_server], tiny_model_dir, hf_engine.tokenizer, max_concurrency=3)
    prompts = hf_engine.tokenizer(PROMPTS, add_special_tokens=True)["input_ids"]
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    assert [g.completion_ids for g in server.generate(prompts, greedy)] == [g.completion_ids for g in vllm_engine.generate(prompts, greedy)]
    written = {hf_engine.tokenizer.decode([t]) for g in vllm_engine.generate(prompts, greedy) for t in g.completion_ids[2:6]}
    stop = sorted(w for w in written if w.strip() and w.isascii() and w.isprintable())
    with pytest.raises(ValueError, match="at most 4 stop strings"):
        server.generate(prompts, Sampling(stop=["a", "b", "c", "d", "e"]))
    stopped = Sampling(temperature=0.0, max_new_tokens=12, stop=stop[:4])
    served, offline = server.generate(prompts, stopped), vllm_engine.generate(prompts, stopped)
    assert [(g.completion_ids, g.finish_reason) for g in served] == [(g.completion_ids, g.finish_reason) for g in offline]
    assert sum(g.finish_reason == "stop" for g in served) >= 3
    sampled = Sampling(n=2, temperature=1.0, max_new_tokens=12, seed=11)
    first, again = server.generate(prompts, sampled, logprobs=4), server.generate(prompts, sampled)
    assert [(g.prompt_index, g.sample_index) for g in first] == [(p, s) for p in range(5) for s in range(2)]
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    scores = vllm_engine.score([prompts[g.prompt_index] for g in first], [g.completion_ids for g in first], 4)
    for g, signal in zip(first, scores):
        assert g.text == hf_engine.tokenizer.decode(g.completion_ids, skip_special_tokens=True)
        assert_same_signal(signal, g.signal)


def test_api_key_comes_from_the_environment(hf_engine, vllm_server, tiny_model_dir, monkeypatch):
    from assets.resources import ModelEngine

    resource = ModelEngine(backend="openai", base_urls=[vllm_server], api_key_env="DISTILL_TEST_KEY", cache=False)
    card = model_card("tiny", hf_engine.model, hf_engine.tokenizer).extended(path=str(tiny_model_dir))
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(Exception, match="api_key_env"):
        resource.load(card)
    monkeypatch.setenv("DISTILL_TEST_KEY", SERVER_API_KEY)
    assert resource.load(card).context_length == 127


def test_unreachable_server_fails_after_bounded_retries_naming_the_url(hf_engine, tiny_model_dir):
    with socket_port() as port:
        url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with pytest.raises(Exception, match=f"127.0.0.1:{port}/v1/models") as raised:
        server_engine([url], tiny_model_dir, hf_engine.tokenizer, max_retries=2, backoff_s=0.1, timeout_s=2)
    assert "3 attempts" in str(raised.value) and time.monotonic() - started < 10


def test_max_logprobs_below_k_names_the_server_flag(hf_engine, vllm_server, tiny_model_dir):
    server = server_engine([vllm_server], tiny_model_dir, hf_engine.tokenizer)
    server.check_signal(VLLM_MAX_LOGPROBS, 1.0)
    with pytest.raises(ValueError, match=f"--max-logprobs {VLLM_MAX_LOGPROBS + 1}"):
        server.check_signal(VLLM_MAX_LOGPROBS + 1, 1.0)
    with pytest.raises(ValueError, match="signal_temperature to 1"):
        server.check_signal(4, 0.5)


def test_wrong_served_model_names_both(hf_engine, vllm_server, tiny_model_dir):
    with pytest.raises(ValueError, match="not the configured model 'teacher-7b'") as raised:
        OpenAIEngine([vllm_server], "teacher-7b", hf_engine.tokenizer, api_key=SERVER_API_KEY)
    assert str(tiny_model_dir) in str(raised.value)


@pytest.mark.parametrize("per_request", [1, 4])
def test_one_failing_request_is_retried_alone_and_the_rest_are_kept(hf_engine, vllm_server, tiny_model_dir, tmp_path, per_request):
    """Scoring sends `per_request` sequences per request (4: a list of prompts, the last request
    shorter), with the signals of one sequence per request; a request that fails once is retried alone;
    one that always fails loses its sequences only, which a cached re-run redoes."""
    prompts, completions = sequences(hf_engine)
    assert len(prompts) % 4
    poisoned = prompts[2] + completions[2]
    direct = server_engine([vllm_server], tiny_model_dir, hf_engine.tokenizer, sequences_per_request=1).score(prompts, completions, K)
    with FaultyProxy(vllm_server, poisoned, failures=1) as proxy:  # fails the first attempt only
        engine = server_engine([proxy.url], tiny_model_dir, hf_engine.tokenizer, sequences_per_request=per_request)
        for expected, got in zip(direct, engine.score(prompts, completions, K)):
            assert_same_signal(expected, got, atol=1e-6)
    assert proxy.attempts[tuple(poisoned)] == 2 and proxy.requests == -(-len(prompts) // per_request) + 1
    assert all(proxy.attempts[tuple(p + c)] == (2 if i // per_request == 2 // per_request else 1)
               for i, (p, c) in enumerate(zip(prompts, completions)) if p + c != poisoned)

    cache = TeacherCache(tmp_path / "cache")
    with FaultyProxy(vllm_server, poisoned, failures=100) as proxy:  # fails every attempt
        cached = CachedEngine(server_engine([proxy.url], tiny_model_dir, hf_engine.tokenizer, sequences_per_request=per_request),
                              cache, "tiny")
        with pytest.raises(EngineRequestsFailed, match=f"{per_request} of {len(prompts)} items failed"):
            cached.score(prompts, completions, K)
    rerun = CachedEngine(server_engine([vllm_server], tiny_model_dir, hf_engine.tokenizer), cache, "tiny")
    for expected, got in zip(direct, rerun.score(prompts, completions, K)):
        assert_same_signal(expected, got, atol=1e-6)
    assert (rerun.hits, rerun.misses) == (len(prompts) - per_request, per_request)


class socket_port:
    """A free port on 127.0.0.1 that nothing listens on."""

    def __enter__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc):
        self.socket.close()


class FaultyProxy:
    """A real HTTP proxy on 127.0.0.1 in front of the vLLM server that answers 503 to the first
    `failures` attempts of the completion request whose prompt is `poisoned`, and counts attempts."""

    def __init__(self, upstream: str, poisoned: list[int], failures: int):
        self.attempts, self.requests = Counter(), 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                prompt = json.loads(body)["prompt"]
                batch = [tuple(p) for p in prompt] if isinstance(prompt[0], list) else [tuple(prompt)]  # a list of prompts, or one
                proxy.requests += 1
                proxy.attempts.update(batch)
                if tuple(poisoned) in batch and proxy.attempts[tuple(poisoned)] <= failures:
                    self.send_response(503)
                    self.end_headers()
                    return
                self.forward(body)

            def forward(self, body):
                path = self.path.removeprefix("/v1")
                headers = {"Authorization": self.headers["Authorization"], "Content-Type": "application/json"}
                with urllib.request.urlopen(urllib.request.Request(upstream + path, data=body, headers=headers)) as answer:
                    payload = answer.read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

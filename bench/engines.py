"""Engine throughput side by side: transformers in process, the offline vLLM engine, and a vLLM
OpenAI-compatible server on 127.0.0.1, on the same model and the same prompts.

    .venv/bin/python bench/engines.py [path to a model directory]

Without a path it uses the embedded teacher from DISTILL_HOME if there is one (`make demo`), else a
freshly initialised model of the teacher's architecture saved to a temp directory. For each engine:
generation new tokens/s without and with top-k logprobs, and scoring tokens/s (prompt + completion
tokens, the top-k signal, and k = 0: each token's own logprob only). Every engine scores the same
completions (the hf engine's). The server scores with 1, 8 (the default) and 32 sequences per request,
16 requests in flight; the client and the server share this machine's cores.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPTS = 256
NEW_TOKENS = 32
K = 20


def model_directory(argv: list[str], scratch: Path) -> str:
    from storage.store import Store
    from training.models.checkpoints import TEACHER_ARCHITECTURE, build_embedded, save_model

    if len(argv) > 1:
        return argv[1]
    try:
        return Store().read_card("teacher").path
    except FileNotFoundError:
        model, tokenizer = build_embedded(TEACHER_ARCHITECTURE, seed=0)
        save_model(model, tokenizer, scratch / "teacher")
        return str(scratch / "teacher")


def start_server(path: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
         "--port", str(port), "--max-logprobs", str(K), "--dtype", "float32", "--enforce-eager"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(1)
    server.kill()
    raise RuntimeError(f"the vLLM server did not start; see {log}")


def measure(engine, prompt_ids, completions) -> dict[str, float]:
    from training.engines.sampling import Sampling

    params = Sampling(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0)
    engine.generate(prompt_ids[:8], params)  # warm-up
    figures = {}
    for name, logprobs in [("generate", 0), (f"generate+top{K}", K)]:
        started = time.perf_counter()
        generations = engine.generate(prompt_ids, params, logprobs=logprobs)
        figures[name] = sum(len(g.completion_ids) for g in generations) / (time.perf_counter() - started)
    tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    for name, k in [(f"score top{K}", K), ("score k=0", 0)]:  # k = 0: each token's own logprob (objective kl_advantage)
        started = time.perf_counter()
        engine.score(prompt_ids, completions, k)
        figures[name] = tokens / (time.perf_counter() - started)
    return figures


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from training.engines.hf import HFEngine
    from training.engines.openai import OpenAIEngine
    from training.engines.sampling import Sampling
    from training.engines.vllm import VLLMEngine
    from training.tasks.arithmetic import problems

    with tempfile.TemporaryDirectory() as scratch:
        path = model_directory(sys.argv, Path(scratch))
        hf = HFEngine.load(path, batch_size=128)
        prompts = [p.prompt for p in problems("train", PROMPTS, seed=123)]
        prompt_ids = hf.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        completions = [g.completion_ids for g in hf.generate(prompt_ids, Sampling(temperature=1.0, max_new_tokens=NEW_TOKENS))]
        print(f"model: {path}; {PROMPTS} prompts, up to {NEW_TOKENS} new tokens, k={K}; torch threads {torch.get_num_threads()}")
        results = {"hf": measure(hf, prompt_ids, completions)}

        started = time.perf_counter()
        offline = VLLMEngine(path, max_logprobs=K)
        print(f"vllm offline start-up: {time.perf_counter() - started:.0f} s")
        results["vllm"] = measure(offline, prompt_ids, completions)
        offline.close()

        started = time.perf_counter()
        server, url = start_server(path, Path(scratch) / "server.log")
        print(f"vllm server start-up: {time.perf_counter() - started:.0f} s")
        try:
            for per_request in (1, 8, 32):  # sequences scored per request (generation: one prompt per request)
                engine = OpenAIEngine([url], path, hf.tokenizer, max_concurrency=16, sequences_per_request=per_request)
                results[f"openai, {per_request}/request"] = measure(engine, prompt_ids, completions)
        finally:
            server.terminate()
            server.wait(timeout=30)

    columns = list(results["hf"])
    print(f"\n{'tokens/s':<22}" + "".join(f"{c:>18}" for c in columns))
    for engine, figures in results.items():
        print(f"{engine:<22}" + "".join(f"{figures[c]:>18,.0f}" for c in columns))


if __name__ == "__main__":
    main()

"""The OpenAI-compatible server engine: `/v1/completions` on one or more servers (vLLM's, or any that
speaks its logprob extensions), for the teacher (labeling, scoring) and students (rollouts).

score: prompt ⊕ completion as a token-id prompt with `prompt_logprobs=k` and max_tokens=1; each
position's entries are keyed by token id with their rank, so the top-k are the entries of rank ≤ k and
the actual token's logprob is its own entry. generate: `return_token_ids` for the completion ids and
`return_tokens_as_token_ids` so logprob entries are `token_id:N` (decoded strings are lossy).

Scoring sends `sequences_per_request` sequences in one request (the completions API takes a list of
token-id prompts; each comes back as its own choice, by index), generation one prompt per request (its
n samples); `max_concurrency` requests in flight, spread over `base_urls` (a retry moves to the next
URL). Fewer, larger requests let the server batch the prompts' forward passes together. Connection
errors, timeouts, 429 and 5xx are retried `max_retries` times with exponential backoff (backoff_s ·
2^attempt); other 4xx answers are the caller's mistake and are not retried. The items of a request
that still fails are counted in `EngineRequestsFailed`, which carries the results of the rest.

The served logprobs are raw (temperature 1), as for the offline vLLM engine.
"""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from training.engines.base import EngineRequestsFailed, Generation
from training.engines.sampling import Sampling
from training.engines.vllm import check_raw_temperature
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.schema.signal import SparseSignal, signal_from_topk

RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
MAX_STOP_STRINGS = 4  # the OpenAI API's limit, which vLLM's server enforces


class RequestRejected(RuntimeError):
    """The server answered with a 4xx that a retry would not change."""


class ServerUnreachable(RuntimeError):
    """No answer (or only 5xx/429) after every retry."""


class OpenAIEngine:
    backend = "openai"

    def __init__(
        self,
        base_urls: list[str],
        model: str,
        tokenizer,
        api_key: str | None = None,
        max_concurrency: int = 8,
        sequences_per_request: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        end_of_turn_ids: list[int] | None = None,
    ):
        if not base_urls:
            raise ValueError("the openai backend needs base_urls, e.g. ['http://127.0.0.1:8000/v1']")
        self.base_urls = [url.rstrip("/") for url in base_urls]
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.end_of_turn_ids = end_of_turn_ids or [tokenizer.eos_token_id]
        self.max_concurrency, self.sequences_per_request, self.timeout_s = max_concurrency, sequences_per_request, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.context_length = self._check_served_model() - 1  # the prompt must leave room for one output token

    @classmethod
    def for_checkpoint(cls, path: str, base_urls: list[str], served_model_name: str = "", api_key: str | None = None,
                       revision: str | None = None, trust_remote_code: bool = False, **options) -> "OpenAIEngine":
        """The servers at `base_urls` serving checkpoint `path` (under `served_model_name`, else `path`),
        with its tokenizer and the end-of-turn ids of its generation config."""
        tokenizer = load_tokenizer(path, revision, trust_remote_code)
        end_of_turn = end_of_turn_ids(load_generation_config(path, revision), tokenizer)
        return cls(base_urls, served_model_name or path, tokenizer, api_key=api_key, end_of_turn_ids=end_of_turn, **options)

    def _request(self, path: str, payload: dict | None = None, item: int = 0) -> dict:
        """GET (payload None) or POST JSON to base_urls[item % n] + path, with retries and backoff."""
        errors = []
        for attempt in range(self.max_retries + 1):
            url = self.base_urls[(item + attempt) % len(self.base_urls)] + path
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            data = json.dumps(payload).encode() if payload is not None else None
            try:
                request = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors="replace")[:500]
                if error.code == 401:
                    raise RequestRejected(f"{url} refused the API key (401): set the environment variable named by api_key_env") from error
                if error.code not in RETRIED_STATUS:
                    raise RequestRejected(f"{url} answered {error.code}: {body}") from error
                errors.append(f"{url}: {error.code} {body[:200]}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                errors.append(f"{url}: {getattr(error, 'reason', error)}")
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise ServerUnreachable(f"no answer after {self.max_retries + 1} attempts: {'; '.join(errors)}")

    def _check_served_model(self) -> int:
        """Every server must serve `model`; returns the smallest max_model_len they report."""
        lengths = []
        for item, url in enumerate(self.base_urls):
            served = self._request("/models", item=item)["data"]
            names = [entry["id"] for entry in served]
            if self.model not in names:
                raise ValueError(
                    f"{url} serves {names}, not the configured model {self.model!r}: set served_model_name to "
                    "the name the server serves, or point base_urls at a server of that model"
                )
            entry = next(entry for entry in served if entry["id"] == self.model)
            lengths.append(entry.get("max_model_len") or self.tokenizer.model_max_length)
        return min(lengths)

    def check_signal(self, k: int, temperature: float) -> None:
        """Refuses T ≠ 1, and asks each server for k prompt logprobs once, before any real work."""
        check_raw_temperature(temperature)
        probe = [self.tokenizer.bos_token_id or 0] * 2
        for item, url in enumerate(self.base_urls):
            try:
                self._complete({"prompt": probe, "max_tokens": 1, "prompt_logprobs": k}, item)
            except RequestRejected as error:
                allowed = re.search(r"max allowed: (\d+)", str(error))
                if not allowed:
                    raise
                raise ValueError(
                    f"{url} allows at most {allowed.group(1)} logprobs, fewer than k={k}: restart the server "
                    f"with --max-logprobs {k} (or more), or lower k"
                ) from error

    def _complete(self, payload: dict, item: int) -> dict:
        return self._request("/completions", {"model": self.model, **payload}, item)

    def _map(self, function, count: int, per_request: int = 1) -> list:
        """function(items) → their results, for the items < count in requests of `per_request`,
        max_concurrency requests at a time; a failed request's items are counted, the rest kept."""
        results, errors, failed = {}, [], 0
        requests = [range(start, min(start + per_request, count)) for start in range(0, count, per_request)]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            futures = {pool.submit(function, items): items for items in requests}
            for future, items in futures.items():
                try:
                    results.update(zip(items, future.result()))
                except (RequestRejected, ServerUnreachable) as error:
                    errors.append(str(error))
                    failed += len(items)
        if errors:
            raise EngineRequestsFailed(failed, count, errors[0], results)
        return [results[i] for i in range(count)]

    def generate(self, prompt_ids: list[list[int]], params: Sampling, logprobs: int = 0) -> list[Generation]:
        if len(params.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"the OpenAI completions API takes at most {MAX_STOP_STRINGS} stop strings, {len(params.stop)} are "
                             "configured: keep the 4 that matter (end-of-turn ids need none), or use the vllm or hf backend")
        if logprobs:
            self.check_signal(logprobs, 1.0)
        payload = {
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": params.seed,
            "stop_token_ids": self.end_of_turn_ids,
            **({"stop": list(params.stop), "include_stop_str_in_output": True} if params.stop else {}),
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            **({"logprobs": logprobs} if logprobs else {}),
        }

        def one_prompt(items: range) -> list[list[Generation]]:
            (i,) = items
            choices = sorted(self._complete({**payload, "prompt": prompt_ids[i]}, i)["choices"], key=lambda c: c["index"])
            return [[
                Generation(
                    prompt_index=i,
                    sample_index=s,
                    completion_ids=c["token_ids"],
                    text=self.tokenizer.decode(c["token_ids"], skip_special_tokens=True),
                    finish_reason="stop" if c["finish_reason"] == "stop" else "length",
                    signal=sampled_signal(c["logprobs"], logprobs) if logprobs else None,
                )
                for s, c in enumerate(choices)
            ]]

        return [g for generations in self._map(one_prompt, len(prompt_ids)) for g in generations]

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        check_raw_temperature(temperature)

        def some_sequences(items: range) -> list[SparseSignal]:
            prompts = [prompt_ids[i] + completion_ids[i] for i in items]
            answer = self._complete({"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k}, items[0] // self.sequences_per_request)
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            return [prompt_signal(c["prompt_logprobs"][len(prompt_ids[i]) :], completion_ids[i], k) for i, c in zip(items, choices)]

        return self._map(some_sequences, len(prompt_ids), self.sequences_per_request)


def prompt_signal(positions: list[dict], completion: list[int], k: int) -> SparseSignal:
    """Per position {"token id": {"logprob", "rank"}}: the entries of rank ≤ k by rank, and the actual token's."""
    topk_ids, topk_logprobs = np.zeros((len(completion), k), np.int32), np.zeros((len(completion), k), np.float32)
    token_logprob = np.zeros(len(completion), np.float32)
    for t, (entries, token) in enumerate(zip(positions, completion)):
        ranked = sorted((e["rank"], int(i), e["logprob"]) for i, e in entries.items() if e["rank"] <= k)
        topk_ids[t] = [i for _, i, _ in ranked]
        topk_logprobs[t] = [lp for _, _, lp in ranked]
        token_logprob[t] = entries[str(token)]["logprob"]
    return signal_from_topk(topk_ids, topk_logprobs, token_logprob)


def sampled_signal(logprobs: dict, k: int) -> SparseSignal:
    """Generated-token logprobs: `top_logprobs` has k entries per token (k+1 when the sampled token is
    not among them); keys are `token_id:N`."""
    tops = [sorted(((lp, int(key.split(":")[1])) for key, lp in top.items()), reverse=True)[:k] for top in logprobs["top_logprobs"]]
    topk_ids = np.array([[i for _, i in top] for top in tops], np.int32).reshape(-1, k)
    topk_logprobs = np.array([[lp for lp, _ in top] for top in tops], np.float32).reshape(-1, k)
    return signal_from_topk(topk_ids, topk_logprobs, np.array(logprobs["token_logprobs"], np.float32))

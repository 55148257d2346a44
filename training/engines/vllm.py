"""The vLLM engine: the offline `vllm.LLM`, for the teacher (labeling, scoring) and students (rollouts).

generate: one `SamplingParams(n, temperature, top_p, max_tokens, seed, stop_token_ids, stop)` for
every prompt, stopping at the model's end-of-turn ids and stop strings (kept in the output, as the hf
engine keeps them); with `logprobs=k`, the top-k of every generated token. score: prompt ⊕ completion as one prompt with
`prompt_logprobs=k` (and max_tokens=1). With `flat_logprobs` vLLM returns k+1 entries per position,
the actual token first and then the top-k by rank, so the signal is a reshape, not a per-token loop.

Logprobs are raw model logprobs (`logprobs_mode="raw_logprobs"`: before temperature, penalties and
top-p), i.e. log_softmax(logits) at temperature 1, the same as `signal.topk_signal` at T = 1. A prompt
logprob cannot be rescaled to another temperature from the top-k alone (the normalizer needs the whole
vocabulary), so `check_signal` refuses a signal temperature ≠ 1 and says to use the hf backend.

vLLM refuses a prompt as long as max_model_len (it must room one output token), so scoring, which feeds
prompt ⊕ completion as the prompt, gets `context_length = max_model_len − 1`. `vllm` is imported
lazily: the hf path never imports it.
"""

import os

import numpy as np

from training.engines.base import Generation
from training.engines.sampling import Sampling
from training.models.checkpoints import end_of_turn_ids, load_generation_config, load_tokenizer
from training.schema.signal import SparseSignal, signal_from_topk

LOGPROBS_MODE = "raw_logprobs"


def check_raw_temperature(temperature: float) -> None:
    """vLLM-served logprobs are raw (temperature 1); other temperatures need the whole vocabulary."""
    if temperature != 1.0:
        raise ValueError(
            f"vLLM returns raw logprobs at temperature 1, and prompt logprobs at signal temperature "
            f"{temperature} cannot be computed from the top-k alone: set signal_temperature to 1, or use "
            "the 'hf' backend"
        )


class VLLMEngine:
    backend = "vllm"

    def __init__(
        self,
        path: str,
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_logprobs: int = 64,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))  # read by the CPU backend only
        import vllm
        from vllm.inputs import TokensPrompt

        self.tokenizer = load_tokenizer(path, revision, trust_remote_code)
        self.end_of_turn_ids = end_of_turn_ids(load_generation_config(path, revision), self.tokenizer)
        self.llm = vllm.LLM(
            model=path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            logprobs_mode=LOGPROBS_MODE,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        self.max_logprobs = max_logprobs
        self.context_length = self.llm.llm_engine.model_config.max_model_len - 1
        self._sampling = vllm.SamplingParams
        self._prompt = TokensPrompt

    def close(self) -> None:
        """Stops vLLM's engine-core process (left to interpreter exit, it can abort the process)."""
        self.llm.llm_engine.engine_core.shutdown()

    def check_signal(self, k: int, temperature: float) -> None:
        check_raw_temperature(temperature)
        if k > self.max_logprobs:
            raise ValueError(
                f"k={k} is above this vLLM engine's max_logprobs={self.max_logprobs}: raise the model_engine's "
                f"max_logprobs to at least {k}, or lower k"
            )

    def _run(self, prompts: list[list[int]], **sampling):
        params = self._sampling(flat_logprobs=True, **sampling)
        return self.llm.generate([self._prompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def generate(self, prompt_ids: list[list[int]], params: Sampling, logprobs: int = 0) -> list[Generation]:
        if logprobs:
            self.check_signal(logprobs, 1.0)
        outputs = self._run(
            prompt_ids,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop_token_ids=self.end_of_turn_ids,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=logprobs or None,
            detokenize=bool(params.stop),  # stop strings are matched on the text
        )
        generations = []
        for prompt_index, output in enumerate(outputs):
            for sample_index, completion in enumerate(sorted(output.outputs, key=lambda c: c.index)):
                tokens = list(completion.token_ids)
                generations.append(
                    Generation(
                        prompt_index=prompt_index,
                        sample_index=sample_index,
                        completion_ids=tokens,
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        finish_reason="stop" if completion.finish_reason == "stop" else "length",
                        signal=flat_signal(completion.logprobs, len(tokens), logprobs) if logprobs else None,
                    )
                )
        return generations

    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        self.check_signal(k, temperature)
        sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
        longest = max((len(s) for s in sequences), default=0)
        if longest > self.context_length:
            raise ValueError(
                f"a prompt + completion has {longest} tokens, more than vLLM can score here "
                f"({self.context_length} = max_model_len − 1): raise max_model_len or shorten the sequences"
            )
        outputs = self._run(sequences, max_tokens=1, prompt_logprobs=k, detokenize=False)
        return [flat_signal(o.prompt_logprobs, len(c), k) for o, c in zip(outputs, completion_ids)]


def flat_signal(flat, positions: int, k: int) -> SparseSignal:
    """The signal of the last `positions` positions of a vLLM `FlatLogprobs`: k+1 entries per position,
    the actual token's first, then the top-k by rank."""
    if positions == 0:
        return signal_from_topk(np.zeros((0, k)), np.zeros((0, k)), np.zeros(0))
    start = flat.start_indices[-positions]
    ids = np.asarray(flat.token_ids[start:], dtype=np.int32).reshape(positions, k + 1)
    logprobs = np.asarray(flat.logprobs[start:], dtype=np.float32).reshape(positions, k + 1)
    return signal_from_topk(ids[:, 1:], logprobs[:, 1:], logprobs[:, 0])

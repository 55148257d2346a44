"""Resources: the model engine (which backend runs a model) and the store (where data lives),
configurable in the UI launchpad and in `pipelines/definitions.py`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from assets.runs import release_dead_runs
from storage.store import Store
from training.engines.cache import CachedEngine, TeacherCache
from training.engines.hf import HFEngine
from training.schema.cards import ModelCard

_resident_vllm: dict[tuple, object] = {}  # at most one started offline vLLM engine per process, by its settings


class ModelEngine(dg.ConfigurableResource):
    """Which backend runs a model card's checkpoint: the teacher's (labeling, scoring) or a student's
    (rollouts, their logprobs). Assets call `load(card)` and use the `Engine` interface only, so switching the backend
    here changes no asset, and the stored datasets are the same."""

    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="'hf': transformers in process; 'vllm': the offline vllm.LLM in process; "
        "'openai': OpenAI-compatible servers at base_urls (e.g. vLLM's api_server)",
    )
    trust_remote_code: bool = Field(False, description="let from_pretrained / vLLM run code shipped with the model")
    cache: bool = Field(True, description="reuse engine results stored under $DISTILL_HOME/cache (content addressed)")
    # hf
    device: str = Field("cpu", description="hf: torch device, e.g. 'cuda'")
    batch_size: int = Field(64, ge=1, description="hf: sequences per forward / generate call")
    # vllm
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split over")
    data_parallel_size: int = Field(1, ge=1, description="vllm: model replicas")
    max_model_len: Optional[int] = Field(None, ge=2, description="vllm: context length; empty: the model's")
    dtype: str = Field("float32", description="vllm: 'float32', 'bfloat16', 'float16' or 'auto'")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm on GPU: share of GPU memory it may use")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="vllm on CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE) unless that is set")
    max_logprobs: int = Field(64, ge=1, description="vllm: the largest k it will return logprobs for")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / compilation (fast start-up)")
    # openai
    base_urls: list[str] = Field([], description="openai: server base URLs, e.g. ['http://127.0.0.1:8000/v1']")
    served_model_name: str = Field("", description="openai: the model name the servers serve; empty: the card's path")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: the environment variable that holds the API key")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once, over all servers")
    sequences_per_request: int = Field(8, ge=1, description="openai: sequences scored per request (a list of prompts; "
                                       "the server batches their forward passes)")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds before a request is abandoned and retried")
    max_retries: int = Field(3, ge=0, description="openai: retries per request, with exponential backoff")

    def spec(self, card: ModelCard, cache_dir: Path | None = None) -> "EngineSpec":
        """What loads `card`'s engine with these settings in another process or a Ray replica."""
        return EngineSpec(self.model_dump(), card, cache_dir)

    def local_spec(self, card: ModelCard) -> "EngineSpec":
        """`spec` for a model no server serves (a student as DPO's reference): the `openai` backend's
        servers serve the teacher, so with it the model loads in process with transformers."""
        return EngineSpec({**self.model_dump(), **({"backend": "hf"} if self.backend == "openai" else {})}, card)

    def load(self, card: ModelCard, cache_dir: Path | None = None):
        """An engine for `card`'s checkpoint; with `cache_dir`, wrapped in the content-addressed cache."""
        engine = self._backend(card)
        if self.cache and cache_dir is not None:
            return CachedEngine(engine, TeacherCache(cache_dir), model_id=card.weights_hash)
        return engine

    def _backend(self, card: ModelCard):
        path, revision = card.path, card.revision
        if self.backend == "hf":
            return HFEngine.load(
                path, revision=revision, trust_remote_code=self.trust_remote_code, batch_size=self.batch_size, device=self.device
            )
        if self.backend == "openai":
            from training.engines.openai import OpenAIEngine

            api_key = dg.EnvVar(self.api_key_env).get_value() if self.api_key_env else None
            return OpenAIEngine.for_checkpoint(
                path, self.base_urls, self.served_model_name, api_key, revision, self.trust_remote_code,
                max_concurrency=self.max_concurrency, sequences_per_request=self.sequences_per_request, timeout_s=self.timeout_s,
                max_retries=self.max_retries,
            )
        return self._vllm(path, revision)

    def _vllm(self, path: str, revision: Optional[str]) -> "VLLMHandle":
        return VLLMHandle(dict(
            path=path, revision=revision, trust_remote_code=self.trust_remote_code, dtype=self.dtype,
            max_model_len=self.max_model_len, max_logprobs=self.max_logprobs, tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib, enforce_eager=self.enforce_eager,
        ))


@dataclass(frozen=True)
class EngineSpec:
    """One engine as plain data: the ModelEngine settings, the model card, the cache directory (None:
    no cache). A shard executor's process or Ray replica loads it with `load()`."""

    settings: dict
    card: ModelCard
    cache_dir: Path | None = None

    def load(self):
        return ModelEngine(**self.settings).load(self.card, cache_dir=self.cache_dir)


class VLLMHandle:
    """An offline vLLM engine, started on first use. One engine is resident per process (start-up takes
    ~30 s, and two rarely fit in accelerator memory), so using a handle stops whichever other engine is
    resident: handles to the teacher and to a student can be held at once and used in turn."""

    def __init__(self, settings: dict):
        self.settings = settings

    def __getattr__(self, name: str):
        from training.engines.vllm import VLLMEngine

        key = tuple(self.settings.items())
        if key not in _resident_vllm:
            close_vllm_engines()
            _resident_vllm[key] = VLLMEngine(**self.settings)
        return getattr(_resident_vllm[key], name)


def close_vllm_engines() -> None:
    """Stops the offline vLLM engine this process keeps, if any."""
    for engine in _resident_vllm.values():
        engine.close()
    _resident_vllm.clear()


@dg.resource(config_schema={"home": dg.Field(str, default_value="", description="data root; empty: $DISTILL_HOME, else ./.distill")})
def store_resource(context: dg.InitResourceContext) -> Store:
    """Where datasets, checkpoints and the catalog live; assets receive the `Store` itself. It first
    releases dead runs: a run in process initialises it before its steps claim pool slots (assets/runs.py)."""
    for run_id in release_dead_runs(context.instance) if context.instance else []:
        context.log.warning(f"run {run_id} was killed (its processes are gone): marked failed, its pool slots freed")
    return Store(context.resource_config["home"] or None)

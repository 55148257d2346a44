"""Model factories: the embedded teacher/student pair, loading any HF causal LM, and identity.

The embedded pair are Llama models on the character tokenizer. head_dim is 32 because vLLM's CPU
attention rejects 16. The student has about 6× fewer parameters than the teacher.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from training.models.tokenizer import build_char_tokenizer, chat_template_hash, tokenizer_hash
from training.schema.cards import ModelCard


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 128

    def resized(self, hidden_size: int | None = None, num_hidden_layers: int | None = None) -> "Architecture":
        """This architecture at another width (heads of 32, an MLP twice as wide) or depth; None keeps it."""
        width = hidden_size or self.hidden_size
        return Architecture(width, num_hidden_layers or self.num_hidden_layers, width // HEAD_DIM, 2 * width,
                            self.max_position_embeddings)


HEAD_DIM = 32  # vLLM's CPU attention rejects 16
TEACHER_ARCHITECTURE = Architecture(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
STUDENT_ARCHITECTURE = Architecture(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def build_embedded(architecture: Architecture, seed: int, tokenizer=None):
    """A freshly initialised Llama on `tokenizer` (by default the character tokenizer), and that tokenizer."""
    tokenizer = tokenizer or build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=architecture.hidden_size,
        intermediate_size=architecture.intermediate_size,
        num_hidden_layers=architecture.num_hidden_layers,
        num_attention_heads=architecture.num_attention_heads,
        num_key_value_heads=architecture.num_attention_heads,
        head_dim=architecture.hidden_size // architecture.num_attention_heads,
        max_position_embeddings=architecture.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ValueError(
            f"cannot load the tokenizer of {name_or_path!r} ({error}); give a local model directory or a hub id "
            "that is reachable from this machine"
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, dtype=torch.float32):
    """Any HF causal LM by hub id or local path, in eval mode, with its tokenizer."""
    tokenizer = load_tokenizer(name_or_path, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except Exception as error:
        raise ValueError(
            f"cannot load the model {name_or_path!r} ({error}); give a local model directory or a hub id "
            "that is reachable from this machine"
        ) from error
    return model.eval(), tokenizer


def end_of_turn_ids(generation_config: GenerationConfig | None, tokenizer) -> list[int]:
    """The ids generation stops at: every eos_token_id of the model's generation_config, in its order
    (chat models list their end-of-turn token there first, e.g. Qwen's <|im_end|>), then the tokenizer's eos."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [*configured, tokenizer.eos_token_id] if i is not None))


def load_generation_config(name_or_path: str, revision: str | None = None) -> GenerationConfig | None:
    """The model's generation_config.json, or None when it has none (then only the tokenizer's eos stops)."""
    try:
        return GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except OSError:
        return None


def weights_hash(model_or_state) -> str:
    """sha256 over parameter names, shapes and bytes (of a model, or its state dict): the identity of a set of weights."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_card(name: str, model, tokenizer, revision: str | None = None, weights: dict | None = None) -> ModelCard:
    """What identifies a model in lineage: name, revision or weights hash (of `weights` when given: a
    model sharded over processes, gathered), vocab, tokenizer hashes."""
    return ModelCard(
        name=name,
        revision=revision,
        weights_hash=weights_hash(model if weights is None else weights),
        num_parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=model.config.vocab_size,
        tokenizer_size=len(tokenizer),
        tokenizer_hash=tokenizer_hash(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer),
    )


def save_model(model, tokenizer, directory: Path, weights: dict | None = None) -> None:
    """HF format with safetensors: `from_pretrained(directory)` loads it back. `weights`: the whole
    weights of a model sharded over processes (`training/trainer/parallel.py`), else its own."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)

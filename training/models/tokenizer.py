"""The embedded character-level tokenizer: one token per printable ASCII character.

Built with the `tokenizers` library and wrapped in `PreTrainedTokenizerFast`, so it saves and loads
like any Hugging Face tokenizer. `add_special_tokens=True` prepends <bos>, as Llama tokenizers do.
"""

import hashlib
import json

from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_byte_level_bpe(texts: list[str], vocab_size: int, bos: str = "<s>", eos: str = "</s>",
                         pad: str = "<pad>") -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's convention, as Llama 3 and Qwen use) trained on `texts`: a student or
    teacher of another tokenizer than the embedded pair's (training/models/alignment.py)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[pad, bos, eos])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, padding_side="left")


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the vocabulary and special tokens: equal hashes mean equal token ids."""
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None

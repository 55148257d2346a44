"""Each token's text as bytes, whatever its tokenizer's convention: what a student with another
tokenizer needs to use a teacher's stored token ids (training/models/alignment.py).

The convention is read from the tokenizer's decoder (tokenizers' JSON), never guessed from names:

    ByteLevel (GPT-2, Llama 3, Qwen)   each character stands for one byte ('Ġ' is b' ')
    Metaspace, Replace '▁' (Llama 2,   '▁' is b' '; with ByteFallback, '<0xNN>' is the byte NN
    Gemma, SentencePiece)
    anything else (Fuse, WordPiece…)   the token's string, UTF-8 (WordPiece's '##' prefix dropped)

Special tokens (bos, eos, pad, chat markers) cover no text: b"" and `special` True; they correspond
across tokenizers by name (<|im_start|> to <|im_start|>).
"""

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from training.models.tokenizer import tokenizer_hash

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters from U+0100 on, in byte order (character → byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The decoder's step types (a Sequence's, flattened), with 'Replace▁' for a Replace of '▁'."""
    if decoder is None:
        return set()
    if decoder["type"] == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in decoder["decoders"]))
    if decoder["type"] == "Replace" and decoder.get("pattern", {}).get("String") == "▁":
        return {"Replace▁"}
    return {decoder["type"]}


@dataclass
class TokenBytes:
    """A tokenizer's vocabulary as bytes: `texts[id]` and `special[id]`, for every id below `size`."""

    texts: list[bytes]
    special: np.ndarray  # (size,) bool
    names: dict[str, int]  # the special tokens' strings and ids
    lengths: np.ndarray = field(init=False)  # (size,) int64: len(texts[id]), computed once

    def __post_init__(self):
        self.lengths = np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))

    def ids_by_text(self) -> dict[bytes, int]:
        """The id of each token's bytes (special tokens left out; where several share them, a
        byte-fallback token and a plain one, the lowest id)."""
        by_text = {}
        for i, text in enumerate(self.texts):
            if text and not self.special[i]:
                by_text.setdefault(text, i)
        return by_text

    @classmethod
    def of(cls, tokenizer) -> "TokenBytes":
        size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
        kinds = _decoder_kinds(decoder)
        special = np.zeros(size, dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < size]] = True
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special[[i for i, token in added.items() if i < size and getattr(token, "special", False)]] = True
        if "ByteLevel" in kinds:
            alphabet = byte_level_alphabet()
            convert = lambda token: bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode()
        elif kinds & {"Metaspace", "Replace▁"}:
            fallback = "ByteFallback" in kinds
            convert = lambda token: (bytes([int(m.group(1), 16)]) if fallback and (m := BYTE_TOKEN.fullmatch(token))
                                     else token.replace("▁", " ").encode())
        elif "WordPiece" in kinds:
            convert = lambda token: token[2:].encode() if token.startswith("##") else token.encode()
        else:
            convert = lambda token: token.encode()
        texts = [b"" if special[i] or token is None else convert(token) for i, token in enumerate(tokens)]
        return cls(texts, special, {tokens[i]: int(i) for i in np.flatnonzero(special)})

    @classmethod
    def from_table(cls, table: pa.Table) -> tuple["TokenBytes", list[int]]:
        """The tokenizer a `token_table` stores, and its end-of-turn ids."""
        table = table.sort_by("token_id")
        special, names = table["special"].to_numpy(zero_copy_only=False), table["name"].to_pylist()
        ends = table.filter(table["ends_turn"])["token_id"].to_pylist()
        order = table["end_order"].filter(table["ends_turn"]).to_pylist()
        spelled = cls(table["token_bytes"].to_pylist(), special, {names[i]: i for i in np.flatnonzero(special)})
        return spelled, [end for _, end in sorted(zip(order, ends))]


TOKEN_TABLE = pa.schema([
    ("tokenizer_hash", pa.string()), ("token_id", pa.int32()), ("token_bytes", pa.binary()), ("special", pa.bool_()),
    ("name", pa.string()),  # a special token's string (<|im_end|>), else null
    ("ends_turn", pa.bool_()), ("end_order", pa.int32()),  # its place among the end-of-turn ids (the first ends a turn)
])


def token_table(tokenizer, end_of_turn_ids: list[int]) -> pa.Table:
    """A tokenizer as a table, one row per id (`TOKEN_TABLE`): what a student of another tokenizer needs of
    the teacher's, stored beside its signal (the `token_texts` dataset, one file per tokenizer hash), so
    that using the signal needs neither the teacher's checkpoint nor its tokenizer."""
    spelled = TokenBytes.of(tokenizer)
    ids = np.arange(len(spelled.texts))
    names = {i: name for name, i in spelled.names.items()}
    order = {end: place for place, end in enumerate(end_of_turn_ids)}
    return pa.table({
        "tokenizer_hash": pa.repeat(pa.scalar(tokenizer_hash(tokenizer)), len(ids)), "token_id": pa.array(ids, pa.int32()),
        "token_bytes": pa.array(spelled.texts, pa.binary()), "special": pa.array(spelled.special),
        "name": pa.array([names.get(i) for i in range(len(ids))], pa.string()), "ends_turn": pa.array(np.isin(ids, end_of_turn_ids)),
        "end_order": pa.array([order.get(i) for i in range(len(ids))], pa.int32()),
    }, schema=TOKEN_TABLE)


def same_text_ids(teacher: TokenBytes, student: TokenBytes) -> np.ndarray:
    """(teacher vocabulary,) int64: the student's id whose bytes equal each teacher token's (a special
    token's: whose name), −1 where none does. Where several student ids share the bytes (a
    byte-fallback token and a plain one), the lowest id is taken."""
    by_text = student.ids_by_text()
    ids = np.fromiter((by_text.get(text, -1) if text else -1 for text in teacher.texts), dtype=np.int64, count=len(teacher.texts))
    for name, i in teacher.names.items():
        ids[i] = student.names.get(name, -1)
    return ids

"""Tokenizers: Meta's Llama 3 / Llama 4 tiktoken BPE files, Hugging Face tokenizer.json files, and a file-free
byte-level default.

Public API:
    Tokenizer.byte_level() -> Tokenizer
    Tokenizer.from_file(path, kind="llama3" | "llama4" | "hf") -> Tokenizer
    tok.encode(text, bos=False, eos=False) -> list[int]
    tok.encode_array(text) -> np.ndarray          # same ids as encode(text), bulk path for corpora
    tok.decode(ids) -> str
    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.special_tokens, tok.fingerprint
    tok.adds_bos                                  # does the tokenizer's own convention start a text with bos

Special tokens in the *text* are always encoded as plain text (never as control ids), so a corpus
that happens to contain "<|end_of_text|>" cannot inject control tokens. Control ids enter only
through the `bos`/`eos` flags or by id.

File format (both Llama generations): plain text, one `base64(token_bytes) rank` per line, ranks
0..n-1. Special tokens follow the ranks: n, n+1, ... The named Llama 3 offsets are those of the
released Llama 3.1 tokenizer (see REFERENCE.md). The Llama 4 special-token order and its
pre-tokenizer regex follow Meta's reference tokenizer (github.com/meta-llama/llama-models,
models/llama4/tokenizer.py): 5 basic tokens, 75 text post-training tokens, 1054 vision tokens,
10 reasoning tokens, then `<|reserved_special_token_N|>` up to 2048 in total.

Hugging Face (`kind="hf"`, the `tokenizers` library): a `tokenizer.json`; bos, eos and pad are the
`bos_token`, `eos_token` and `pad_token` of the `tokenizer_config.json` beside it (else
`special_tokens_map.json`; pad defaults to eos, bos may be absent). `adds_bos` is whether the file's
post-processor puts a token first, as HF's own `tokenizer(text)` does (Llama 3 files do; SmolLM2's does not).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np
import tiktoken
import tokenizers

# Llama 3 pre-tokenizer (REFERENCE.md); also used for the byte-level default, where it only
# decides how text is cut before the (merge-free) byte mapping.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4 pre-tokenizer (o200k-style: splits camelCase words, keeps contractions attached).
LLAMA4_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


def _reserved(start: int, count: int, prefix: str = "") -> list[str]:
    return [f"<|{prefix}reserved_special_token_{i}|>" for i in range(start, start + count)]


def _llama3_specials() -> list[str]:
    """256 control tokens; named ones at the Llama 3.1 offsets, the rest reserved in id order."""
    named = {
        0: BOS,
        1: EOS,
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    reserved = iter(_reserved(0, 256 - len(named)))
    return [named[i] if i in named else next(reserved) for i in range(256)]


def _llama4_specials() -> list[str]:
    """2048 control tokens in the order of Meta's Llama 4 tokenizer."""
    basic = [BOS, EOS, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text_post_train = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_reserved(0, 6, "text_post_train_"),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_reserved(8, 61, "text_post_train_"),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        *_reserved(0, 2, "vision_"),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_reserved(2, 4, "vision_"),
        "<|image|>",
        *_reserved(6, 1, "vision_"),
        "<|patch|>",
        *_reserved(7, 1041, "vision_"),
    ]
    reasoning = [*_reserved(0, 8, "reasoning_"), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text_post_train + vision + reasoning
    return named + _reserved(0, 2048 - len(named))


# Byte-level default: 256 byte tokens + 64 specials = 320 ids, the vocab of the tiny presets;
# the reserved specials are free for synthetic tasks (markers, separators).
_BYTE_SPECIALS = [BOS, EOS, "<|pad|>", *_reserved(0, 61)]

_KINDS = {
    "llama3": (LLAMA3_PATTERN, _llama3_specials, "<|finetune_right_pad_id|>"),
    "llama4": (LLAMA4_PATTERN, _llama4_specials, "<|finetune_right_pad|>"),
}

# tiktoken's regex engine overflows its stack on very long runs of whitespace or of
# non-whitespace (tiktoken issue #195), so BPE input is cut into bounded pieces first,
# at the same places Meta's reference tokenizer cuts.
_MAX_PIECE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % ((_MAX_RUN_CHARS + 1,) * 2))


def _bounded_pieces(text: str) -> Iterator[str]:
    """Cut text every 400k chars and every 25k chars inside longer same-class runs."""
    for start in range(0, len(text), _MAX_PIECE_CHARS):
        chunk = text[start : start + _MAX_PIECE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for pos in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


def _read_ranks(path: Path) -> tuple[dict[bytes, int], bytes]:
    """Parse a `base64(token) rank` file; returns the ranks and the raw file bytes."""
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path}. Point the tokenizer path at Meta's tokenizer.model "
            "(shipped with the Llama 3 / Llama 4 weights), or use the byte-level tokenizer, "
            "which needs no file."
        )
    raw = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}:{lineno}: expected 'base64(token_bytes) rank', got {line[:80]!r}; "
                "this is not a tiktoken tokenizer.model file"
            ) from None
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single-byte tokens are missing (first: {missing[0]}); "
            "a byte-level BPE file must contain all 256 bytes"
        )
    return ranks, raw


class Tokenizer:
    """A tiktoken encoding plus its control tokens. Build it with `byte_level()` or `from_file()`."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        kind: str,
        n_ranks: int,
        special_tokens: dict[str, int],
        pad_token: str,
        fingerprint: str,
    ) -> None:
        self._encoding = encoding
        self.kind = kind
        self.n_ranks = n_ranks
        self.special_tokens = special_tokens
        self.bos_id: Optional[int] = special_tokens[BOS]
        self.eos_id = special_tokens[EOS]
        self.pad_id = special_tokens[pad_token]
        self.fingerprint = fingerprint
        self.adds_bos = kind != "byte_level"  # Meta's tokenizers start every text with <|begin_of_text|>

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens (id = byte value) then 64 specials: bos 256, eos 257, pad 258, 61 reserved."""
        ranks = {bytes([b]): b for b in range(256)}
        specials = {name: 256 + i for i, name in enumerate(_BYTE_SPECIALS)}
        encoding = tiktoken.Encoding(
            name="byte_level", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        fingerprint = hashlib.sha1(("byte_level\0" + "\0".join(_BYTE_SPECIALS)).encode()).hexdigest()
        return cls(encoding, "byte_level", 256, specials, "<|pad|>", fingerprint)

    @classmethod
    def from_file(cls, path: str | Path, kind: Literal["llama3", "llama4", "hf"] = "llama3") -> Tokenizer:
        """Load Meta's `tokenizer.model` (special-token ids start right after the file's ranks), or a Hugging Face
        `tokenizer.json` (kind "hf")."""
        if kind == "hf":
            return HFTokenizer(Path(path).expanduser())
        if kind not in _KINDS:
            raise ValueError(f"tokenizer kind {kind!r} is unknown; use one of {sorted(_KINDS)}")
        pattern, specials_fn, pad_token = _KINDS[kind]
        path = Path(path).expanduser()
        ranks, raw = _read_ranks(path)
        names = specials_fn()
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        encoding = tiktoken.Encoding(
            name=f"{kind}:{path.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        fingerprint = hashlib.sha1(kind.encode() + b"\0" + raw).hexdigest()
        return cls(encoding, kind, len(ranks), specials, pad_token, fingerprint)

    @property
    def vocab_size(self) -> int:
        """Ranks plus special tokens: the embedding table size a model needs."""
        return self.n_ranks + len(self.special_tokens)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; control-token names inside `text` are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        ids = self.encode_array(text).tolist()
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self!r} defines no bos token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as `encode(text)` (no bos/eos) as a uint32 array; the fast path for corpora."""
        if self.kind == "byte_level":
            # Without merges, BPE over bytes is the identity: token id == byte value.
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)
        ids: list[int] = []
        for piece in _bounded_pieces(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (lists, arrays or tensors); special ids decode to their names."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return self._encoding.decode(ids, errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _token_name(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library) with the special tokens of its config files."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}; point tokenizer.path at a tokenizer.json")
        raw = path.read_bytes()
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e)[:200]})") from None
        self._tokenizer.encode_special_tokens = True  # control-token names in text stay text
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if (path.parent / name).is_file():
                config.update(json.loads((path.parent / name).read_text()))
                raw += (path.parent / name).read_bytes()
        specials = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}

        def token_id(key: str) -> Optional[int]:
            name = _token_name(config.get(key))
            if name is None:
                return None
            found = self._tokenizer.token_to_id(name)
            if found is None:
                raise ValueError(f"{path.parent}: {key} {name!r} is not a token of {path.name}")
            return found

        first = self._tokenizer.encode("a", add_special_tokens=True).ids
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        self.adds_bos = len(first) > len(plain) and first[1:][: len(plain)] == plain
        eos = token_id("eos_token")
        if eos is None:
            raise ValueError(
                f"{path.parent} names no eos_token (tokenizer_config.json or special_tokens_map.json); corpora end "
                "every document with eos: add one to tokenizer_config.json"
            )
        self.kind, self.n_ranks, self.special_tokens, self.eos_id = (
            "hf",
            self._tokenizer.get_vocab_size(),
            specials,
            eos,
        )
        bos, pad = token_id("bos_token"), token_id("pad_token")
        self.bos_id = bos if bos is not None else (first[0] if self.adds_bos else None)
        self.pad_id = pad if pad is not None else eos
        self.fingerprint = hashlib.sha1(b"hf\0" + raw).hexdigest()
        self._path = path

    @property
    def vocab_size(self) -> int:
        """Every id of the file, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` without the post-processor's special tokens, as a uint32 array."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids decode to their names."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(kind='hf', path={str(self._path)!r}, vocab_size={self.vocab_size})"

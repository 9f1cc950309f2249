"""Tokenizer: byte-level default, Meta tokenizer.model parsing, regexes, special tokens, errors."""

import base64
from pathlib import Path

import numpy as np
import pytest
import torch

from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.models import presets

# Merges on top of the 256 byte tokens (ranks 256, 257, ...). BPE applies the lowest rank first.
MERGES = [b"he", b"ll", b"hell", b"hello", b"o ", b" w", b"or", b" wor", b"ld", b" world", b"lC", b"34"]


def write_model(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return write_model(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)] + MERGES)


def test_byte_level_layout() -> None:
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 320
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert sorted(tok.special_tokens.values()) == list(range(256, 320))
    assert tok.special_tokens["<|reserved_special_token_60|>"] == 319
    text = "héllo, wörld! 中文 \t\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode(text, bos=True, eos=True) == [256, *text.encode("utf-8"), 257]
    assert tok.decode(tok.encode(text, bos=True)) == "<|begin_of_text|>" + text


def test_byte_level_fast_path_matches_tiktoken_over_bytes(tmp_path: Path) -> None:
    bytes_only = Tokenizer.from_file(write_model(tmp_path / "bytes.model", [bytes([b]) for b in range(256)]))
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\r\n\n\n   \t"
    assert Tokenizer.byte_level().encode(text) == bytes_only.encode(text)
    assert Tokenizer.byte_level().encode_array(text).dtype == np.uint32


def test_bpe_merges_respect_pretokenizer(model_file: Path) -> None:
    tok = Tokenizer.from_file(model_file, kind="llama3")
    rank = {t: 256 + i for i, t in enumerate(MERGES)}
    # "hello world" splits into "hello" | " world": the cross-piece merge b"o " must not fire.
    assert tok.encode("hello world") == [rank[b"hello"], rank[b" world"]]
    # digits are cut in groups of three: "123" | "45", so b"34" never merges.
    assert tok.encode("12345") == [ord("1"), ord("2"), ord("3"), ord("4"), ord("5")]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_llama4_pattern_splits_camel_case(model_file: Path) -> None:
    llama3 = Tokenizer.from_file(model_file, kind="llama3")
    llama4 = Tokenizer.from_file(model_file, kind="llama4")
    lc = 256 + MERGES.index(b"lC")
    assert lc in llama3.encode("camelCase")  # one \p{L}+ piece
    assert lc not in llama4.encode("camelCase")  # "camel" | "Case"
    assert llama4.decode(llama4.encode("camelCase")) == "camelCase"


def test_llama3_special_ids_follow_rank_count(model_file: Path) -> None:
    tok = Tokenizer.from_file(model_file, kind="llama3")
    n = 256 + len(MERGES)
    assert tok.vocab_size == n + 256
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3,
        "<|finetune_right_pad_id|>": 4,
        "<|reserved_special_token_2|>": 5,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
        "<|python_tag|>": 10,
        "<|reserved_special_token_3|>": 11,
        "<|reserved_special_token_247|>": 255,
    }
    for name, offset in expected.items():
        assert tok.special_tokens[name] == n + offset, name
    assert sorted(tok.special_tokens.values()) == list(range(n, n + 256))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)


def test_llama4_special_ids_follow_rank_count(model_file: Path) -> None:
    tok = Tokenizer.from_file(model_file, kind="llama4")
    n = 256 + len(MERGES)
    assert tok.vocab_size == n + 2048
    assert sorted(tok.special_tokens.values()) == list(range(n, n + 2048))
    offsets = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|header_start|>": 5,
        "<|eot|>": 8,
        "<|finetune_right_pad|>": 18,
        "<|image_start|>": 80,
        "<|patch|>": 92,
        "<|reasoning_thinking_end|>": 1143,
        "<|reserved_special_token_0|>": 1144,
        "<|reserved_special_token_903|>": 2047,
    }
    for name, offset in offsets.items():
        assert tok.special_tokens[name] == n + offset, name
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 18)


@pytest.mark.parametrize("kind", ["byte", "llama3"])
def test_special_token_text_is_plain_text(model_file: Path, kind: str) -> None:
    tok = Tokenizer.byte_level() if kind == "byte" else Tokenizer.from_file(model_file)
    text = "a<|begin_of_text|>b<|end_of_text|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_decode_accepts_arrays_and_tensors_and_rejects_bad_ids() -> None:
    tok = Tokenizer.byte_level()
    ids = tok.encode("abc", eos=True)
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "abc<|end_of_text|>"
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        tok.decode([97, 320])


def test_very_long_runs_do_not_overflow_tiktoken(model_file: Path) -> None:
    tok = Tokenizer.from_file(model_file)
    text = " " * 1_000_000 + "hello" + "x" * 60_000  # 1M spaces overflow an unsplit tiktoken call
    assert tok.decode(tok.encode(text)) == text


def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.model.*byte-level"):
        Tokenizer.from_file(missing)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not-base64!! 0\n", r":1: expected 'base64\(token_bytes\) rank'"),
        ("QQ== zero\n", r":1: expected"),
        ("QQ== 0\nQQ== 1\n", "appears twice"),
        ("QQ== 0\nQg== 5\n", "ranks must be exactly 0..1"),
        ("QQ== 0\n", "single-byte tokens are missing"),
    ],
)
def test_bad_file_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.model"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_file(path)


def test_unknown_kind(model_file: Path) -> None:
    with pytest.raises(ValueError, match="kind 'llama2' is unknown"):
        Tokenizer.from_file(model_file, kind="llama2")


def test_fingerprint_tracks_file_content_and_kind(tmp_path: Path, model_file: Path) -> None:
    other = write_model(tmp_path / "other.model", [bytes([b]) for b in range(256)] + MERGES[:3])
    fingerprints = {
        Tokenizer.from_file(model_file, "llama3").fingerprint,
        Tokenizer.from_file(model_file, "llama4").fingerprint,
        Tokenizer.from_file(other, "llama3").fingerprint,
        Tokenizer.byte_level().fingerprint,
    }
    assert len(fingerprints) == 4
    assert Tokenizer.from_file(model_file).fingerprint == Tokenizer.from_file(model_file).fingerprint


def test_real_llama3_tokenizer(meta_tokenizer) -> None:
    tok = Tokenizer.from_file(meta_tokenizer("llama3"), kind="llama3")
    assert tok.vocab_size == 128256
    assert tok.encode("Hello world", bos=True) == [128000, 9906, 1917]
    # Expected ids from Meta's own llama3 tokenizer tests (llama-models).
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001,
    ]  # fmt: skip
    named = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
    }
    assert {name: tok.special_tokens[name] for name in named} == named


def test_real_llama4_tokenizer(meta_tokenizer) -> None:
    tok = Tokenizer.from_file(meta_tokenizer("llama4"), kind="llama4")
    assert tok.vocab_size == 202048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (200000, 200001, 200018)
    # Expected ids computed with Meta's llama4 reference tokenizer (llama-models 0.3.0).
    assert tok.encode("Hello world", bos=True) == [200000, 19873, 3817]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        200000, 3231, 373, 262, 1600, 17705, 26, 200001,
    ]  # fmt: skip


@pytest.mark.parametrize("preset", ["llama3.1-tiny", "llama4-tiny"])
def test_byte_level_vocab_fits_the_tiny_presets(preset: str) -> None:
    assert presets.get(preset).vocab_size == Tokenizer.byte_level().vocab_size

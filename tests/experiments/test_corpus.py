"""Corpus loading: sources, train/val split, caching, packing with eos, errors."""

import base64
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llamoe.experiments.data.corpus import load_corpus
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.models.config import ConfigError

BYTES = Tokenizer.byte_level()
EOS = BYTES.eos_id


def texts_of(corpus) -> list[str]:
    """Decode each byte-level document, checking it ends in exactly one eos."""
    out = []
    for doc in corpus.documents():
        assert doc[-1] == EOS and EOS not in doc[:-1]
        out.append(doc[:-1].astype(np.uint8).tobytes().decode("utf-8"))
    return out


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_stdlib_is_the_standard_library_sources(tmp_path: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    expected = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        expected += [
            (Path(dirpath) / f).read_text("utf-8")
            for f in filenames
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    train = load_corpus("stdlib", BYTES, "train", tmp_path)
    val = load_corpus("stdlib", BYTES, "val", tmp_path)
    train_texts, val_texts = texts_of(train), texts_of(val)
    # every non-empty file exactly once, in one of the two splits
    assert sorted(train_texts + val_texts) == sorted(t for t in expected if t)
    assert 0.02 < len(val_texts) / (len(train_texts) + len(val_texts)) < 0.1
    assert train.info.corpus_hash == val.info.corpus_hash
    assert train.info.n_tokens == len(train.tokens) == train.doc_offsets[-1]
    assert train.info.n_docs == len(train_texts) and train.info.kind == "stdlib"
    assert train.tokens.dtype == np.uint16


def test_second_load_reuses_cache(tmp_path: Path) -> None:
    src = write_files(tmp_path / "src", {f"doc{i}.txt": f"document {i}\n" * (i + 1) for i in range(30)})
    cache = tmp_path / "cache"
    first = load_corpus(str(src), BYTES, "train", cache)
    entries = cache_entries(cache)
    assert not first.from_cache and len(entries) == 1
    token_file = next((cache / entries[0]).glob("tokens.*"))
    mtime = token_file.stat().st_mtime_ns
    second = load_corpus(str(src), BYTES, "train", cache)
    assert second.from_cache and second.info == first.info
    assert np.array_equal(second.tokens, first.tokens)
    assert token_file.stat().st_mtime_ns == mtime and cache_entries(cache) == entries


def test_cache_key_tracks_content_tokenizer_and_split(tmp_path: Path) -> None:
    src = write_files(tmp_path / "src", {f"d{i}.txt": f"text {i}\n" for i in range(30)})
    cache = tmp_path / "cache"
    base = load_corpus(str(src), BYTES, "train", cache)
    bpe_file = tmp_path / "tok.model"
    bpe_file.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    load_corpus(str(src), Tokenizer.from_file(bpe_file), "train", cache)
    load_corpus(str(src), BYTES, "val", cache)
    load_corpus(str(src), BYTES, "train", cache, bos=True)
    assert len(cache_entries(cache)) == 4
    (src / "d0.txt").write_text("changed\n")
    changed = load_corpus(str(src), BYTES, "train", cache)
    assert not changed.from_cache and changed.info.corpus_hash != base.info.corpus_hash
    assert len(cache_entries(cache)) == 5


def test_directory_order_eos_between_documents_and_bos(tmp_path: Path) -> None:
    files = {"b.txt": "second", "a.txt": "first", "sub/c.md": "third", ".hidden": "no", ".git/x": "no"}
    src = write_files(tmp_path / "src", files)
    corpus = load_corpus(str(src), BYTES, "train", tmp_path / "cache", val_fraction=0.0)
    assert texts_of(corpus) == ["first", "second", "third"]
    assert corpus.tokens.tolist() == [*b"first", EOS, *b"second", EOS, *b"third", EOS]
    with_bos = load_corpus(str(src), BYTES, "train", tmp_path / "cache", val_fraction=0.0, bos=True)
    assert with_bos.tokens[: len("first") + 2].tolist() == [BYTES.bos_id, *b"first", EOS]
    assert with_bos.info.n_tokens == corpus.info.n_tokens + 3


def test_hash_split_is_disjoint_stable_and_never_empty(tmp_path: Path) -> None:
    src = write_files(tmp_path / "src", {f"f{i:03d}.txt": f"file {i}" for i in range(200)})
    train = texts_of(load_corpus(str(src), BYTES, "train", tmp_path / "c1", val_fraction=0.2))
    val = texts_of(load_corpus(str(src), BYTES, "val", tmp_path / "c1", val_fraction=0.2))
    assert sorted(train + val) == sorted(f"file {i}" for i in range(200)) and not set(train) & set(val)
    assert 20 < len(val) < 60
    assert texts_of(load_corpus(str(src), BYTES, "val", tmp_path / "c2", val_fraction=0.2)) == val
    two = write_files(tmp_path / "two", {"a.txt": "alpha", "b.txt": "beta"})
    val_two = texts_of(load_corpus(str(two), BYTES, "val", tmp_path / "c3", val_fraction=1e-9))
    train_two = texts_of(load_corpus(str(two), BYTES, "train", tmp_path / "c3", val_fraction=1e-9))
    assert len(val_two) == 1 and sorted(val_two + train_two) == ["alpha", "beta"]


def test_single_text_file_splits_at_a_line_break(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    path = tmp_path / "book.txt"
    path.write_text(text)
    train = texts_of(load_corpus(str(path), BYTES, "train", tmp_path / "cache", val_fraction=0.1))
    val = texts_of(load_corpus(str(path), BYTES, "val", tmp_path / "cache", val_fraction=0.1))
    assert train[0] + val[0] == text
    assert train[0].endswith("\n") and val[0].startswith("line ")
    assert 0.05 < len(val[0]) / len(text) < 0.15


def test_a_text_file_read_whole_keeps_a_last_line_without_newline(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(20)) + "the end, no newline"
    path = tmp_path / "notes.txt"
    path.write_text(text)
    assert texts_of(load_corpus(str(path), BYTES, "train", tmp_path / "cache", val_fraction=0.0)) == [text]


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [{"text": f"record {i}", "id": i} for i in range(40)]
    path.write_text("\n\n".join(json.dumps(r) for r in records) + "\n")
    train = texts_of(load_corpus(str(path), BYTES, "train", tmp_path / "cache"))
    val = texts_of(load_corpus(str(path), BYTES, "val", tmp_path / "cache"))
    assert sorted(train + val) == sorted(r["text"] for r in records)
    assert train == sorted(train, key=lambda t: int(t.split()[1]))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "{broken"], r"data.jsonl:2: not a UTF-8 JSON object"),
        (['{"body": "x"}'], r":1: .*'text' field"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_corpus(str(path), BYTES, "train", tmp_path / "cache", val_fraction=0.0)


def test_bpe_tokenizer_documents(tmp_path: Path) -> None:
    merges = [b"ab", b"abc"]
    model = tmp_path / "tok.model"
    ranks = [bytes([b]) for b in range(256)] + merges
    model.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = Tokenizer.from_file(model, kind="llama3")
    src = write_files(tmp_path / "src", {"x.txt": "abcab abc", "y.txt": "cab"})
    corpus = load_corpus(str(src), tok, "train", tmp_path / "cache", val_fraction=0.0)
    assert corpus.tokens.tolist() == tok.encode("abcab abc", eos=True) + tok.encode("cab", eos=True)
    assert corpus.tokens.dtype == np.uint16 and tok.eos_id == 258 + 1


@pytest.mark.parametrize("suffix, dtype", [(".u16.bin", np.uint16), (".u32.bin", np.uint32)])
def test_pretokenised_bin_is_used_in_place(tmp_path: Path, suffix: str, dtype: type) -> None:
    ids = np.array([1, 2, EOS, 3, 4, 5, EOS, 6, 7, EOS] * 10, dtype=dtype)
    path = tmp_path / f"tokens{suffix}"
    ids.tofile(path)
    train = load_corpus(str(path), BYTES, "train", tmp_path / "cache", val_fraction=0.1)
    val = load_corpus(str(path), BYTES, "val", tmp_path / "cache", val_fraction=0.1)
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == dtype
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), ids)
    assert len(val.tokens) == 10 and train.info.n_docs == 27 and val.info.n_docs == 3
    assert [d.tolist() for d in val.documents()] == [[1, 2, EOS], [3, 4, 5, EOS], [6, 7, EOS]]
    assert not (tmp_path / "cache").exists()


def test_bin_errors(tmp_path: Path) -> None:
    plain = tmp_path / "tokens.bin"
    plain.write_bytes(b"\0\0")
    with pytest.raises(ConfigError, match=r"data.source: .*rename it to \*.u16.bin"):
        load_corpus(str(plain), BYTES, "train", tmp_path)
    odd = tmp_path / "odd.u16.bin"
    odd.write_bytes(b"\0\0\0")
    with pytest.raises(ConfigError, match="3 bytes, not a whole"):
        load_corpus(str(odd), BYTES, "train", tmp_path)
    big = tmp_path / "big.u16.bin"
    np.array([1, 5000], dtype=np.uint16).tofile(big)
    with pytest.raises(ConfigError, match="token id 5000, but the tokenizer has vocab_size 320"):
        load_corpus(str(big), BYTES, "train", tmp_path)


def test_missing_source_names_key_and_what_exists(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data.source: .*corpus.tx.*does not exist.*contains: corpus.txt.*stdlib"):
        load_corpus(str(tmp_path / "corpus.tx"), BYTES, "train", tmp_path / "cache")
    with pytest.raises(ConfigError, match="does not exist either"):
        load_corpus(str(tmp_path / "no" / "such.txt"), BYTES, "train", tmp_path / "cache")


def test_empty_corpora_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match="holds no non-hidden files"):
        load_corpus(str(tmp_path / "empty_dir"), BYTES, "train", tmp_path / "cache")
    write_files(tmp_path / "blank", {"a.txt": "", "b.txt": ""})
    with pytest.raises(ConfigError, match="no non-empty documents in the train split"):
        load_corpus(str(tmp_path / "blank"), BYTES, "train", tmp_path / "cache")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"\(0 documents in the source"):
        load_corpus(str(tmp_path / "blank.jsonl"), BYTES, "val", tmp_path / "cache")
    write_files(tmp_path / "some", {"a.txt": "x", "b.txt": "y"})
    with pytest.raises(ConfigError, match=r"val split .*data.val_fraction=0.0"):
        load_corpus(str(tmp_path / "some"), BYTES, "val", tmp_path / "cache", val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be in \[0, 1\)"):
        load_corpus(str(tmp_path / "some"), BYTES, "train", tmp_path / "cache", val_fraction=1.0)
    assert cache_entries(tmp_path / "cache") == []


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt is not UTF-8"):
        load_corpus(str(tmp_path / "src"), BYTES, "train", tmp_path / "cache", val_fraction=0.0)


class FailingTokenizer(Tokenizer):
    """Byte-level, but dies on the third document: a build interrupted half way."""

    calls = 0

    def encode_array(self, text: str) -> np.ndarray:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("interrupted")
        return super().encode_array(text)


def test_interrupted_build_leaves_no_entry(tmp_path: Path) -> None:
    src = write_files(tmp_path / "src", {f"d{i}.txt": f"text {i}" for i in range(5)})
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        load_corpus(str(src), FailingTokenizer.byte_level(), "train", cache, val_fraction=0.0)
    assert cache_entries(cache) == []
    corpus = load_corpus(str(src), BYTES, "train", cache, val_fraction=0.0)
    assert not corpus.from_cache and texts_of(corpus) == [f"text {i}" for i in range(5)]


def test_long_sequences(tmp_path: Path) -> None:
    src = write_files(tmp_path / "src", {"a.txt": "a" * 50, "b.txt": "b" * 10, "c.txt": "c" * 80, "d.txt": "d" * 70})
    corpus = load_corpus(str(src), BYTES, "train", tmp_path / "cache", val_fraction=0.0)
    seqs = corpus.long_sequences(60, 5)
    assert seqs.dtype == np.int64 and seqs.shape == (2, 60)
    assert seqs.tolist() == [[ord("c")] * 60, [ord("d")] * 60]
    assert corpus.long_sequences(5, 2).tolist() == [[ord("a")] * 5, [ord("b")] * 5]
    with pytest.raises(ValueError, match="no train document .* has 100 tokens \\(the longest has 81\\)"):
        corpus.long_sequences(100, 1)

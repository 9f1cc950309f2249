"""`llamoe data prepare`: round trips per source kind, worker-count independence, uint32 shards, training and
resuming from a prepared directory, damaged shards, tokenizer mismatch, bad input and interrupted prepares."""

import base64
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamoe.experiments import cli
from llamoe.experiments.commands.train import cli_main as train_main
from llamoe.experiments.config import TokenizerConfig
from llamoe.experiments.data import prepare as prep
from llamoe.experiments.data.corpus import _select, load_corpus, split_groups
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.models.config import ConfigError
from tests.experiments.conftest import TINY_DENSE, write_corpus

MERGES = [b"th", b"he", b"the", b" t", b" the", b"at", b" c", b"an", b"nd", b" and", b"er", b"un", b"der"]


def write_bpe(path: Path, extra: list[bytes]) -> Path:
    """A Llama-3-kind tokenizer.model: the 256 bytes, then `extra` merges."""
    tokens = [bytes([b]) for b in range(256)] + extra
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """60 documents and, so that the split must keep groups together, near copies of 8 of them (one word changed)."""
    root = write_corpus(tmp_path_factory.mktemp("src") / "docs")
    texts = [p.read_text() for p in sorted(root.iterdir())]
    return texts + [texts[i].replace(" the ", " THE ", 1) for i in range(0, 60, 8)]


@pytest.fixture
def bpe(tmp_path: Path) -> TokenizerConfig:
    return TokenizerConfig("llama3", str(write_bpe(tmp_path / "tok.model", MERGES)))


def run_prepare(source: Path, out: Path, cfg: TokenizerConfig, **options: Any) -> dict[str, Any]:
    """prepare() with the tokenizer a run config section describes (its path goes into the manifest)."""
    return prep.prepare(source, out, cfg.build(), cfg.path, **options)


def write_source(kind: str, root: Path, docs: list[str]) -> Path:
    if kind == "text":
        (root / "all.txt").write_text("".join(docs))
        return root / "all.txt"
    if kind == "directory":
        for i, doc in enumerate(docs):
            (root / "docs" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
            (root / "docs" / f"d{i % 3}" / f"{i:02d}.txt").write_text(doc)
        return root / "docs"
    if kind == "jsonl":
        lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(docs)]
        (root / "docs.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
        return root / "docs.jsonl"
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), root / "docs.parquet", row_group_size=7)
    return root / "docs.parquet"


def expected_split(kind: str, source: Path, docs: list[str], split: str, tok: Tokenizer, bos: bool) -> np.ndarray:
    """The split tokenised directly: each selected document encoded whole, with bos/eos around it."""
    if kind == "text":
        text = source.read_text()
        cut = text.rfind("\n", 0, int(len(text) * 0.8)) + 1
        texts = [text[:cut] if split == "train" else text[cut:]]
    else:
        if kind == "directory":
            files = sorted(source.rglob("*.txt"), key=lambda p: p.relative_to(source).as_posix())
            keys, ordered = [p.relative_to(source).as_posix() for p in files], [p.read_text() for p in files]
        else:
            keys, ordered = [str(i) for i in range(len(docs))], docs
        groups = split_groups(ordered, 0.2)
        copies = sum(" THE " in t for t in ordered)
        assert len(set(groups.tolist())) == len(ordered) - copies  # each near copy joined its original
        # the fixture's copies make grouping matter: the per-document rule would split a pair
        assert not copies or _select(keys, split, 0.2) != _select(keys, split, 0.2, groups)
        texts = [ordered[i] for i in _select(keys, split, 0.2, groups)]
    return np.concatenate([tok.encode(t, bos=bos, eos=True) for t in texts])


def prepared_tokens(out: Path, tok: Tokenizer, split: str, bos: bool = False) -> tuple[np.ndarray, Any]:
    corpus = load_corpus(str(out), tok, split, out / "unused-cache", val_fraction=0.2, bos=bos)
    return np.asarray(corpus.tokens), corpus


@pytest.mark.parametrize("kind", ["text", "directory", "jsonl", "parquet"])
def test_round_trip_equals_tokenising_the_documents(
    kind: str, tmp_path: Path, docs: list[str], bpe: TokenizerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prep, "ITEM_BYTES", 300)  # many work items; a text file in many pieces
    source = write_source(kind, tmp_path, docs)
    bos = kind in ("jsonl", "text")
    manifest = run_prepare(source, tmp_path / "out", bpe, val_fraction=0.2, bos=bos, text_field="body",
                            shard_tokens=2000)  # fmt: skip
    tok = bpe.build()
    assert manifest["dtype"] == "uint16" and manifest["source"]["kind"] == kind
    assert len(manifest["splits"]["train"]["shards"]) > 1
    for split in ("train", "val"):
        tokens, corpus = prepared_tokens(tmp_path / "out", tok, split, bos)
        assert np.array_equal(tokens, expected_split(kind, source, docs, split, tok, bos)), split
        assert corpus.info.kind == "prepared" and corpus.info.n_tokens == manifest["splits"][split]["n_tokens"]
        for first in range(0, len(tokens), 97):  # windows across shard boundaries, as the batches read them
            assert np.array_equal(corpus.tokens[first : first + 150], tokens[first : first + 150])
        starts = corpus.doc_offsets[:-1]
        assert np.all(tokens[corpus.doc_offsets[1:] - 1] == tok.eos_id)
        assert np.all(tokens[starts] == tok.bos_id) == bos
    if kind != "parquet":  # the token cache reads the same sources; the prepared streams equal its
        field_free = source
        if kind == "jsonl":
            field_free = tmp_path / "text.jsonl"
            field_free.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        for split in ("train", "val"):
            cached = load_corpus(str(field_free), tok, split, tmp_path / "cache", val_fraction=0.2, bos=bos)
            assert np.array_equal(prepared_tokens(tmp_path / "out", tok, split, bos)[0], cached.tokens)


def test_one_and_two_workers_write_identical_shards(
    tmp_path: Path, docs: list[str], bpe: TokenizerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prep, "ITEM_BYTES", 500)
    source = write_source("directory", tmp_path, docs)
    one = run_prepare(source, tmp_path / "one", bpe, workers=1, val_fraction=0.2, shard_tokens=3000)
    two = run_prepare(source, tmp_path / "two", bpe, workers=2, val_fraction=0.2, shard_tokens=3000)
    assert one == two and one["totals"]["n_shards"] > 3
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not [n for n in names if n.startswith(".")]  # no marker or temporary directory left behind
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_uint32_shards_for_a_vocab_over_65536(tmp_path: Path, docs: list[str]) -> None:
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]  # every byte pair: ids up to 65791
    cfg = TokenizerConfig("llama3", str(write_bpe(tmp_path / "big.model", pairs)))
    tok = cfg.build()
    assert tok.vocab_size > 65536
    source = write_source("directory", tmp_path, docs[:12])
    manifest = run_prepare(source, tmp_path / "out", cfg, val_fraction=0.2)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    assert all(s["file"].endswith(".u32.bin") for s in manifest["splits"]["train"]["shards"])
    tokens, _ = prepared_tokens(tmp_path / "out", tok, "train")
    assert tokens.max() > 65535
    assert np.array_equal(tokens, expected_split("directory", source, docs[:12], "train", tok, False))


def run_from(out: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.source={out}", "data.val_fraction=0.2", "train.seq_len=32",
            "train.batch_size=8", "train.log_every=1", "train.val_every=0", "train.val_batches=2",
            "train.save_every=0", "optim.warmup_steps=2", "optim.decay_steps=6", "train.progress=false",
            f"train.max_steps={steps}", f"data.cache_dir={run_dir.parent / 'cache'}", *TINY_DENSE, *extra]  # fmt: skip


def test_training_from_a_prepared_dir_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prep, "ITEM_BYTES", 2000)
    source = write_corpus(tmp_path / "docs")
    manifest = run_prepare(source, tmp_path / "out", TokenizerConfig(), val_fraction=0.2, shard_tokens=5000)
    assert len(manifest["splits"]["train"]["shards"]) > 2  # batches read windows across shard boundaries
    assert train_main(["/dev/null", *run_from(source, tmp_path / "from_source", 6)]) == 0
    moved = shutil.move(source, tmp_path / "gone")  # training from the prepared dir never reads the source
    assert train_main(["/dev/null", *run_from(tmp_path / "out", tmp_path / "straight", 6)]) == 0
    assert train_main(["/dev/null", *run_from(tmp_path / "out", tmp_path / "resumed", 3)]) == 0
    assert train_main(["/dev/null", *run_from(tmp_path / "out", tmp_path / "resumed", 6)]) == 0
    assert "resuming from" in capsys.readouterr().out and Path(moved).is_dir()
    losses: Callable[[str], list[float]] = lambda name: [r["loss"] for r in read_metrics(tmp_path / name)]  # noqa: E731
    assert len(losses("straight")) == 6
    assert losses("resumed") == losses("straight") == losses("from_source")


@pytest.fixture
def prepared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(prep, "ITEM_BYTES", 2000)
    run_prepare(write_corpus(tmp_path / "docs"), tmp_path / "out", TokenizerConfig(), val_fraction=0.2,
                 shard_tokens=5000)  # fmt: skip
    return tmp_path / "out"


def test_damaged_shard_and_mismatched_settings_exit_2(
    prepared_dir: Path, tmp_path: Path, bpe: TokenizerConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(*extra: str) -> str:
        capsys.readouterr()
        assert cli.main(["train", "/dev/null", *run_from(prepared_dir, tmp_path / "run", 2), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        return err

    bpe_args = [f"tokenizer.kind={bpe.kind}", f"tokenizer.path={bpe.path}", "model.vocab_size=600"]
    assert "tokenizer.kind=byte_level" in error(*bpe_args) and "tokenizer.path" in error(*bpe_args)
    assert "data.val_fraction=0.2" in error("data.val_fraction=0.1")
    assert "data.bos=False" in error("data.bos=true")
    shard = prepared_dir / "train-00001.u16.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert str(shard) in (message := error()) and "rerun `llamoe data prepare`" in message
    shard.unlink()
    assert f"{shard} is missing" in error()


def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, docs: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def error(*args: str) -> str:
        capsys.readouterr()
        assert cli.main(["data", "prepare", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        return err

    out = str(tmp_path / "out")
    assert "nothing.txt does not exist" in error(str(tmp_path / "nothing.txt"), out)
    (tmp_path / "table.csv").write_text("a,b\n")
    assert "unknown extension '.csv'" in error(str(tmp_path / "table.csv"), out)
    jsonl = write_source("jsonl", tmp_path, docs)
    assert "no string field 'text'" in (message := error(str(jsonl), out)) and "--text-field" in message
    parquet = write_source("parquet", tmp_path, docs)
    assert "no column 'text'" in error(str(parquet), str(tmp_path / "out2"), "--text-field", "text")
    assert "--tokenizer-path" in error(str(jsonl), out, "--tokenizer", "llama3")
    monkeypatch.setattr(prep, "pq", None)
    assert "pip install pyarrow" in error(str(parquet), out, "--text-field", "body")
    assert not (tmp_path / "out" / "manifest.json").exists()
    capsys.readouterr()
    assert cli.main(["data", "prepare", str(jsonl), out, "--text-field", "body"]) == 0
    assert "already holds a prepared corpus" in error(str(jsonl), out, "--text-field", "body")


def test_interrupted_prepare_leaves_no_manifest(
    tmp_path: Path, docs: list[str], bpe: TokenizerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prep, "ITEM_BYTES", 500)
    source = write_source("directory", tmp_path, docs)
    original, calls = prep.tokenise_item, []

    def failing(item: Any) -> Any:  # a Ctrl-C in the middle of the source
        calls.append(item)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(item)

    monkeypatch.setattr(prep, "tokenise_item", failing)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(source, tmp_path / "out", bpe, val_fraction=0.2, shard_tokens=1000)
    assert len(calls) == 5 and not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="interrupted `llamoe data prepare`"):
        load_corpus(str(tmp_path / "out"), bpe.build(), "train", tmp_path / "cache", val_fraction=0.2)
    monkeypatch.setattr(prep, "tokenise_item", original)
    again = run_prepare(source, tmp_path / "out", bpe, val_fraction=0.2, shard_tokens=1000)
    clean = run_prepare(source, tmp_path / "clean", bpe, val_fraction=0.2, shard_tokens=1000)
    assert again == clean
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (tmp_path / "clean").iterdir()
    )

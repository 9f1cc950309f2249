"""Hugging Face tokenizer.json (`tokenizer.kind=hf`): the ids transformers' own tokenizer gives, special tokens from
tokenizer_config.json, control-token names in text kept as text, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from llamoe.experiments.config import load_run_config
from llamoe.experiments.data.corpus import load_corpus
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.train import preflight
from llamoe.models.config import ConfigError

TEXT = "the cat sat on a mat and then the small dog ran in the park at night. " * 20


def write_hf_tokenizer(directory: Path, *, adds_bos: bool, config: dict | None = None) -> Path:
    """A small byte-level BPE trained on TEXT, saved as tokenizer.json + tokenizer_config.json; with `adds_bos` its
    post-processor starts every text with <s>, as Llama 3's tokenizer.json does."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator([TEXT], trainer)
    if adds_bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.save(str(directory / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"} if config is None else config
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory / "tokenizer.json"


def test_ids_and_special_tokens_are_those_of_transformers(tmp_path: Path) -> None:
    path = write_hf_tokenizer(tmp_path / "tok", adds_bos=True)
    tok, hf = Tokenizer.from_file(path, kind="hf"), AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "the small cat ran at night, then sat on the mat"
    assert tok.encode(text, bos=True) == hf(text)["input_ids"]  # HF's own convention: bos first
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    assert tok.adds_bos and tok.kind == "hf" and tok.vocab_size == len(hf) > 260
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)


def test_control_token_names_in_text_stay_text(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(write_hf_tokenizer(tmp_path, adds_bos=False), kind="hf")
    ids = tok.encode("a</s>b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a</s>b"


def test_without_a_bos_token_or_a_post_processor(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(write_hf_tokenizer(tmp_path, adds_bos=False, config={"eos_token": "</s>"}), kind="hf")
    assert (tok.bos_id, tok.adds_bos, tok.pad_id) == (None, False, tok.eos_id)  # pad defaults to eos
    with pytest.raises(ValueError, match="defines no bos"):
        tok.encode("a", bos=True)
    nested = {"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}}  # the older dict form
    tok = Tokenizer.from_file(write_hf_tokenizer(tmp_path / "b", adds_bos=False, config=nested), kind="hf")
    assert (tok.bos_id, tok.eos_id, tok.adds_bos) == (1, 2, False)


def test_bad_files_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "missing.json", kind="hf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad" / "tokenizer.json", kind="hf")
    path = write_hf_tokenizer(tmp_path / "no_eos", adds_bos=False, config={})
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_file(path, kind="hf")
    path = write_hf_tokenizer(tmp_path / "unknown", adds_bos=False, config={"eos_token": "<|nope|>"})
    with pytest.raises(ValueError, match="'<|nope|>' is not a token"):
        Tokenizer.from_file(path, kind="hf")


def test_a_run_config_trains_on_it(tmp_path: Path) -> None:
    path = write_hf_tokenizer(tmp_path / "tok", adds_bos=True)
    cfg = load_run_config(None, ["tokenizer.kind=hf", f"tokenizer.path={path}", "model.vocab_size=300"])
    tok = cfg.tokenizer.build()
    (tmp_path / "text.txt").write_text(TEXT)
    corpus = load_corpus(str(tmp_path / "text.txt"), tok, "train", tmp_path / "cache", val_fraction=0.0, bos=True)
    assert corpus.tokens[0] == tok.bos_id and corpus.tokens[-1] == tok.eos_id
    assert corpus.tokens[1:-1].tolist() == tok.encode(TEXT)
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_run_config(None, ["tokenizer.kind=hf"])
    small = load_run_config(None, ["tokenizer.kind=hf", f"tokenizer.path={path}", "model.vocab_size=200"])
    with pytest.raises(ConfigError, match="model.vocab_size"):
        preflight.check(small)  # the file's vocabulary is read where the run starts

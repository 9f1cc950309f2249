"""data.bos: training documents start with the tokenizer's bos (pretrained Llamas are trained so), and a
tokenizer without one is refused naming the key."""

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import ConfigError, load_run_config
from llamoe.experiments.train.distributed import World
from llamoe.experiments.train.loop import run_corpus, train_batches


def test_data_bos_starts_every_document_with_bos(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_dense: list[str]
) -> None:
    args = run_args(tmp_path / "run", *tiny_dense, "train.max_steps=2")
    counts = {}
    for bos in (False, True):
        cfg = load_run_config(None, [*args, f"data.bos={str(bos).lower()}"])
        tok = cfg.tokenizer.build()
        corpus = run_corpus(cfg, tok, "train")
        starts = np.flatnonzero(corpus.tokens == tok.eos_id) + 1  # a document begins after each eos
        counts[bos] = int((corpus.tokens == tok.bos_id).sum())
        if bos:
            assert corpus.tokens[0] == tok.bos_id and (corpus.tokens[starts[:-1]] == tok.bos_id).all()
            assert counts[True] == len(starts) and run_corpus(cfg, tok, "val").info.bos
    assert counts[False] == 0
    assert cli_main(["/dev/null", *args, "data.bos=true"]) == 0


def test_a_tokenizer_without_bos_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, corpus: list[str]) -> None:
    cfg = load_run_config(None, [*corpus, "data.bos=true"])
    tok = cfg.tokenizer.build()
    monkeypatch.setattr(tok, "bos_id", None)
    with pytest.raises(ConfigError, match="data.bos"):
        train_batches(cfg, tok, World())

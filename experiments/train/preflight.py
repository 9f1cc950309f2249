"""Checks of a run config against this machine, made where the run starts (training, a sweep's plan).

Config validation (experiments/config.py) looks at the config alone and never touches a file, so a
run directory's config.yaml can be read anywhere: on a laptop without the data, on a login node
without CUDA. What depends on the machine is checked here, just before it is used: the tokenizer
file and its vocabulary, the data source, the `init_from` weights (their config is read and the
mapping planned, never the tensors), TensorBoard, the compiler and CUDA. Errors are the same
one-line `ConfigError(key, fix)` (exit 2) that validation raises.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from llamoe.experiments.config import RunConfig
from llamoe.experiments.train import init_from
from llamoe.models.compile import compiler_missing
from llamoe.models.config import ConfigError


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


def check(cfg: RunConfig) -> None:
    """Raise ConfigError naming the first key this machine cannot serve, and the fix."""
    tok = cfg.tokenizer
    if tok.path is not None:
        _need(Path(tok.path).expanduser().is_file(), "tokenizer.path", f"{tok.path!r} does not exist")
        try:
            vocab = tok.build().vocab_size
        except ValueError as e:
            raise ConfigError("tokenizer.path", f"cannot load {tok.path!r}: {e}") from None
        _need(
            vocab <= cfg.model.vocab_size,
            "model.vocab_size",
            f"={cfg.model.vocab_size} is smaller than the {tok.kind} tokenizer's {vocab} ids; "
            f"set model.vocab_size={vocab}",
        )
    source = cfg.data.source
    if source != "stdlib":
        _need(Path(source).expanduser().exists(), "data.source", f"{source!r} does not exist")
    if cfg.init_from:
        init_from.check(cfg)  # plans the mapping from the source's config: a tensor that cannot map fails here
    t = cfg.train
    if t.tensorboard:
        _need(
            importlib.util.find_spec("tensorboard") is not None,
            "train.tensorboard",
            "needs the tensorboard package: pip install -e '.[tb]' (or set train.tensorboard=false)",
        )
    if t.compile:
        cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        missing = compiler_missing("cuda" if cuda else "cpu")
        _need(missing is None, "train.compile", f"{missing}; install it or set train.compile=false")
    if t.device == "cuda":
        _need(torch.cuda.is_available(), "train.device", "is cuda but this machine has no CUDA device; use auto or cpu")

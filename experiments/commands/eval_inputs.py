"""What `llamoe eval PATH` evaluates besides the weights: tokenizer, text and training length, for any PATH.

PATH is a run directory, a checkpoint, a `llamoe convert` file or a local Hugging Face directory
(experiments/train/model_source.py). A run brings its own tokenizer, text and training length; a model
without a run needs them from these inputs (key=value words on the command line, beside the suite's
options; each also overrides a run's):

    data.source=S        the evaluation text: a text file, a directory, a JSONL file of long documents
                         ("text" field). Given, it is evaluated whole; without it a run is evaluated on
                         the held-out split of its own data.source.
    data.cache_dir=D     where the tokenised text is cached (default ~/.cache/llamoe/data)
    tokenizer=PATH       Meta's tokenizer.model, a Hugging Face tokenizer.json, or `byte_level`. Default: the
                         run's; for a Hugging Face directory the first of `original/tokenizer.model`,
                         `tokenizer.model` (Meta's, as HF Llama repositories ship it) and `tokenizer.json`
    tokenizer.kind=K     llama3 | llama4 | hf (default: hf for a .json file; else from the HF config's
                         model_type, else the run's, else llama3)
    train_len=N          the training length the length multiples and delta_tail_nll refer to. Default:
                         the run's train.seq_len; for a model without a run, the shortest of --lengths

A missing piece is a ConfigError naming the input (exit 2). The result is one RunConfig, the run's
(with the inputs applied) or one made for the model, so `evaluate_run` treats every PATH alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from llamoe.experiments.config import RunConfig, TokenizerConfig, load_run_config
from llamoe.experiments.data.corpus import Corpus, load_corpus
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.train.model_source import HF, ModelSource, hf_tokenizer_file
from llamoe.models.config import ConfigError, model_config_to_dict

INPUT_KEYS = ("data.source", "data.cache_dir", "tokenizer", "tokenizer.kind", "train_len")
_HF_TOKENIZER_KINDS = {"llama": "llama3", "llama4": "llama4", "llama4_text": "llama4"}


def split_inputs(items: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, the rest: the suite's options) of a dotted key=value mapping."""
    inputs = {k: v for k, v in items.items() if k in INPUT_KEYS}
    return inputs, {k: v for k, v in items.items() if k not in INPUT_KEYS}


def _tokenizer(source: ModelSource, inputs: Mapping[str, Any]) -> Optional[TokenizerConfig]:
    """The tokenizer the inputs or the HF layout give; None keeps the run's."""
    path = inputs.get("tokenizer")
    if path is None and source.kind == HF:
        path = hf_tokenizer_file(source.path)
        if path is None:
            raise ConfigError(
                "tokenizer",
                f"{source.path} has no original/tokenizer.model, tokenizer.model or tokenizer.json; pass "
                "tokenizer=PATH (Meta's tokenizer.model or a tokenizer.json) or tokenizer=byte_level",
            )
    if path is None:
        if source.run is None:
            raise ConfigError("tokenizer", f"evaluating {source.describe()} needs tokenizer=PATH (or byte_level)")
        return None
    if str(path) == "byte_level":
        return TokenizerConfig(kind="byte_level")
    run_kind = source.run.tokenizer.kind if source.run is not None else "byte_level"
    default = _HF_TOKENIZER_KINDS.get(source.hf_model_type or "", run_kind if run_kind != "byte_level" else "llama3")
    kind = inputs.get("tokenizer.kind", "hf" if str(path).endswith(".json") else default)
    if not Path(str(path)).expanduser().is_file():
        raise ConfigError(
            "tokenizer", f"{path} is not a file; pass Meta's tokenizer.model, a tokenizer.json or tokenizer=byte_level"
        )
    return TokenizerConfig(kind=kind, path=str(path))


def eval_config(
    source: ModelSource,
    inputs: Mapping[str, Any],
    lengths: list[int],
    model_overrides: Optional[Mapping[str, Any]] = None,
) -> RunConfig:
    """The run config an evaluation of `source` uses: the run's, or one made for the model (see the module
    docstring), with `inputs` and `model_overrides` ({"model.attention.chunk_size": 64, ...}) applied."""
    unknown = sorted(set(inputs) - set(INPUT_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown input; the inputs are {', '.join(INPUT_KEYS)}")
    if source.run is not None:
        base = source.run.to_dict()
    else:
        if "data.source" not in inputs:
            raise ConfigError(
                "data.source", f"evaluating {source.describe()} needs the text: data.source=FILE|DIR|JSONL"
            )
        train_len = inputs.get("train_len", min(lengths) if lengths else None)
        if train_len is None:
            raise ConfigError("train_len", f"{source.describe()} has no training length; pass train_len=N or --lengths")
        base = {
            "run_dir": str(source.path),
            "model": model_config_to_dict(source.model),
            "train": {"seq_len": train_len},
        }
    layer: dict[str, Any] = {k: inputs[k] for k in ("data.source", "data.cache_dir") if k in inputs}
    if "train_len" in inputs:
        layer["train.seq_len"] = inputs["train_len"]
    tokenizer = _tokenizer(source, inputs)
    if tokenizer is not None:
        layer["tokenizer"] = {"kind": tokenizer.kind, "path": tokenizer.path}
    return load_run_config(base, {**layer, **(model_overrides or {})}, world_size=None)


def build_tokenizer(cfg: RunConfig, vocab_size: int) -> Tokenizer:
    """The config's tokenizer, checked to fit the model's vocabulary (ConfigError on `tokenizer`)."""
    try:
        tokenizer = cfg.tokenizer.build()
    except (OSError, ValueError) as e:
        raise ConfigError("tokenizer", f"cannot load {cfg.tokenizer.path}: {e}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            "tokenizer",
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary "
            f"of {vocab_size}; pass the tokenizer the model was trained with",
        )
    return tokenizer


def heldout_text(cfg: RunConfig, tokenizer: Tokenizer, whole: bool) -> Corpus:
    """The evaluation text: data.source whole (`whole`, when the inputs name it) or its held-out split."""
    cache = Path(cfg.data.cache_dir).expanduser()
    if whole:  # val_fraction 0 puts every document in one split
        return load_corpus(cfg.data.source, tokenizer, "train", cache, val_fraction=0.0)
    return load_corpus(cfg.data.source, tokenizer, "val", cache, val_fraction=cfg.data.val_fraction)


__all__ = ["INPUT_KEYS", "build_tokenizer", "eval_config", "heldout_text", "split_inputs"]

"""Reading a corpus written by `llamoe data prepare` (experiments/data/prepare.py): the manifest, cheap
checks, and the shards of one split memory-mapped as one token stream.

Public API:
    MANIFEST, MARKER                       file names: the manifest (written last), the in-progress marker
    is_prepared(path) / is_interrupted(path)
    open_prepared(path, tokenizer, split, val_fraction, bos) -> (tokens, doc_offsets, manifest)
    ShardedTokens                          several memmaps read as one 1-D array (len, slicing, np.asarray)

Layout of a prepared directory (see prepare.py for how it is written):
    manifest.json                  tokenizer identity, dtype, split settings, source and its sha256, and per
                                   split the shard list (file, bytes, n_tokens, n_docs, sha256) and totals
    train-00000.u16.bin ...        token ids, raw little-endian uint16 (uint32: .u32.bin when the vocab
                                   exceeds 65536); documents back to back, each ending in eos (and starting
                                   with bos when prepared with --bos), exactly as the token cache lays them out
    train-offsets.npy              int64 [n_docs + 1]: document i of the split is stream[off[i]:off[i+1]],
    val-...                        where the stream is the split's shards in order; the same for val

Opening trusts the manifest: nothing is re-read or re-hashed. Only cheap things are checked: the
tokenizer (fingerprint and vocab size) against the run's, data.val_fraction and data.bos against the
settings the split was made with, and every file's size against the manifest. A mismatch is a
ConfigError (exit status 2) naming the key or the file and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from llamoe.config_error import ConfigError
from llamoe.experiments.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MARKER = ".llamoe-prepare"  # present while a prepare is writing into the directory
FORMAT = "llamoe-prepared"
VERSION = 2  # 2: the held-out split keeps near-duplicate groups together
_RERUN = "rerun `llamoe data prepare` into a fresh directory"


def is_prepared(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def is_interrupted(path: Path) -> bool:
    """A directory a prepare started writing into and never finished (its manifest is missing)."""
    return (path / MARKER).exists() and not is_prepared(path)


class ShardedTokens:
    """Read-only 1-D view over consecutive memmapped shards: what the batch and eval code need of an array."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self._shards = shards
        self._ends = np.cumsum([len(s) for s in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: Union[int, slice]) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            return self._range(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} is outside {len(self)} tokens")
        return self._range(index, index + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop], copied out of the one or more shards it spans."""
        first = int(np.searchsorted(self._ends, start, side="right"))
        parts, pos = [], start
        for i in range(first, len(self._shards)):
            if pos >= stop:
                break
            base = int(self._ends[i]) - len(self._shards[i])
            parts.append(self._shards[i][pos - base : min(stop, int(self._ends[i])) - base])
            pos = int(self._ends[i])
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def __array__(self, dtype: Optional[np.dtype] = None, copy: Optional[bool] = None) -> np.ndarray:
        whole = np.concatenate(self._shards)
        return whole if dtype is None else whole.astype(dtype)


def tokenizer_identity(tokenizer: Tokenizer, path: Optional[str]) -> dict[str, Any]:
    """What the manifest records of a tokenizer; `fingerprint` is the sha1 of its kind and file content."""
    return {
        "kind": tokenizer.kind,
        "path": path,
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("data.source", f"{root / MANIFEST} cannot be read ({e}); {_RERUN}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(
            "data.source",
            f"{root / MANIFEST} is not a version-{VERSION} llamoe prepared manifest; {_RERUN}",
        )
    return manifest


def _check_tokenizer(root: Path, recorded: dict[str, Any], tokenizer: Tokenizer) -> None:
    if recorded["fingerprint"] == tokenizer.fingerprint and recorded["vocab_size"] == tokenizer.vocab_size:
        return
    path = f" tokenizer.path={recorded['path']}" if recorded["path"] else ""
    raise ConfigError(
        "tokenizer.kind",
        f"{root} was prepared with tokenizer.kind={recorded['kind']}{path} (vocab {recorded['vocab_size']}, "
        f"fingerprint {recorded['fingerprint'][:12]}), but this run's tokenizer is {tokenizer.kind} "
        f"(vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint[:12]}); set tokenizer.kind and "
        "tokenizer.path to the prepared ones, or rerun `llamoe data prepare` with this run's tokenizer",
    )


def _check_size(path: Path, expected: int) -> None:
    size = path.stat().st_size if path.is_file() else None
    if size != expected:
        found = "is missing" if size is None else f"holds {size} bytes"
        raise ConfigError(
            "data.source", f"{path} {found}, the manifest says {expected} bytes; the prepared data is damaged, {_RERUN}"
        )


def open_prepared(
    root: Path, tokenizer: Tokenizer, split: str, val_fraction: float, bos: bool
) -> tuple[Union[np.ndarray, ShardedTokens], np.ndarray, dict[str, Any]]:
    """One split of a prepared directory: its token stream, document offsets and the manifest."""
    manifest = read_manifest(root)
    _check_tokenizer(root, manifest["tokenizer"], tokenizer)
    for key, value in (("val_fraction", val_fraction), ("bos", bos)):
        if manifest[key] != value:
            raise ConfigError(
                f"data.{key}",
                f"{root} was prepared with data.{key}={manifest[key]}, this run has {value}; set "
                f"data.{key}={manifest[key]} or rerun `llamoe data prepare` with --{key.replace('_', '-')}",
            )
    part = manifest["splits"][split]
    if part["n_docs"] == 0:
        raise ConfigError(
            "data.source", f"{root} holds no {split} documents (data.val_fraction={val_fraction}); change it"
        )
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards = []
    for shard in part["shards"]:
        path = root / shard["file"]
        _check_size(path, shard["n_tokens"] * dtype.itemsize)
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    offsets_path = root / part["offsets"]["file"]
    _check_size(offsets_path, part["offsets"]["bytes"])
    offsets = np.load(offsets_path)
    if offsets.shape != (part["n_docs"] + 1,) or int(offsets[-1]) != part["n_tokens"]:
        raise ConfigError("data.source", f"{offsets_path} does not match the manifest; {_RERUN}")
    tokens = shards[0] if len(shards) == 1 else ShardedTokens(shards)
    return tokens, offsets, manifest

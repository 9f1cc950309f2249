"""The work of one `llamoe data prepare` worker process: tokenise an item of documents.

This module imports only numpy and the tokenizer, so a spawned worker starts in a fraction of a
second (the rest of the project imports torch); prepare.py owns everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from llamoe.experiments.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Piece:
    """A document, or a part of one (a large text file): `starts`/`ends` say whether bos/eos go around it."""

    text: str
    starts: bool = True
    ends: bool = True


Item = tuple[str, list[Piece]]  # (split, pieces): one unit of work for a worker

_worker_tokenizer: Optional[Tokenizer] = None
_worker_bos = False


def init_worker(tokenizer: Tokenizer, bos: bool) -> None:
    """Pool initializer (and the one-process path): the tokenizer and bos setting of this process's items."""
    global _worker_tokenizer, _worker_bos
    _worker_tokenizer, _worker_bos = tokenizer, bos


def tokenise_item(item: Item) -> tuple[str, np.ndarray, list[bool], list[int]]:
    """The ids of an item's pieces back to back (bos/eos added) as uint32, which pieces end a document, and
    how many ids each piece gave."""
    split, pieces = item
    tok = _worker_tokenizer
    assert tok is not None, "init_worker was not called"
    parts, lengths = [], []
    for piece in pieces:
        ids = tok.encode_array(piece.text)
        bos, eos = [tok.bos_id] if _worker_bos and piece.starts else [], [tok.eos_id] if piece.ends else []
        parts += [np.array(bos, dtype=np.uint32), ids, np.array(eos, dtype=np.uint32)]
        lengths.append(len(bos) + len(ids) + len(eos))
    return split, np.concatenate(parts), [p.ends for p in pieces], lengths

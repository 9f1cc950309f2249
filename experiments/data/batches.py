"""Batches for training and evaluation: shuffled packed windows, fixed validation windows, mixtures.

Public API:
    PackedBatches(corpus, seq_len, batch_size, seed, rank=0, world_size=1)
        infinite, deterministic, resumable training batches for one data-parallel rank
    ValidationBatches(corpus, seq_len, batch_size, max_batches=None, rank=0, world_size=1)
        the same fixed windows every time it is iterated
    MixedBatches(sources=[(batches, weight), ...], seed)
        each batch drawn from one of several resumable sources, by weight
    ResumableBatches
        the protocol a training loop consumes: an iterator with state_dict()/load_state_dict()

A batch is (inputs, targets): int64 tensors [B, L], targets = inputs shifted left by one.

Packing: the corpus is one token stream whose documents each end in eos, so windows run across
document boundaries with eos between documents. Window w holds tokens[w*L : w*L + L + 1]
(consecutive windows share one token, so every token is a target exactly once per epoch).

Data parallelism: each epoch shuffles the windows with a generator seeded by (seed, epoch). Global
batch k is windows order[k*G : (k+1)*G] with G = batch_size * world_size, and rank r takes the r-th
block of batch_size rows of it. Ranks are disjoint, and concatenating the ranks' batches in rank
order gives exactly the batch a single process with batch_size G would see. The windows left over
after the last whole global batch of an epoch wait for a later epoch's shuffle.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from llamoe.experiments.data.corpus import Corpus
from llamoe.models.config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class ResumableBatches(Protocol):
    """An endless batch iterator whose position can be saved with a checkpoint and restored."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rows_to_batch(tokens: np.ndarray, starts: np.ndarray, width: int) -> Batch:
    """Stack tokens[s : s + width] for each start into inputs/targets [B, width - 1]."""
    rows = torch.from_numpy(np.stack([tokens[s : s + width] for s in starts]).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if seq_len < 1:
        raise ConfigError("train.seq_len", f"must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ConfigError("train.batch_size", f"must give >= 1 sequence per rank, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")


class PackedBatches:
    """Endless shuffled training batches of one rank; see the module docstring for the layout."""

    def __init__(
        self, corpus: Corpus, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        _check_layout(seq_len, batch_size, rank, world_size)
        if seed < 0:
            raise ConfigError("train.seed", f"must be >= 0, got {seed}")
        self.tokens = corpus.tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = (len(corpus.tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.n_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                "train.batch_size",
                f"the {corpus.info.split} split of data.source={corpus.info.source!r} holds {self.n_windows} "
                f"windows of seq_len={seq_len}, fewer than one global batch of {self.global_batch}; "
                "lower train.batch_size or train.seq_len, or use a larger source",
            )
        self.epoch = 0
        self.step = 0  # global batches already taken in this epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _window_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = (self.step * self.world_size + self.rank) * self.batch_size
        windows = self._window_order()[first : first + self.batch_size]
        self.step += 1
        return _rows_to_batch(self.tokens, windows * self.seq_len, self.seq_len + 1)

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, step) plus the settings it is only meaningful under; JSON-safe."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; the rank layout may change, the global batch may not."""
        for key in ("seed", "seq_len", "global_batch", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the saved data position was taken with {key}={state[key]}, but this run has "
                    f"{key}={getattr(self, key)}; resume with the same train.seed, train.seq_len, "
                    "train.batch_size and data settings"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class ValidationBatches:
    """Fixed, in-order windows of a validation split, sharded over ranks; iterate it any number of times.

    All ranks get the same number of windows (the remainder is dropped); the last batch may be
    smaller than batch_size, so average losses weighted by rows.
    """

    def __init__(
        self,
        corpus: Corpus,
        seq_len: int,
        batch_size: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_layout(seq_len, batch_size, rank, world_size)
        n_windows = (len(corpus.tokens) - 1) // seq_len
        n_windows -= n_windows % world_size
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size * world_size)
        if n_windows == 0:
            raise ConfigError(
                "train.seq_len",
                f"the {corpus.info.split} split of data.source={corpus.info.source!r} holds {len(corpus.tokens)} "
                f"tokens, not enough for {world_size} window(s) of seq_len + 1 = {seq_len + 1}",
            )
        self.tokens = corpus.tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.starts = np.arange(rank, n_windows, world_size, dtype=np.int64) * seq_len

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for first in range(0, len(self.starts), self.batch_size):
            yield _rows_to_batch(self.tokens, self.starts[first : first + self.batch_size], self.seq_len + 1)


class MixedBatches:
    """Each batch comes whole from one source, picked with probability proportional to its weight.

    The pick for step t depends only on (seed, t), so every data-parallel rank picks the same source
    at the same step, and the mixture resumes exactly from `state_dict()`.
    """

    def __init__(self, sources: Sequence[tuple[ResumableBatches, float]], seed: int) -> None:
        if not sources:
            raise ValueError("MixedBatches needs at least one (batches, weight) source")
        weights = np.array([float(w) for _, w in sources])
        if not np.all(np.isfinite(weights) & (weights > 0)):
            raise ValueError(f"mixture weights must be positive and finite, got {weights.tolist()}")
        if seed < 0:
            raise ConfigError("train.seed", f"must be >= 0, got {seed}")
        self.sources = [s for s, _ in sources]
        self.cumulative = np.cumsum(weights) / weights.sum()
        self.seed = seed
        self.step = 0

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> Batch:
        draw = np.random.default_rng([self.seed, self.step]).random()
        pick = min(int(np.searchsorted(self.cumulative, draw, side="right")), len(self.sources) - 1)
        self.step += 1
        return next(self.sources[pick])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or len(state["sources"]) != len(self.sources):
            raise ValueError(
                f"the saved mixture had seed={state['seed']} and {len(state['sources'])} sources, this run has "
                f"seed={self.seed} and {len(self.sources)}; resume with the same data mixture and train.seed"
            )
        self.step = int(state["step"])
        for source, saved in zip(self.sources, state["sources"]):
            source.load_state_dict(saved)

"""Synthetic tasks mixed into training: the `data.tasks` section and its resumable batch streams.

    TaskBatches(task, seq_len, batch_size, seed, rank=0, world_size=1)
                                     endless, resumable (inputs, targets) batches; loss on answers only
    TaskMix                          the `data.tasks` config section: fraction of batches per task
    task_sources(mix, tokenizer, seq_len, batch_size, seed, ...) -> [(TaskBatches, weight), ...]
                                     ready for `MixedBatches` next to the corpus batches

The tasks themselves (passkey, needle, MQAR, domains) and their layouts are experiments/data/tasks.py's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from llamoe.config_error import ConfigError
from llamoe.experiments.data.tasks import MQAR, Domains, Needle, Passkey, Task
from llamoe.experiments.data.tokenizer import Tokenizer

TASKS = ("passkey", "needle", "mqar", "domains")  # the task fractions of `data.tasks`


class TaskBatches:
    """Endless (inputs, targets) batches [B, seq_len] of one task; targets are IGNORE_INDEX off the answers.

    Row r of global batch t (over all data-parallel ranks) is `task.sample(seq_len, [seed, salt, t, r])`
    (`TaskExample.training_pair`), so a row has the layout of an evaluation example of nominal length
    seq_len, batches are deterministic, disjoint across ranks, and resume exactly from state_dict(),
    like the corpus batches (`llamoe.experiments.data.batches.ResumableBatches`).
    """

    def __init__(
        self, task: Task, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.task = task
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.salt = zlib.crc32(task.name.encode())  # different tasks draw different streams from one seed
        self.step = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.rank * self.batch_size
        pairs = [
            self.task.sample(self.seq_len, [self.seed, self.salt, self.step, first + i]).training_pair()
            for i in range(self.batch_size)
        ]
        self.step += 1
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        targets = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("task", "seed", "seq_len", "global_batch"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the saved {self.task.name} task position was taken with {key}={state[key]}, but this run "
                    f"has {key}={mine[key]}; resume with the same data.tasks, train.seed, train.seq_len "
                    "and train.batch_size"
                )
        self.step = int(state["step"])


@dataclass(frozen=True)
class TaskMix:
    """`data.tasks`: the fraction of training batches drawn from each synthetic task.

    The corpus (`data.source`) supplies the remaining 1 - sum of fractions; each batch comes
    whole from one source. `mqar_pairs` is the [min, max] number of pairs in training examples;
    `needles` the number of needles per needle example (haystack: the corpus train split);
    `n_domains` the number of languages of the domains task (the same tables for every run:
    tasks.Domains), which the `domains` evaluation scores.
    """

    passkey: float = 0.0
    needle: float = 0.0
    mqar: float = 0.0
    domains: float = 0.0
    mqar_pairs: list[int] = field(default_factory=lambda: [2, 8])
    needles: int = 4
    n_domains: int = 128

    def weights(self) -> dict[str, float]:
        """Task name -> batch fraction, for the tasks in use."""
        return {name: w for name in TASKS if (w := getattr(self, name))}

    @property
    def corpus_weight(self) -> float:
        return 1.0 - sum(self.weights().values())

    def validate(self) -> None:
        for name in TASKS:
            w = getattr(self, name)
            if not 0.0 <= w <= 1.0:
                raise ConfigError(f"data.tasks.{name}", f"is a fraction of batches in [0, 1], got {w}")
        if self.corpus_weight < -1e-9:
            raise ConfigError("data.tasks", f"the task fractions sum to {1 - self.corpus_weight:.3g} > 1; lower them")
        if len(self.mqar_pairs) != 2 or not 1 <= self.mqar_pairs[0] <= self.mqar_pairs[1]:
            raise ConfigError(
                "data.tasks.mqar_pairs", f"must be [min, max] with 1 <= min <= max, got {self.mqar_pairs}"
            )
        if self.needles < 1:
            raise ConfigError("data.tasks.needles", f"must be >= 1, got {self.needles}")
        if not 1 <= self.n_domains <= 10**4:
            raise ConfigError("data.tasks.n_domains", f"must be in [1, 10000], got {self.n_domains}")


def task_sources(
    mix: TaskMix,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    haystack: Optional[np.ndarray] = None,
) -> list[tuple[TaskBatches, float]]:
    """(batches, weight) for each task of `mix` in use; the caller adds (corpus batches, mix.corpus_weight)."""
    mix.validate()
    sources = []
    for name, weight in mix.weights().items():
        task: Task
        if name == "passkey":
            task = Passkey(tokenizer)
        elif name == "mqar":
            task = MQAR(tokenizer, (mix.mqar_pairs[0], mix.mqar_pairs[1]))
        elif name == "domains":
            task = Domains(tokenizer, mix.n_domains)
        else:
            if haystack is None:
                raise ConfigError("data.tasks.needle", "needs corpus text as the haystack; none was given")
            task = Needle(tokenizer, haystack, mix.needles)
        sources.append((TaskBatches(task, seq_len, batch_size, seed, rank, world_size), weight))
    return sources

"""The optimizer side of a training step: AdamW groups, the learning-rate schedule, and the Stepper.

AdamW with decoupled weight decay on matrices only (norm gains and embedding tables do not decay),
a linear warmup then a cosine to `lr * min_lr_ratio` (experiments/config.py: OptimConfig). A
Stepper runs the backward and optimizer step: `LocalStepper` in one process (gradients accumulate
over micro batches, then clip and step), DeepSpeed's engine for ZeRO and expert parallelism
(experiments/train/distributed.py).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol

import torch
from torch import nn

from llamoe.experiments.config import OptimConfig, RunConfig
from llamoe.experiments.train.distributed import World, clip_grad_norm, moe_param_groups
from llamoe.experiments.train.reshard import group_names
from llamoe.models.transformer import ModelOutput


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    horizon = optim.decay_steps or max_steps
    progress = min((step - optim.warmup_steps) / max(horizon - optim.warmup_steps, 1), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def schedule_horizon(optim: OptimConfig, max_steps: int, started_with: Optional[int]) -> int:
    """The step at which the cosine ends: `optim.decay_steps` when set, else the horizon the run started
    with (`started_with`, kept in every checkpoint), else `max_steps`. So rerunning a finished run with a
    larger train.max_steps continues its schedule (at the floor lr · min_lr_ratio once past the horizon)
    instead of recomputing a cosine that would jump the learning rate back up."""
    return optim.decay_steps or started_with or max_steps


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; norm gains (1-D) and embedding tables do not (see the module docstring)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: RunConfig, world: World) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay)
    if world.ep_size > 1:
        groups = moe_param_groups(groups)
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


class Stepper(Protocol):
    """How a step runs: a plain optimizer in one process, or DeepSpeed's engine (experiments/train/distributed.py)."""

    @property
    def module(self) -> nn.Module: ...

    def forward(self, tokens: torch.Tensor) -> ModelOutput: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...

    def set_lr(self, lr: float) -> None: ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any], resharded: bool = False) -> None: ...

    param_names: list[list[str]]  # each optimizer group's parameter names (experiments/train/reshard.py)


class LocalStepper:
    """Single process: gradients accumulate over micro batches, then clip and step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, world: World) -> None:
        self.model = model
        self.optimizer = optimizer
        self.accum = cfg.grad_accum_steps(world.size)
        self.grad_clip = cfg.optim.grad_clip
        self.world = world
        self.param_names = group_names(model, optimizer)

    @property
    def module(self) -> nn.Module:
        return self.model

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        return self.model(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> float:
        norm = float(clip_grad_norm(self.model.parameters(), self.grad_clip, self.world))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any], resharded: bool = False) -> None:
        self.optimizer.load_state_dict(state)

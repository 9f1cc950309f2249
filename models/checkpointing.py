"""Activation checkpointing of transformer blocks: keep a block's input, recompute its forward in the backward.

Policies (`train.activation_checkpointing`, set by `Transformer.set_activation_checkpointing`):

- "none": every block keeps the activations its backward needs.
- "full": every block is checkpointed. A block keeps only its input [B, L, D] until the backward,
  which runs its forward a second time; a training step costs about one more forward.
- "selective": every other block, those with an even layer id (0, 2, 4, ...): about half the
  activation memory for about half the recompute. Under Llama 4's interleave_step=2 (MoE on
  odd layers) these are the dense blocks, so no MoE layer, and no expert-parallel
  all-to-all, runs twice.

`torch.utils.checkpoint.checkpoint(use_reentrant=False)` with the RNG state preserved, so the
recompute is the same computation as the first forward: router jitter draws the same noise, the
routing is the same (expert biases move only at the optimizer step, after the backward), and
losses and gradients equal the run without checkpointing. Under expert parallelism the recompute
issues the block's all-to-alls again; every rank of the group runs the same backward, so they
meet in the same order.

Side effects happen once: torch discards the recompute's outputs (aux loss, router stats), and
the recompute leaves the block's buffers as it found them (`_buffers_restored`). The one buffer a
training forward writes is a router's `expert_load` (moe/router.py), so the bias balancer counts
each micro batch once. Restoring, rather than a flag that skips the count, keeps the recompute
the same code path: a compiled block (`train.compile`) runs the same graph twice instead of
compiling a variant for the flag.
Checkpointing applies only where it can pay off: a training-mode forward with gradients on.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "full", "selective")


def checkpointed_layers(policy: str, n_layers: int) -> list[bool]:
    """Per block, whether `policy` checkpoints it (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown activation checkpointing policy {policy!r}; choose one of {'|'.join(POLICIES)}")
    return [policy == "full" or (policy == "selective" and i % 2 == 0) for i in range(n_layers)]


def run_block(block: nn.Module, checkpointed: bool, *args: Any) -> Any:
    """`block(*args)`, checkpointed when asked to and when a backward will follow."""
    if not (checkpointed and block.training and torch.is_grad_enabled()):
        return block(*args)
    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: _contexts(block))


def _contexts(block: nn.Module) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """(first forward, recompute): the recompute changes no buffer, so router load counts once."""
    return nullcontext(), _buffers_restored(block)


@contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """On exit, every buffer of `module` holds its value from entry again, also when torch stops a
    recompute early (it does once it has every tensor the backward needs)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


__all__ = ["POLICIES", "checkpointed_layers", "run_block"]

"""Aux-loss-free load balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2): the bias balancer.

Shapes: L MoE layers that balance, E experts per layer.

A router built with `bias_balancing` holds two buffers (moe/router.py): `expert_bias` [E],
added to its scores for top-k selection only, and `expert_load` [E], the token-slots its
training forwards sent to each expert since the last update. Every micro batch of an
optimizer step adds to the load; eval forwards do not count. `BiasBalancer.step()`, called
once after every optimizer step, is the only code that reads the load or moves the bias:

1. the loads of all L layers go into one [L·E] tensor, summed over the data-parallel ranks
   by a single collective (`reduce`), so every replica sees the global load and applies
   the same update;
2. per layer, b_e += rate · sign(mean load − load_e): an overloaded expert is pushed down, an
   underloaded one up, and one at the mean (or a step that routed nothing) is left alone;
3. the loads are cleared.

Why an explicit call and not `torch.optim.Optimizer.register_step_post_hook`: DeepSpeed's
ZeRO stage 1-2 optimizer steps the wrapped torch optimizer once per parameter group (it
swaps `param_groups` around each call), so a post hook would run, and issue its collective,
several times per optimizer step. The trainer calls `step()` right after its optimizer step
on both the single-process and the DeepSpeed path.

Checkpoints: bias and load are router buffers and are saved with the model; the load is zero
after every `step()`, so a checkpoint written after it resumes exactly. The balancer holds no
state of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from llamoe.moe.router import Router

Reduce = Callable[[torch.Tensor], Any]
"""Sums a tensor in place over the data-parallel ranks (e.g. `torch.distributed.all_reduce`)."""


class BiasBalancer:
    """Owns the aux-loss-free bias update of a set of routers; call `step()` after each optimizer step.

    routers: the routers to balance; those built without `bias_balancing` are ignored, so a
    model without it gets a balancer whose `step()` does nothing (and issues no collective).
    reduce: in-place sum over the data-parallel ranks, or None in a single process. Under
    expert parallelism this is still the whole data-parallel world: routers are replicated,
    and each rank counts the global expert ids of its own tokens.
    """

    def __init__(self, routers: Iterable[Router], reduce: Optional[Reduce] = None) -> None:
        self.routers = [r for r in routers if r.bias_balancing]
        self.reduce = reduce

    @classmethod
    def of(cls, module: nn.Module, reduce: Optional[Reduce] = None) -> BiasBalancer:
        """The balancer of every router inside `module` (a whole model, an MoE layer or a router)."""
        return cls((m for m in module.modules() if isinstance(m, Router)), reduce)

    @torch.no_grad()
    def step(self) -> None:
        """Sum the loads over ranks in one collective, move every bias by rate · sign(mean − load), clear the loads."""
        if not self.routers:
            return
        loads = torch.cat([r.expert_load for r in self.routers])  # [L·E]
        if self.reduce is not None:
            self.reduce(loads)
        for router, load in zip(self.routers, loads.split([r.num_experts for r in self.routers])):
            router.expert_bias += router.bias_update_rate * torch.sign(load.mean() - load)
            router.expert_load.zero_()


__all__ = ["BiasBalancer", "Reduce"]

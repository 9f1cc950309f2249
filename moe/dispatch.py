"""Token permutation between the token layout and the expert-sorted layout, and the
expert-parallel exchange.

Shapes: N tokens, k slots per token, D model dim, E experts in the layer, E_l experts held
by this rank (E_l = E / ep_size), M kept token-slots, R token-slots received by this rank.

A routed MoE layer runs:
    plan = plan_dispatch(expert_ids, E, capacity)     # sort the N·k slots by expert
    xs = permute(x, plan)                             # [M, D] contiguous groups per expert
    xl, counts_l, h = exchange.dispatch(xs, plan.tokens_per_expert)
    yl = experts(xl, counts_l)                        # one GEMM group per local expert
    ys = exchange.combine(yl, h)
    y = unpermute(ys * weights, plan, N)              # weighted scatter-add back to tokens

Without expert parallelism the exchange is the identity (`LocalExchange`). With it,
`AllToAllExchange` sends every expert's group to the rank that holds the expert and
brings the results back (all-to-all with variable split sizes, differentiable). This is
the only place in the model code that talks to torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe.router import count_tokens


@dataclass
class DispatchPlan:
    """Where each kept token-slot goes, in expert order.

    token_index: [M] source token of each kept slot, grouped by expert (token order within a group).
    slot_index: [M] flat slot id (token · k + j) of each kept slot, to fetch its routing weight.
    tokens_per_expert: [E] kept slots per expert (int64); the groups' sizes.
    dropped: scalar int64, slots dropped because their expert was over capacity.
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots one expert may take: ceil(capacity_factor · N · k / E) (Switch Transformer)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(expert_ids: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the N·k token-slots by expert; with a capacity, drop each expert's overflow.

    Sorting is stable, so within an expert earlier tokens come first and, under a
    capacity, the latest tokens are the ones dropped.
    """
    flat = expert_ids.reshape(-1)  # [N·k], slot s belongs to token s // k
    top_k = expert_ids.shape[-1]
    order = torch.argsort(flat, stable=True)  # [N·k] slot ids grouped by expert
    counts = count_tokens(flat, num_experts)  # [E]
    dropped = torch.zeros((), dtype=torch.int64, device=flat.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
        position = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # rank within group
        keep = position < capacity
        order = order[keep]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    return DispatchPlan(token_index=order // top_k, slot_index=order, tokens_per_expert=counts, dropped=dropped)


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather tokens [N, D] into expert-sorted slots [M, D]."""
    return x.index_select(0, plan.token_index)


def unpermute(y: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum expert-sorted slot outputs [M, D] back into tokens [N, D]; dropped slots add nothing."""
    out = y.new_zeros(num_tokens, y.shape[-1])
    return out.index_add(0, plan.token_index, y)


class LocalExchange:
    """The identity exchange: every expert lives on this rank."""

    def dispatch(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return the slots [M, D] this rank computes, their per-local-expert counts, and a handle."""
        return x, tokens_per_expert, None

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """Return the expert outputs for this rank's slots, in the order `dispatch` was given."""
        return y


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits along dim 0; its gradient is the reverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable variable-split all-to-all: send x[rows of in_splits[r]] to rank r of `group`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class _ExchangeHandle:
    order: torch.Tensor  # [R] received slots sorted by local expert
    send_splits: list[int]  # slots this rank sent to each rank
    recv_splits: list[int]  # slots this rank received from each rank


class AllToAllExchange(LocalExchange):
    """Expert parallelism over `group`: rank r holds global experts [r·E_l, (r+1)·E_l).

    `dispatch` sends each expert group of the sorted slots to its owner (rank order equals
    expert order, so each destination is one contiguous chunk), then regroups what arrived
    by local expert. `combine` undoes both steps. Router, shared expert and attention stay
    replicated; only the routed experts are sharded.
    """

    def __init__(self, group: Any, ep_size: int, num_local_experts: int) -> None:
        self.group = group
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts

    # Dispatch and combine are never compiled: the split sizes go to the host, and compiled code
    # would be specialised on them and recompiled as they change (models/compile.py).
    @torch.compiler.disable
    def dispatch(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        ep, local = self.ep_size, self.num_local_experts
        send_counts = tokens_per_expert.reshape(ep, local)  # [ep, E_l] slots for each rank's experts
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)  # [ep(src), E_l]
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x, recv_splits, send_splits, self.group)  # [R, D] by (source rank, expert)
        local_ids = torch.arange(local, device=x.device).repeat(ep)  # [ep·E_l] expert of each (src, e) block
        slot_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1).to(x.device))  # [R]
        order = torch.argsort(slot_expert, stable=True)  # [R] grouped by local expert
        handle = _ExchangeHandle(order=order, send_splits=send_splits, recv_splits=recv_splits)
        return received.index_select(0, order), recv_counts.sum(0), handle

    @torch.compiler.disable
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        h: _ExchangeHandle = handle
        unsorted = torch.empty_like(y).index_copy(0, h.order, y)  # back to (source rank, expert) order
        return all_to_all(unsorted, h.send_splits, h.recv_splits, self.group)

"""Token permutation between the token layout and the expert-sorted layout, and the
expert-parallel exchange.

Shapes: N tokens, k slots per token, S = N·k token-slots, D model dim, E experts in the layer,
E_l experts held by this rank (E_l = E / ep_size), M kept token-slots (M = S when dropless),
R token-slots received by this rank.

A routed MoE layer runs:
    plan = plan_dispatch(expert_ids, E, capacity)     # sort the N·k slots by expert
    xs = permute(x, plan)                             # [S, D] contiguous groups per expert
    xl, counts_l, h = exchange.dispatch(xs, plan.tokens_per_expert)
    yl = experts(xl, counts_l)                        # one GEMM group per local expert
    ys = plan.drop(exchange.combine(yl, h))
    y = unpermute(ys * weights, plan, N)              # weighted scatter-add back to tokens

Host syncs: none without expert parallelism. Every shape is static (S slots, also under a
capacity: the dropped slots are sorted behind the kept ones and zeroed, never cut off, so no
boolean indexing), and the group sizes stay on the device. `AllToAllExchange` reads the split
sizes to the host once per dispatch (one `.tolist()` per layer forward, again in a checkpoint
recompute; none in the backward).

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

from llamoe.moe.router import count_tokens


@dataclass
class DispatchPlan:
    """Where each token-slot goes, in expert order; dropped slots (over capacity) come last.

    token_index: [S] source token of each slot, grouped by expert (token order within a group).
    slot_index: [S] flat slot id (token · k + j) of each slot, to fetch its routing weight.
    tokens_per_expert: [E] kept slots per expert (int64); the groups' sizes, summing to M.
    dropped: scalar int64, slots dropped because their expert was over capacity (S - M).
    kept: [S] bool, True for the first M (kept) slots; None when dropless (M = S).
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    kept: torch.Tensor | None = None

    def drop(self, slots: torch.Tensor) -> torch.Tensor:
        """Zero the rows of dropped slots [S, D] (values and gradients); the identity when dropless.

        Applied to the expert inputs and outputs: the experts leave the rows past their groups
        unspecified (moe/experts/base.py), and `where`, unlike a multiply, also clears a NaN there.
        """
        if self.kept is None:
            return slots
        return torch.where(self.kept.unsqueeze(-1), slots, 0)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots one expert may take: ceil(capacity_factor · N · k / E) (Switch Transformer)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(expert_ids: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the S = N·k token-slots by expert; with a capacity, move each expert's overflow behind all kept slots.

    Sorting is stable, so within an expert earlier tokens come first and, under a
    capacity, the latest tokens are the ones dropped. No host sync: every size is S.
    """
    flat = expert_ids.reshape(-1)  # [S], slot s belongs to token s // k
    top_k = expert_ids.shape[-1]
    order = torch.argsort(flat, stable=True)  # [S] slot ids grouped by expert
    counts = count_tokens(flat, num_experts)  # [E]
    dropped = torch.zeros((), dtype=torch.int64, device=flat.device)
    kept = None
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
        slots = torch.arange(flat.numel(), device=flat.device)  # [S]
        over = (slots - starts[flat[order]]) >= capacity  # [S] sorted slot past its expert's capacity
        order = order[torch.argsort(over.to(torch.uint8), stable=True)]  # kept slots (expert order) first
        kept_counts = counts.clamp(max=capacity)
        dropped = (counts - kept_counts).sum()
        counts = kept_counts
        kept = slots < counts.sum()  # [S]
    return DispatchPlan(
        token_index=order // top_k, slot_index=order, tokens_per_expert=counts, dropped=dropped, kept=kept
    )


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather tokens [N, D] into expert-sorted slots [S, D]; dropped slots are zero."""
    return plan.drop(x.index_select(0, plan.token_index))


def unpermute(y: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum expert-sorted slot outputs [S, D] back into tokens [N, D] (dropped slots must be zero, `plan.drop`)."""
    out = y.new_zeros(num_tokens, y.shape[-1])
    return out.index_add(0, plan.token_index, y)


class LocalExchange:
    """The identity exchange: every expert lives on this rank."""

    def dispatch(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return the slots this rank computes, their per-local-expert counts, and a handle.

        x [S, D]: the first sum(tokens_per_expert) rows grouped by expert, then any dropped slots."""
        return x, tokens_per_expert, None

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """Return the expert outputs for this rank's slots [S, D], in the order `dispatch` was given
        (rows of dropped slots unspecified)."""
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
    dropped: int  # dropped slots after the sent ones (capacity), returned as zeros


class AllToAllExchange(LocalExchange):
    """Expert parallelism over `group`: rank r holds global experts [r·E_l, (r+1)·E_l).

    `dispatch` sends each expert group of the sorted slots to its owner (rank order equals
    expert order, so each destination is one contiguous chunk), then regroups what arrived
    by local expert. `combine` undoes both steps. Router, shared expert and attention stay
    replicated; only the routed experts are sharded. One host sync per dispatch: the split
    sizes of both directions arrive in one `.tolist()`; nothing else reads the device.
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
        splits = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits[:ep], splits[ep:]
        sent = sum(send_splits)
        received = all_to_all(x[:sent], recv_splits, send_splits, self.group)  # [R, D] by (source rank, expert)
        local_ids = torch.arange(local, device=x.device).repeat(ep)  # [ep·E_l] expert of each (src, e) block
        slot_expert = torch.repeat_interleave(  # [R]
            local_ids, recv_counts.reshape(-1).to(x.device), output_size=sum(recv_splits)
        )
        order = torch.argsort(slot_expert, stable=True)  # [R] grouped by local expert
        handle = _ExchangeHandle(order, send_splits, recv_splits, dropped=x.shape[0] - sent)
        return received.index_select(0, order), recv_counts.sum(0), handle

    @torch.compiler.disable
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        h: _ExchangeHandle = handle
        unsorted = torch.empty_like(y).index_copy(0, h.order, y)  # back to (source rank, expert) order
        back = all_to_all(unsorted, h.send_splits, h.recv_splits, self.group)  # [M, D]
        return torch.cat([back, back.new_zeros(h.dropped, back.shape[-1])]) if h.dropped else back

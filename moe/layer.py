"""The MoE feed-forward layer: router + routed experts + shared expert (Llama 4).

Shapes: B batch, L sequence, N = B·L tokens, D model dim, E experts, k experts per token,
S = N·k token-slots.

    out = shared_expert(x) + Σ_{e chosen for x} routed_e
    routed_e = expert_e(x · s_e)   score_on="input"  (Llama 4)
             = s_e · expert_e(x)   score_on="output" (Switch, Mixtral, DeepSeek)

Only routed token-slots are computed (dropless by default; `capacity_factor` drops each
expert's overflow and counts it). The references instead run every expert on every token.
Precision (moe/precision.py): the router runs in fp32; the slots enter the experts, and the
all-to-all, in the compute dtype (bf16 under bf16 autocast); the combine runs in x's dtype.

Expert parallelism: `MoE.set_expert_parallel(group, ep_rank, ep_size)` keeps only this
rank's slice of the routed experts (global experts [ep_rank·E/ep_size, (ep_rank+1)·E/ep_size))
and routes token-slots to their owners through an all-to-all over `group` (see
moe/dispatch.py). Call it on every MoE layer after building the model (on the meta device
or not) and before creating the optimizer. With DeepSpeed, `group` and ep_rank (this rank's
index in it) come from `llamoe.experiments.train.deepspeed_compat.expert_parallel_group(ep_size)`. Router
and shared expert stay replicated (ordinary data-parallel parameters); the parameters of
`MoE.experts` are the expert-parallel ones, whose gradients
are reduced over the expert-data-parallel group only. Aux-loss-free bias balancing sums the
routers' loads over all data-parallel ranks (moe/balance.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamoe.config_error import ConfigError
from llamoe.moe.config import MoEConfig
from llamoe.moe.dispatch import AllToAllExchange, LocalExchange, expert_capacity, permute, plan_dispatch, unpermute
from llamoe.moe.experts import build_experts
from llamoe.moe.precision import compute_dtype
from llamoe.moe.router import Router, Routing
from llamoe.moe.swiglu import FeedForward


@dataclass
class MoEOutput:
    """out [B, L, D]; aux_loss = aux_loss_weight·aux + z_loss_weight·z (scalar); stats detached."""

    out: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MoE(nn.Module):
    """Routed SwiGLU experts plus an optional always-on shared SwiGLU expert."""

    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.score_on = moe.score_on
        self.capacity_factor = moe.capacity_factor
        self.aux_loss_weight = moe.aux_loss_weight
        self.z_loss_weight = moe.z_loss_weight
        self.router = Router(dim, moe)
        self.experts = build_experts(moe.backend, moe.num_experts, dim, moe.expert_hidden_dim)
        shared = moe.shared_expert_hidden
        self.shared_expert = FeedForward(dim, shared) if shared > 0 else None
        self.exchange: LocalExchange = LocalExchange()

    def init_weights(self, init_std: float, out_std: float) -> None:
        """Router and expert inputs ~ N(0, init_std); residual-facing projections ~ N(0, out_std)."""
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std, out_std)
        if self.shared_expert is not None:
            self.shared_expert.init_weights(init_std, out_std)

    def set_expert_parallel(self, group: Any, ep_rank: int, ep_size: int) -> None:
        """Keep routed experts [ep_rank·E_l, (ep_rank+1)·E_l) only (E_l = E / ep_size) and exchange
        token-slots with the other ranks of `group` (an expert-parallel process group of ep_size ranks)."""
        if self.num_experts % ep_size != 0:
            raise ConfigError(
                "distributed.ep_size",
                f"moe.num_experts={self.num_experts} must be divisible by ep_size={ep_size}",
            )
        local = self.num_experts // ep_size
        self.experts = self.experts.local_slice(ep_rank * local, local)
        self.exchange = AllToAllExchange(group, ep_size, local)

    def forward(self, x: torch.Tensor) -> MoEOutput:  # x [B, L, D]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        num_tokens = flat.shape[0]
        routing = self.router(flat)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)
        plan = plan_dispatch(routing.expert_ids, self.num_experts, capacity)
        dtype = compute_dtype(flat)
        weights = routing.weights.reshape(-1)[plan.slot_index].unsqueeze(-1)  # [S, 1] fp32

        slots = permute(flat.to(dtype), plan)  # [S, D] grouped by expert, compute dtype
        if self.score_on == "input":
            slots = slots * weights.to(dtype)
        local, local_counts, handle = self.exchange.dispatch(slots, plan.tokens_per_expert)
        routed = plan.drop(self.exchange.combine(self.experts(local, local_counts), handle)).to(x.dtype)  # [S, D]
        if self.score_on == "output":
            routed = routed * weights.to(x.dtype)
        out = unpermute(routed, plan, num_tokens)  # [N, D]
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)

        aux_loss = torch.zeros((), device=x.device)
        if self.aux_loss_weight > 0:
            aux_loss = aux_loss + self.aux_loss_weight * routing.aux_loss
        if self.z_loss_weight > 0:
            aux_loss = aux_loss + self.z_loss_weight * routing.z_loss
        stats = self._stats(routing, plan.dropped, num_tokens * self.top_k)
        return MoEOutput(out=out.reshape(shape), aux_loss=aux_loss, stats=stats)

    @torch.no_grad()
    def _stats(self, routing: Routing, dropped: torch.Tensor, num_slots: int) -> dict[str, torch.Tensor]:
        """Load and router health for logging; all detached, computed on device without syncs."""
        tokens_per_expert = routing.tokens_per_expert
        load = tokens_per_expert.float()  # [E] routed slots, before any capacity drop
        mean = load.mean().clamp_min(1e-9)
        stats = {
            "tokens_per_expert": tokens_per_expert,
            "load_imbalance": load.max() / mean,
            "cv": load.std(unbiased=False) / mean,
            "frac_empty_experts": (load == 0).float().mean(),
            "dropped_frac": dropped.float() / max(num_slots, 1),
            "router_entropy": routing.entropy,
            "aux_loss": routing.aux_loss.detach(),
            "z_loss": routing.z_loss.detach(),
        }
        if self.router.bias_balancing:
            stats["expert_bias_norm"] = self.router.expert_bias.norm()
        return stats


__all__ = ["MoE", "MoEOutput"]

"""Top-k token router for mixture-of-experts layers.

Shapes: N tokens (batch × sequence, flattened), D model dim, E experts, k experts per token.

The router is one bias-free linear map computed in fp32, also under autocast, and its buffers
stay fp32 when the model is cast (the policy: moe/precision.py) (Llama 4: `feed_forward.router`).
Per token it picks the k experts with the highest score and returns their ids and
weights. Choices that MoE ablations vary are switches on `MoEConfig`:

- score_func "sigmoid" (Llama 4): the weight of a chosen expert is sigmoid(logit),
  independently per expert. "softmax": softmax over all E logits, then the top k.
- renormalize: divide the k chosen weights by their sum (off in Llama 4).
- jitter ε > 0: in training, multiply the router input by U(1-ε, 1+ε) noise (Switch).
- Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4-6):
      aux = E · Σ_e f_e · P_e
  f_e = fraction of the N·k token-slots routed to expert e (no gradient) and
  P_e = mean over tokens of p_e, the router's probability for e: softmax(logits)
  for softmax scoring, and the sigmoid scores normalised to sum to 1 over the E
  experts for sigmoid scoring. aux = 1 under perfect balance and E when every
  slot goes to one expert with probability 1.
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): z = mean_tokens logsumexp(logits)².
- Aux-loss-free balancing (DeepSeek-V3, Liu et al. 2024, §2.1.2): a per-expert bias
  b_e is added to the scores for *selection only*; the weights come from the
  unbiased scores. Training forwards add the per-expert load to the buffer
  `expert_load`; moe/balance.py's `BiasBalancer` sums it over ranks, moves b_e and
  clears it after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamoe.moe.config import MoEConfig
from llamoe.moe.precision import Fp32Buffers, full_precision


@dataclass
class Routing:
    """The router's decision for N tokens.

    expert_ids: [N, k] chosen experts (int64), best first.
    weights: [N, k] fp32 scores of the chosen experts (differentiable).
    tokens_per_expert: [E] int64 number of token-slots routed to each expert.
    aux_loss: scalar load-balancing loss, unweighted (differentiable).
    z_loss: scalar router z-loss, unweighted (differentiable).
    entropy: scalar mean entropy of the per-token router distribution (detached).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch aux loss E · Σ_e f_e · P_e from router probabilities [N, E] and slot counts [E]."""
    num_experts = probs.shape[-1]
    f = tokens_per_expert.to(probs.dtype) / tokens_per_expert.sum().clamp_min(1)  # [E], no gradient
    p = probs.mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)², keeping logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def count_tokens(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-slots per expert [E] (int64), without a host sync."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(Fp32Buffers):
    """Linear top-k router in fp32 with fp32 buffers; see the module docstring for every switch."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.renormalize = cfg.renormalize
        self.jitter = cfg.jitter
        self.bias_balancing = cfg.bias_balancing
        self.bias_update_rate = cfg.bias_update_rate
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)  # weight [E, D] = HF feed_forward.router.weight
        if cfg.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))  # [E], selection only
            # [E] slots routed since the last update; saved too, so a checkpoint or a model
            # materialised from the meta device by load_state_dict never holds garbage here.
            self.register_buffer("expert_load", torch.zeros(cfg.num_experts))

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        if self.bias_balancing:
            self.expert_bias.zero_()
            self.expert_load.zero_()

    def forward(self, x: torch.Tensor) -> Routing:  # x [N, D]
        with full_precision(x):  # autocast would run F.linear in bf16 even on fp32 inputs
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> Routing:  # x [N, D] fp32
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.gate.weight.float())  # [N, E] fp32

        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)  # [N, E]
            probs = scores
        else:
            scores = torch.sigmoid(logits)  # [N, E], independent per expert
            probs = scores / scores.sum(dim=-1, keepdim=True)  # normalised for aux loss and entropy

        if self.bias_balancing:
            selection = scores.detach() + self.expert_bias  # DeepSeek-V3: the bias steers the choice only
        else:
            selection = logits.detach()  # same order as the scores, without saturation ties
        expert_ids = selection.topk(self.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(-1, expert_ids)  # [N, k], unbiased scores
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        tokens_per_expert = count_tokens(expert_ids, self.num_experts)  # [E]
        if self.bias_balancing and self.training:
            self.expert_load += tokens_per_expert.to(self.expert_load.dtype)

        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
        return Routing(
            expert_ids=expert_ids,
            weights=weights,
            tokens_per_expert=tokens_per_expert,
            aux_loss=load_balancing_loss(probs, tokens_per_expert),
            z_loss=z_loss(logits),
            entropy=entropy,
        )

"""MoE configuration: routed and shared experts and the routing switches, frozen and validated on creation.

Every change is a `dataclasses.replace()`, which validates the new value again. Errors name the
key as it appears in a model config (`moe.top_k`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llamoe.config_error import ConfigError


@dataclass(frozen=True)
class MoEConfig:
    """Routed + shared experts (Llama 4 defaults), with the usual ablation switches.

    - interleave_step: layer i is MoE iff (i+1) % step == 0.
    - score_func: "sigmoid" (Llama 4) | "softmax".
    - score_on: "input" (Llama 4: expert_e(x * s_e)) | "output" (s_e * expert_e(x)).
    - renormalize: divide the top-k scores by their sum.
    - jitter: multiplicative uniform noise on router input in training (Switch).
    - aux_loss_weight / z_loss_weight: Switch load-balancing loss, router z-loss.
    - bias_balancing: DeepSeek-V3 aux-loss-free balancing, bias updated by
      bias_update_rate after every optimizer step, used for selection only.
    - capacity_factor: None is dropless; otherwise each expert takes at most
      ceil(capacity_factor * tokens * top_k / num_experts) token-slots of one forward's
      tokens, the latest ones dropped. Under expert parallelism `tokens` are each rank's own
      (the drop is decided before the all-to-all, with no extra exchange): every rank may send
      each expert that many slots, so an expert receives at most ep_size times it, the
      capacity of the group's tokens split evenly between the sending ranks (GShard's
      per-group capacity); a rank cannot use another rank's unused share.
    - backend: expert computation, "torch" | "grouped_mm" | "megablocks".

    The router must learn from the language-model loss. It gets that loss's gradient only through
    the gate weights (the expert choice is a top-k, not differentiable), so a layout whose gate is
    a constant is refused: top_k=1 with renormalize (s / s = 1 for every score_func and score_on)
    and softmax over num_experts=1 (the softmax of one logit is 1). Measured on a tiny llama4-tiny,
    LM loss only: the router weight gradient norm is ~1e-9 (rounding) in all four top-1 +
    renormalize layouts against 1.0e-3..1.4e-2 in every other top-1/top-2 x renormalize x score_on x
    score_func layout (benchmarks/RESULTS.md, "Routers that learn"). An aux loss or a z-loss does
    not make such a layout acceptable: it moves the router towards balance or small logits, never
    towards the expert that lowers the loss, and bias balancing moves no weight at all.
    """

    num_experts: int = 16
    top_k: int = 1
    interleave_step: int = 1
    expert_hidden_dim: int = 8192
    num_shared_experts: int = 1
    shared_expert_hidden_dim: Optional[int] = None
    score_func: str = "sigmoid"
    score_on: str = "input"
    renormalize: bool = False
    jitter: float = 0.0
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"moe.{key}", msg)

        need(self.num_experts >= 1, "num_experts", "must be >= 1")
        need(
            1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        need(self.interleave_step >= 1, "interleave_step", "must be >= 1")
        need(self.expert_hidden_dim > 0, "expert_hidden_dim", "must be > 0")
        need(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        need(
            self.score_func in ("sigmoid", "softmax"), "score_func", f"must be sigmoid|softmax, got {self.score_func!r}"
        )
        need(self.score_on in ("input", "output"), "score_on", f"must be input|output, got {self.score_on!r}")
        need(self.jitter >= 0, "jitter", "must be >= 0")
        need(self.aux_loss_weight >= 0, "aux_loss_weight", "must be >= 0")
        need(self.z_loss_weight >= 0, "z_loss_weight", "must be >= 0")
        need(
            self.capacity_factor is None or self.capacity_factor > 0,
            "capacity_factor",
            "must be null (dropless) or > 0",
        )
        need(
            not (self.top_k == 1 and self.renormalize),
            "renormalize",
            "with moe.top_k=1 the one renormalised gate is always exactly 1, so the router gets no gradient "
            "from the loss (for any moe.score_func and moe.score_on); set moe.renormalize=false (the gate is "
            "the router's score, as in Switch) or moe.top_k>=2",
        )
        need(
            not (self.score_func == "softmax" and self.num_experts == 1),
            "score_func",
            "a softmax over moe.num_experts=1 is always exactly 1, so the router gets no gradient; "
            "set moe.score_func=sigmoid or moe.num_experts>=2",
        )
        need(
            self.backend in ("torch", "grouped_mm", "megablocks"),
            "backend",
            f"must be torch|grouped_mm|megablocks, got {self.backend!r}",
        )

    def is_moe(self, layer_id: int) -> bool:
        """Llama 4 interleaving: layer i is MoE iff (i+1) % interleave_step == 0."""
        return (layer_id + 1) % self.interleave_step == 0

    @property
    def shared_expert_hidden(self) -> int:
        """Hidden size of the shared expert(s), merged into one SwiGLU (n shared × hidden); 0 for none."""
        if self.num_shared_experts == 0:
            return 0
        return self.num_shared_experts * (self.shared_expert_hidden_dim or self.expert_hidden_dim)


__all__ = ["ConfigError", "MoEConfig"]

"""Llama 4 iRoPE pieces: the per-layer RoPE/NoPE schedule, QK-norm and attention temperature tuning.

iRoPE interleaves RoPE layers with chunked (local) causal attention and NoPE
layers with global causal attention; Llama 4 makes every 4th layer NoPE.
NoPE-layer queries are scaled by a slowly growing temperature so attention
stays sharp at lengths far beyond training (Llama 4 model card; Nakanishi,
"Scalable-Softmax Is Superior for Attention", 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llamoe.attention.config import AttentionConfig


@dataclass(frozen=True)
class LayerAttentionKind:
    """What one layer's attention does, decided once from its layer id."""

    uses_rope: bool
    chunk_size: Optional[int]  # None: global causal attention
    qk_norm: bool


def layer_attention_kind(cfg: AttentionConfig, layer_id: int) -> LayerAttentionKind:
    """The iRoPE schedule: NoPE iff (i+1) % nope_layer_interval == 0; RoPE layers chunked if chunk_size is set."""
    uses_rope = cfg.uses_rope(layer_id)
    return LayerAttentionKind(
        uses_rope=uses_rope,
        chunk_size=cfg.chunk_size if cfg.is_chunked(layer_id) else None,
        qk_norm=cfg.qk_norm and uses_rope,
    )


def qk_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation of q or k over the head dim (applied after RoPE), computed in fp32.

    The same formula as `llamoe.models.layers.rms_norm`, kept here because `attention` imports nothing from `models`.
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """s(p) = 1 + attn_scale · ln(1 + ⌊(p+1)/floor_scale⌋) for absolute 0-based positions p. fp32."""
    p = positions.to(torch.float32)
    return 1.0 + attn_scale * torch.log1p(torch.floor((p + 1.0) / floor_scale))

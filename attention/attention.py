"""Grouped-query attention composed from RoPE, the iRoPE layer kind, chunking, caching and a backend.

Per layer (decided once from the layer id, see `attention/irope.py`):
RoPE layers rotate q/k, optionally QK-normalise them, and attend within their
chunk; NoPE layers skip the rotation, optionally scale queries by the position
temperature, and attend globally.

Shapes: B batch, L new tokens, D model dim, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llamoe.attention.backends import get_backend
from llamoe.attention.cache import LayerKVCache
from llamoe.attention.config import AttentionConfig
from llamoe.attention.irope import layer_attention_kind, qk_norm, temperature_scale
from llamoe.attention.rope import apply_rope


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and no biases (Ainslie et al., 2023)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        norm_eps: float,
        settings: AttentionConfig,
        layer_id: int,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.norm_eps = norm_eps
        self.kind = layer_attention_kind(settings, layer_id)  # structure: fixed once built
        # Eval-time knobs (temperature, backend): this layer's own state, replaced whole (frozen) by
        # `Transformer.set_attention`, never shared with a config another object holds.
        self.settings = settings
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def queries_keys(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries q [B, H, L, Dh] and keys k [B, K, L, Dh] this layer attends with, for x [B, L, D]
        at positions start_pos..start_pos+L-1: rotated and QK-normalised on RoPE layers, temperature-scaled
        on NoPE layers. `rope` = (cos, sin) [L, Dh/2]; NoPE layers ignore it (None is fine there).
        Used by `forward`, and by diagnostics that inspect attention scores (experiments/evals/entropy.py)."""
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, length, self.n_kv_heads, self.head_dim)
        if self.kind.uses_rope:
            if rope is None:
                raise ValueError("a RoPE attention layer needs the rope (cos, sin) tables")
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.kind.qk_norm:
                q, k = qk_norm(q, self.norm_eps), qk_norm(k, self.norm_eps)
        elif self.settings.temperature_tuning:
            positions = torch.arange(start_pos, start_pos + length, device=x.device)
            scale = temperature_scale(positions, self.settings.floor_scale, self.settings.attn_scale)
            q = (q.float() * scale[None, :, None, None]).type_as(q)
        return q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, L, Dh]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start_pos: int = 0,
        cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        """x [B, L, D] at absolute positions start_pos..start_pos+L-1; rope = (cos, sin) [L, Dh/2]."""
        b, length, _ = x.shape
        q, k = self.queries_keys(x, rope, start_pos)
        v = self.wv(x).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, L, Dh]

        if cache is not None:
            k, v, k_start = cache.update(k, v, start_pos)
        else:
            k_start = start_pos
        backend = get_backend(self.settings.backend, x.device)
        if self.kind.chunk_size is None:
            out = backend.causal(q, k, v)
        else:
            out = backend.chunked(q, k, v, q_start=start_pos, k_start=k_start, chunk_size=self.kind.chunk_size)
        out = out.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim)  # [B, L, H·Dh]
        return self.wo(out)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

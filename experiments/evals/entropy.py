"""Attention entropy of NoPE layers vs position.

NoPE layers (iRoPE's global layers) attend with no position signal, so as the context
grows their attention spreads over more keys and its entropy rises towards ln(p+1), the
entropy of uniform attention over the p+1 visible keys. Llama 4's temperature tuning
sharpens NoPE queries at long positions to counter exactly this; measuring the entropy
shows whether it does.

The measurement uses the model's own weights and inputs and changes no model code: a
forward pre-hook on each NoPE layer's attention captures its (normalised) input block by
block during chunked prefill, and queries and keys are recomputed from wq/wk the way a
NoPE layer computes them (no rotation, no QK-norm, temperature scaling when enabled).
`nope_queries_keys` is that recomputation; the tests check it reproduces the layer output.

Shapes: B batch, L block length, T total length, H query heads, K kv heads, Dh head dim,
S sampled queries.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from attention.attention import Attention
from attention.irope import temperature_scale
from models.transformer import Transformer


def nope_layers(model: Transformer) -> list[int]:
    """Ids of the layers without rotary embeddings (global attention in iRoPE)."""
    return [i for i, layer in enumerate(model.layers) if not layer.attention.kind.uses_rope]


def nope_queries_keys(attn: Attention, x: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries [B, H, L, Dh] and keys [B, K, L, Dh] a NoPE attention layer forms from its input x [B, L, D]."""
    if attn.kind.uses_rope:
        raise ValueError("nope_queries_keys applies to NoPE layers only")
    b, length, _ = x.shape
    q = attn.wq(x).view(b, length, attn.n_heads, attn.head_dim)
    k = attn.wk(x).view(b, length, attn.n_kv_heads, attn.head_dim)
    settings = attn.settings
    if settings.temperature_tuning:
        positions = torch.arange(start_pos, start_pos + length, device=x.device)
        scale = temperature_scale(positions, settings.floor_scale, settings.attn_scale)
        q = (q.float() * scale[None, :, None, None]).type_as(q)
    return q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, L, Dh]


def query_entropy(q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) [B, H, S] of causal softmax attention of queries q [B, H, S, Dh] at `positions` [S]
    over keys [B, K, >= max(positions)+1, Dh] (query at p sees keys 0..p)."""
    group = q.size(1) // keys.size(1)
    n_keys = int(positions.max()) + 1
    k = keys[:, :, :n_keys].float().repeat_interleave(group, dim=1)  # [B, H, n_keys, Dh]: GQA groups
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # [B, H, S, n_keys]
    visible = torch.arange(n_keys, device=q.device)[None, :] <= positions[:, None]  # [S, n_keys]
    scores = scores.masked_fill(~visible, float("-inf"))
    log_p = torch.log_softmax(scores, dim=-1)
    return -(log_p.exp() * log_p.masked_fill(~visible, 0.0)).sum(dim=-1)


class _EntropyRecorder:
    """Forward pre-hook state for one NoPE layer: all keys so far, entropies of the sampled queries."""

    def __init__(self, attn: Attention, batch: int, total: int, sample: torch.Tensor) -> None:
        self.attn = attn
        device = attn.wk.weight.device
        self.keys = torch.zeros(batch, attn.n_kv_heads, total, attn.head_dim, device=device)
        self.sample = sample.to(device)
        self.entropy = torch.zeros(batch, attn.n_heads, len(sample), device=device)  # [B, H, S]

    def __call__(self, module: Attention, args: tuple, kwargs: dict) -> None:
        x = args[0]
        start = args[2] if len(args) > 2 else kwargs.get("start_pos", 0)
        q, k = nope_queries_keys(self.attn, x, start)
        end = start + x.size(1)
        self.keys[:, :, start:end] = k.float()
        inside = (self.sample >= start) & (self.sample < end)
        if inside.any():
            positions = self.sample[inside]
            self.entropy[:, :, inside] = query_entropy(q[:, :, positions - start], positions, self.keys)


@torch.inference_mode()
def nope_attention_entropy(
    model: Transformer,
    sequences: torch.Tensor,
    edges: Sequence[int],
    *,
    queries_per_bucket: int = 32,
    block: int = 1024,
) -> dict[str, Any]:
    """Mean NoPE attention entropy of queries in each position bucket [edges[i], edges[i+1]) of sequences [B, T].

    With edges = [0, L_1, L_2, ...] (the evaluation lengths), bucket i holds the positions that
    length L_{i+1} adds over L_i. Also reports the uniform-attention entropy ln(p+1) averaged
    over the same queries, the ceiling the entropy approaches when attention spreads out.
    """
    layers = nope_layers(model)
    buckets = list(zip(edges[:-1], edges[1:]))
    if not layers:
        return {"layers": [], "buckets": [], "note": "the model has no NoPE layers"}
    total = edges[-1]
    if sequences.size(1) < total:
        raise ValueError(f"entropy up to position {total} needs sequences of {total} tokens, got {sequences.size(1)}")
    picks = [np.unique(np.linspace(a, b - 1, queries_per_bucket).round().astype(np.int64)) for a, b in buckets]
    sample = torch.from_numpy(np.concatenate(picks))
    tokens = sequences[:, :total].to(model.tok_embeddings.weight.device)
    recorders = {i: _EntropyRecorder(model.layers[i].attention, tokens.size(0), total, sample) for i in layers}
    handles = [
        model.layers[i].attention.register_forward_pre_hook(rec, with_kwargs=True) for i, rec in recorders.items()
    ]
    try:
        cache = model.make_cache(tokens.size(0), total)
        for start in range(0, total, block):
            model(tokens[:, start : start + block], start_pos=start, cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = torch.stack([rec.entropy.mean(dim=(0, 1)).cpu() for rec in recorders.values()])  # [layers, S]
    uniform = torch.log(sample.float() + 1.0)
    rows, first = [], 0
    for (a, b), pick in zip(buckets, picks):
        span = slice(first, first + len(pick))
        first += len(pick)
        rows.append(
            {
                "start": a,
                "end": b,
                "entropy": float(per_layer[:, span].mean()),
                "per_layer": [float(v) for v in per_layer[:, span].mean(dim=1)],
                "uniform": float(uniform[span].mean()),
            }
        )
    return {"layers": layers, "buckets": rows}

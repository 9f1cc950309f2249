"""Attention entropy of NoPE layers vs position.

NoPE layers (iRoPE's global layers) attend with no position signal, so as the context
grows their attention spreads over more keys and its entropy rises towards ln(p+1), the
entropy of uniform attention over the p+1 visible keys. Llama 4's temperature tuning
sharpens NoPE queries at long positions to counter exactly this; measuring the entropy
shows whether it does.

The measurement uses the model's own weights, inputs and code path: a forward pre-hook on
each NoPE layer's attention receives its (normalised) input block by block during chunked
prefill, and `Attention.queries_keys` (the queries and keys `Attention.forward` attends with,
temperature scaling included when enabled) forms them from the arguments the layer was called with.

Shapes: B batch, L block length, T total length, H query heads, K kv heads, Dh head dim,
S sampled queries.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import numpy as np
import torch

from llamoe.attention.attention import Attention
from llamoe.experiments.evals.scoring import DEFAULT_MAX_LOGITS_BYTES, fit_to_budget
from llamoe.models.transformer import Transformer

_FORWARD = inspect.signature(Attention.forward)  # binds a pre-hook's arguments by name


def nope_layers(model: Transformer) -> list[int]:
    """Ids of the layers without rotary embeddings (global attention in iRoPE)."""
    return [i for i, layer in enumerate(model.layers) if not layer.attention.kind.uses_rope]


def nope_queries_keys(attn: Attention, x: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries [B, H, L, Dh] and keys [B, K, L, Dh] a NoPE attention layer forms from its input x [B, L, D]
    at positions start_pos.. (Attention.queries_keys; a NoPE layer needs no rope tables)."""
    if attn.kind.uses_rope:
        raise ValueError("nope_queries_keys applies to NoPE layers only")
    return attn.queries_keys(x, rope=None, start_pos=start_pos)


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
        call = _FORWARD.bind(module, *args, **kwargs)  # by name, however the block passes them
        call.apply_defaults()
        x, start = call.arguments["x"], call.arguments["start_pos"]
        q, k = nope_queries_keys(self.attn, x, start_pos=start)
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
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
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
        _, block = fit_to_budget(tokens.size(0), block, model.cfg.vocab_size, max_logits_bytes)
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

"""One dispatch over attention kernels.

Every backend computes the same thing: causal attention of queries q [B, H, Lq, Dh]
over keys/values [B, K, Lk, Dh] (K divides H: grouped-query attention), where the
Lq queries are the *last* Lq positions of the Lk keys (bottom-right aligned
causal mask: query i sees keys j <= i + Lk - Lq). Chunking is layered on top in
`attention/chunked.py`, so every backend gets it for free.

Backends: "sdpa" (torch scaled_dot_product_attention; the reference, CPU and GPU).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference backend: torch SDPA with a bottom-right aligned causal mask."""
    lq, lk = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if lq == 1:  # a single newest query sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    offset = lk - lq
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


_BACKENDS: dict[str, AttendFn] = {"sdpa": sdpa_attention}


def get_backend(name: str) -> AttendFn:
    """The attention function for `attention.backend`; fails fast when it cannot run here."""
    if name not in _BACKENDS:
        raise ValueError(f"attention.backend={name!r} is not available; use one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]

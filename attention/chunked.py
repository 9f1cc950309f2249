"""Chunked causal attention (Llama 4 local attention on RoPE layers).

Query at absolute position i sees key j iff j <= i and floor(j/C) == floor(i/C):
chunks start at absolute positions 0, C, 2C, ... `visible` states that rule once;
the brute-force mask and the flex backend's mask_mod both use it.

The generic kernel splits the queries into the (possibly partial) first chunk and a
chunk-aligned remainder, which is reshaped into a batch of independent C-long causal
problems for any backend's bottom-right causal attention. Cost and memory are O(L·C);
no L×L mask is ever built. Backends that can skip masked blocks natively (flex)
replace the kernel, not the semantics.

Shapes: B batch, H query heads, K kv heads, L sequence, C chunk, Dh head dim, N chunks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Bottom-right aligned causal attention of q [B, H, Lq, Dh] over k, v [B, K, Lk, Dh] (see attention/backends.py).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def chunk_start(pos: int, chunk_size: int) -> int:
    """Absolute position where the chunk holding `pos` begins."""
    return (pos // chunk_size) * chunk_size


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
    """Elementwise rule: may a query at absolute position q_pos see the key at k_pos? (None: plain causal)."""
    mask = k_pos <= q_pos
    if chunk_size is not None:
        mask = mask & (k_pos // chunk_size == q_pos // chunk_size)
    return mask


def chunked_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
    """Brute-force boolean mask [Lq, Lk] of `visible` for 1-D positions. For tests and small L."""
    return visible(q_pos[:, None], k_pos[None, :], chunk_size)


def _aligned_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: int, attend: AttendFn) -> torch.Tensor:
    """Causal attention within consecutive C-long chunks; q, k, v all start at a chunk boundary."""
    b, h, length, dh = q.shape
    kvh = k.size(1)
    pad = (-length) % c
    if pad:  # padded keys sit after every real query, so the causal mask hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (length + pad) // c

    def fold(t: torch.Tensor, heads: int) -> torch.Tensor:  # [B, heads, N·C, Dh] -> [B·N, heads, C, Dh]
        return t.view(b, heads, n, c, dh).transpose(1, 2).reshape(b * n, heads, c, dh)

    out = attend(fold(q, h), fold(k, kvh), fold(v, kvh))
    out = out.view(b, n, h, c, dh).transpose(1, 2).reshape(b, h, n * c, dh)  # unfold
    return out[:, :, :length]


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    chunk_size: int,
    attend: AttendFn,
) -> torch.Tensor:
    """Chunked causal attention of q [B, H, Lq, Dh] at positions q_start.. over k, v [B, K, Lk, Dh].

    Keys cover positions k_start .. q_start+Lq-1 (so they end with the queries), with
    k_start <= q_start. Keys before the first query's chunk are ignored.
    """
    lq = q.size(2)
    q_end = q_start + lq
    check_key_range(q_start, lq, k_start, k.size(2))
    first_end = min(q_end, chunk_start(q_start, chunk_size) + chunk_size)
    n_first = first_end - q_start  # queries in the first (maybe partial) chunk
    k_first = max(k_start, chunk_start(q_start, chunk_size)) - k_start
    k_split = first_end - k_start
    out_first = attend(q[:, :, :n_first], k[:, :, k_first:k_split], v[:, :, k_first:k_split])
    if n_first == lq:
        return out_first
    out_rest = _aligned_chunks(q[:, :, n_first:], k[:, :, k_split:], v[:, :, k_split:], chunk_size, attend)
    return torch.cat((out_first, out_rest), dim=2)


def check_key_range(q_start: int, lq: int, k_start: int, lk: int) -> None:
    """Keys must cover [k_start, q_start + Lq) with k_start <= q_start: they end with the queries."""
    q_end = q_start + lq
    if k_start > q_start or k_start + lk != q_end:
        raise ValueError(
            f"keys must cover positions [k_start, q_end) = [{k_start}, {q_end}) with k_start <= q_start={q_start}; "
            f"got {lk} keys from {k_start}"
        )

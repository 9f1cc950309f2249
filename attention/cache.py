"""KV caches for incremental decoding.

Global layers keep every position. Chunked layers keep a ring buffer of exactly
`chunk_size` slots, slot = position mod C: since chunks start at multiples of C,
the current chunk's keys always sit in slots 0 .. (pos mod C), so a chunked
layer's memory is bounded by C whatever the sequence length.

Shapes: B batch, K kv heads, S cache slots, L new positions, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import torch

from llamoe.attention.chunked import chunk_start


class LayerKVCache:
    """Keys and values of one attention layer: all positions (global) or one chunk (ring)."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        chunk_size: Optional[int],
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        self.chunk_size = chunk_size
        self.max_seq_len = max_seq_len
        slots = max_seq_len if chunk_size is None else min(chunk_size, max_seq_len)
        shape = (batch_size, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.next_pos = 0  # positions [0, next_pos) have been written

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store k, v [B, K, L, Dh] at positions start_pos..; return the keys/values to attend over and their first position."""
        length = k.size(2)
        end = start_pos + length
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache holds {self.max_seq_len} positions but positions up to {end} were requested; "
                "make the cache with a larger max_seq_len"
            )
        if start_pos > self.next_pos:
            raise ValueError(f"KV cache has positions [0, {self.next_pos}) but got new tokens at {start_pos}: gap")
        if self.chunk_size is None:
            self.k[:, :, start_pos:end] = k
            self.v[:, :, start_pos:end] = v
            self.next_pos = end
            return self.k[:, :, :end], self.v[:, :, :end], 0
        return self._update_ring(k, v, start_pos, end)

    def _update_ring(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        c = self.chunk_size
        assert c is not None
        first = chunk_start(start_pos, c)
        prefix = start_pos - first  # cached keys of the current chunk, in slots [0, prefix)
        if prefix and chunk_start(self.next_pos - 1, c) != first:
            raise ValueError(f"a chunked cache holds only its newest chunk; cannot restart at position {start_pos}")
        if prefix:
            k_all = torch.cat((self.k[:, :, :prefix], k), dim=2)
            v_all = torch.cat((self.v[:, :, :prefix], v), dim=2)
        else:
            k_all, v_all = k, v
        last = chunk_start(end - 1, c)  # keep only the chunk that later queries can see
        keep = end - last
        self.k[:, :, :keep] = k_all[:, :, -keep:]
        self.v[:, :, :keep] = v_all[:, :, -keep:]
        self.next_pos = end
        return k_all, v_all, first


class KVCache:
    """One LayerKVCache per transformer layer."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    def __getitem__(self, layer_id: int) -> LayerKVCache:
        return self.layers[layer_id]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        """Bytes allocated for keys and values over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

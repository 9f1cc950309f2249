"""Attention configuration: rotary embeddings and the attention layout, frozen and validated on creation.

Every change is a `dataclasses.replace()`, which validates the new value again. Errors name the
key as it appears in a model config (`rope.theta`, `attention.chunk_size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llamoe.config_error import ConfigError


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding. `scaling="llama3"` is Llama 3.1's frequency scaling."""

    theta: float = 500000.0
    scaling: Optional[str] = None  # None | "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        _need(self.theta > 0, "rope.theta", "must be > 0")
        _need(self.scaling in (None, "llama3"), "rope.scaling", f"must be null or 'llama3', got {self.scaling!r}")
        if self.scaling == "llama3":
            _need(self.factor >= 1, "rope.factor", "must be >= 1")
            _need(
                self.high_freq_factor >= self.low_freq_factor > 0,
                "rope.high_freq_factor",
                "need high_freq_factor >= low_freq_factor > 0",
            )
            _need(self.original_max_position > 0, "rope.original_max_position", "must be > 0")


@dataclass(frozen=True)
class AttentionConfig:
    """Attention layout switches (Llama 4 iRoPE, QK-norm, temperature tuning).

    - nope_layer_interval: layer i is NoPE (no rotary, global causal attention)
      iff (i+1) % interval == 0. None: RoPE everywhere; 1: NoPE everywhere.
    - chunk_size: RoPE layers attend only within their absolute chunk of this
      many positions. None: RoPE layers are global too.
    - qk_norm: weightless RMS norm on q and k after RoPE, on RoPE layers.
    - temperature_tuning: scale NoPE-layer queries by
      1 + attn_scale * ln(1 + floor((p+1)/floor_scale)); eval-time switchable.
    - backend: "sdpa" (reference), "flex" or "flash" (the newest installed FA4/FA3/FA2 the GPU supports).
    """

    nope_layer_interval: Optional[int] = None
    chunk_size: Optional[int] = None
    qk_norm: bool = False
    temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        _need(
            self.nope_layer_interval is None or self.nope_layer_interval >= 1,
            "attention.nope_layer_interval",
            "must be null (RoPE everywhere) or >= 1",
        )
        _need(self.chunk_size is None or self.chunk_size >= 1, "attention.chunk_size", "must be null or >= 1")
        _need(self.floor_scale > 0, "attention.floor_scale", "must be > 0")
        _need(self.attn_scale >= 0, "attention.attn_scale", "must be >= 0")
        _need(
            self.backend in ("sdpa", "flex", "flash"),
            "attention.backend",
            f"must be one of sdpa|flex|flash, got {self.backend!r}",
        )

    def uses_rope(self, layer_id: int) -> bool:
        """iRoPE (Llama 4): layer i is NoPE iff (i+1) % nope_layer_interval == 0."""
        k = self.nope_layer_interval
        return k is None or (layer_id + 1) % k != 0

    def is_chunked(self, layer_id: int) -> bool:
        """RoPE layers use chunked causal attention when chunk_size is set; NoPE layers are global."""
        return self.chunk_size is not None and self.uses_rope(layer_id)


__all__ = ["AttentionConfig", "ConfigError", "RopeConfig"]

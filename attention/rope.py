"""Rotary position embeddings (Su et al., 2021) with Llama 3.1 "llama3" frequency scaling.

Rotation pairs are adjacent channels (2i, 2i+1), as in Meta's reference code;
`models/hf.py` permutes q/k rows for Hugging Face Llama's rotate-half layout.

Shapes: B batch, L sequence, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch

from llamoe.attention.config import RopeConfig


def llama3_scale_frequencies(freqs: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / freqs
    if cfg.high_freq_factor == cfg.low_freq_factor:
        smooth = torch.zeros_like(freqs)
    else:
        smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor
        )
    blended = (1 - smooth) * freqs / cfg.factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / cfg.factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, out)


def rope_frequencies(head_dim: int, cfg: RopeConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies θ^(−2i/Dh), scaled as `cfg.scaling` says. Shape [Dh/2], fp32."""
    freqs = 1.0 / (cfg.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if cfg.scaling == "llama3":
        freqs = llama3_scale_frequencies(freqs, cfg)
    return freqs.float()


def rope_angles(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency for absolute `positions` [L]. Each [L, Dh/2], fp32."""
    angles = torch.outer(positions.to(torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, Dh] by the angles for each position [L, Dh/2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, L, H, Dh/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]  # broadcast over B and H
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)

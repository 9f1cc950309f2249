"""Building blocks shared by every Llama layer: RMSNorm, and the SwiGLU feed-forward (which `moe`
owns, since its shared expert is the same module).

Shapes: B batch, L sequence, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from llamoe.moe.swiglu import FeedForward


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, computed in fp32 (Llama's RMSNorm without weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * self.weight

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


__all__ = ["FeedForward", "RMSNorm", "rms_norm"]

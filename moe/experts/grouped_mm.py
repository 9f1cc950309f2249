"""Expert backend on `torch._grouped_mm`: three grouped GEMMs over the whole sorted batch.

Shapes: N expert-sorted token-slots, D model dim, F expert hidden dim, E experts.

`torch._grouped_mm(a [N, K], b [E, K, M], offs=int32 [E] cumulative group ends) -> [N, M]`
multiplies rows offs[e-1]:offs[e] of `a` by b[e]. On CUDA it is the fused kernel for
bf16 (rows of D and F must be 16-byte aligned, i.e. multiples of 8 in bf16); torch 2.13
also runs it on CPU (fp32 and bf16), which lets the tests compare it with the reference
there. No host sync: the offsets stay on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamoe.config_error import ConfigError
from llamoe.moe.experts.base import Experts


class GroupedMMExperts(Experts):
    """Grouped GEMMs for gate, up and down projections of all experts at once."""

    @classmethod
    def check_available(cls, hidden_dim: int) -> None:
        if not hasattr(torch, "_grouped_mm"):
            raise ConfigError(
                "moe.backend",
                f"'grouped_mm' needs torch._grouped_mm (torch >= 2.8); this torch is {torch.__version__}. "
                "Upgrade torch or set moe.backend=torch",
            )

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        if x.shape[0] == 0:  # no tokens on this rank: _grouped_mm's backward rejects an empty input, and the
            # output must stay attached to `x` so the backward all-to-all still runs (moe/experts/torch_loop.py)
            w1, w3, w2 = (w[0].to(x.dtype) for w in (self.w1, self.w3, self.w2))
            return (F.silu(x @ w1) * (x @ w3)) @ w2
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # [E] end row of each group
        gate = torch._grouped_mm(x, self.w1.to(x.dtype), offs=offs)  # [N, F]
        up = torch._grouped_mm(x, self.w3.to(x.dtype), offs=offs)  # [N, F]
        return torch._grouped_mm(F.silu(gate) * up, self.w2.to(x.dtype), offs=offs)  # [N, D]

"""The reference expert backend: one GEMM per expert over its contiguous token group.

Shapes: N expert-sorted token-slots, D model dim, F expert hidden dim, E experts.

Plain PyTorch on CPU and GPU. The Python loop runs over experts, never tokens. Weights are
taken apart with `unbind`, whose backward stacks the E gradients in one op (indexing
w1[e] instead would materialise an [E, D, F] gradient per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamoe.moe.experts.base import Experts


class TorchExperts(Experts):
    """Per-expert torch.matmul over contiguous groups; the reference for the other backends."""

    # Never compiled: the loop needs the group sizes on the host, and a compiled loop would be
    # specialised on them (which experts are empty) and recompiled as they change (models/compile.py).
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        counts = tokens_per_expert.tolist()  # the reference's one host sync per forward
        *groups, dropped = x.split([*counts, x.shape[0] - sum(counts)])  # E views [n_e, D], then dropped slots
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)  # E × [D, F], [D, F], [F, D]
        # Empty groups too: a [0, D] product costs nothing, and it keeps the output attached to `x` when
        # this rank received no tokens at all, so the backward all-to-all still runs here (EP ranks stay
        # in step). The weight gradients are the same: unbind's backward fills unused experts with zeros.
        outs = [(F.silu(g @ w1[e]) * (g @ w3[e])) @ w2[e] for e, g in enumerate(groups)]
        return torch.cat([*outs, torch.zeros_like(dropped)])  # [N, D], groups in expert order

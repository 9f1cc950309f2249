"""The expert interface that every backend implements.

Shapes: N expert-sorted token-slots, D model dim, F expert hidden dim, E experts held here.
"""

from __future__ import annotations

import torch
from torch import nn


class Experts(nn.Module):
    """E independent SwiGLU experts, w2(silu(x·w1) ⊙ x·w3), over tokens sorted by expert.

    Parameters (names are part of the checkpoint layout; `models/hf.py` maps them):
      w1 [E, D, F] gate, w3 [E, D, F] up, w2 [E, F, D] down.
    A backend with `hidden_major = True` stores w1 and w3 with the strides of a contiguous [E, F, D]
    (the same shape, names and values; only the memory order differs), so its kernels can take them
    as one [D, E·F] matrix by a view. Casts, moves, `to_empty`, state-dict loads and optimizer states
    keep that order (torch preserves a dense tensor's strides), and checkpoints hold the same tensors.

    `forward(x, tokens_per_expert)` takes x [N, D] whose first tokens_per_expert[0] rows go
    to expert 0, the next tokens_per_expert[1] rows to expert 1, and so on, and returns
    [N, D] in the same order, in x's dtype (the compute dtype, moe/precision.py). Rows past
    sum(tokens_per_expert) are slots a capacity dropped: their outputs are unspecified (the
    layer zeroes them), so the sizes never need to reach the host. Backends differ only in
    how they compute this.
    """

    hidden_major = False  # store w1, w3 [E, D, F] in [E, F, D] memory order (see above)

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.first_expert = 0  # global index of the first expert held here (expert parallelism)
        self.w1 = nn.Parameter(self._gate_up_tensor(num_experts, dim, hidden_dim, device, dtype))
        self.w3 = nn.Parameter(self._gate_up_tensor(num_experts, dim, hidden_dim, device, dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, device=device, dtype=dtype))

    def _gate_up_tensor(
        self, e: int, d: int, f: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """An uninitialised [E, D, F] gate or up weight, in this backend's memory order."""
        if self.hidden_major:  # [E, F, D] storage viewed as [E, D, F]
            return torch.empty(e, f, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.empty(e, d, f, device=device, dtype=dtype)

    @classmethod
    def check_available(cls, hidden_dim: int) -> None:
        """Raise ConfigError naming `moe.backend` if this backend cannot run here."""

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        """w1, w3 ~ N(0, init_std); the residual-facing w2 ~ N(0, out_std), truncated at 3σ.

        Each expert draws from its own generator, seeded by one draw of the global RNG plus its
        global index. So a rank holding experts [s, s + n) gets exactly those experts of the
        unsharded model, and the global RNG advances alike however the experts are sharded.
        """
        base = int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator(self.w1.device)
        for i in range(self.num_experts):
            generator.manual_seed(base + self.first_expert + i)
            for w, std in ((self.w1, init_std), (self.w3, init_std), (self.w2, out_std)):
                nn.init.trunc_normal_(w[i], std=std, a=-3 * std, b=3 * std, generator=generator)

    def local_slice(self, start: int, count: int) -> Experts:
        """A copy of the same backend holding experts [start, start + count) only (expert parallelism)."""
        part = type(self)(count, self.dim, self.hidden_dim, device=self.w1.device, dtype=self.w1.dtype)
        part.first_expert = self.first_expert + start
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                getattr(part, name).copy_(getattr(self, name)[start : start + count])
        return part

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def extra_repr(self) -> str:
        first = f", first_expert={self.first_expert}" if self.first_expert else ""
        return f"num_experts={self.num_experts}{first}, dim={self.dim}, hidden_dim={self.hidden_dim}"

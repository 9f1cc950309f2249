"""Expert computation backends behind one interface (`llamoe.moe.experts.base.Experts`).

`moe.backend` picks one; every backend holds the same parameters (w1, w3 [E, D, F],
w2 [E, F, D]) and gives the same result as "torch" up to floating-point rounding.

- "torch" (default, the reference): a per-expert GEMM over each contiguous token group,
  looping over experts in Python. CPU and GPU, any dtype.
- "grouped_mm": `torch._grouped_mm`, three grouped GEMMs for all experts, no host sync.
  The fused CUDA kernel wants bf16 with D and F multiples of 8; torch 2.13 also runs it
  on CPU (fp32 and bf16), where the tests check it against "torch".
- "megablocks": MegaBlocks' dropless block-sparse kernels (`megablocks.ops` + `stk`).
  CUDA only, and expert_hidden_dim must be a multiple of 128. It stores w1, w3 in [E, F, D]
  memory order (same shape and checkpoint), so the kernels get them as views (moe/experts/base.py).

What megablocks needs (megablocks 0.10.0, the newest on PyPI; checked from its sdist
metadata):
- Only a source distribution exists; installing it compiles a CUDA extension, so it needs
  a CUDA toolkit (CUDA_HOME) and either a visible GPU or TORCH_CUDA_ARCH_LIST at build time.
  On a machine without CUDA it builds without kernels, and `import megablocks.ops` fails.
- It pins torch>=2.7.0,<2.7.1, stanford-stk==0.7.1 (Triton block-sparse kernels;
  torch>=2.3,<3 and triton>=2.1), numpy<2.1 and packaging<24.2; the optional grouped
  GEMM path adds grouped_gemm==0.3.0.
- So the supported setup is a separate environment with torch 2.7.0 and its matching
  triton, then `pip install megablocks` on the GPU machine. This project's torch (2.13)
  is outside the pin; `pip install --no-build-isolation --no-deps megablocks stanford-stk`
  would build it against the installed torch with the pin unchecked. Neither route has
  been tried on a GPU yet: the "megablocks" equality test (`tests/moe`, marked gpu) is
  the check to run first.
Selecting a backend that cannot run here raises ConfigError naming `moe.backend`.
"""

from __future__ import annotations

from llamoe.config_error import ConfigError
from llamoe.moe.experts.base import Experts
from llamoe.moe.experts.grouped_mm import GroupedMMExperts
from llamoe.moe.experts.megablocks_dmoe import MegaBlocksExperts
from llamoe.moe.experts.torch_loop import TorchExperts

BACKENDS: dict[str, type[Experts]] = {
    "torch": TorchExperts,
    "grouped_mm": GroupedMMExperts,
    "megablocks": MegaBlocksExperts,
}


def build_experts(backend: str, num_experts: int, dim: int, hidden_dim: int) -> Experts:
    """Build the `backend` experts; fails fast, naming `moe.backend`, if it cannot run here."""
    if backend not in BACKENDS:
        raise ConfigError("moe.backend", f"unknown backend {backend!r}; choose one of {'|'.join(BACKENDS)}")
    cls = BACKENDS[backend]
    cls.check_available(hidden_dim)
    return cls(num_experts, dim, hidden_dim)


__all__ = ["BACKENDS", "Experts", "build_experts"]

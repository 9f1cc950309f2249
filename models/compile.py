"""torch.compile of each transformer block (`train.compile`), and what it costs for MoE blocks.

`compile_blocks(model)` compiles every block in place (`nn.Module.compile`: parameter names and
the state dict stay as they are). Blocks, not the whole model: the blocks of one model share
their code, so they share compiled graphs, and a graph break inside one block does not split
the embedding, head and loss. Activation checkpointing composes with it: a checkpointed
block calls its compiled forward again in the backward (models/checkpointing.py).

Graph breaks (torch 2.13, CPU, fp32; `torch._dynamo.explain` in benchmarks/compile_blocks.py,
figures in benchmarks/RESULTS.md, "torch.compile of the blocks"):
- A dense block is one graph.
- A dropless MoE block is 4 graphs (attention and norms; routing up to the experts; combine,
  shared expert and stats; the residual), split at one place: the routed-expert computation.
  It needs the per-expert group sizes on the host (`tokens_per_expert.tolist()`), so it runs
  eagerly (`torch.compiler.disable` on `TorchExperts.forward`). Traced, it broke at the same
  place and Dynamo specialised the expert loop on the counts (which experts were empty): a
  4-step run of the tests' tiny MoE model compiled it 7 times, one short of the recompile
  limit (8) after which Dynamo runs it eagerly anyway. The break is inherent to per-expert
  GEMMs sized on the host. Cost on CPU, forward + backward: the tiny MoE block (d=64) runs at
  0.98x eager where a tiny dense block gains 3.3x; at d=256 MoE 1.11x, dense 1.15x.
- Under expert parallelism the all-to-all split sizes go to the host too:
  `AllToAllExchange.dispatch` and `.combine` (moe/dispatch.py) also run eagerly, next to the
  experts, and the block is still 4 graphs.
- "grouped_mm" experts never leave the device, but torch 2.13 traces `torch._grouped_mm` with
  bf16 inputs only, and in training the experts see fp32 activations (even under bf16
  autocast); the run config refuses `train.compile` with that backend.
- Variants: all blocks share `Block.forward`'s compiled code, one variant per kind of block
  (dense or MoE, RoPE or NoPE attention) and per grad mode (training, or validation under
  no_grad), each compiled on first use. Llama 4 layouts have up to 4 kinds, so 8 variants: torch's
  default `recompile_limit`. Checkpointing adds none: the recompute runs the training variant.
- Dynamo traces through the `functools.lru_cache` of `llamoe.attention.backends.get_backend` (it warns
  once; no break).
- The compiled losses equal eager's within a relative 1e-5 in fp32 (measured ~1e-7; see
  tests/experiments/test_train_checkpointing_compile.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

from torch import nn


def compile_blocks(model: nn.Module) -> None:
    """Compile each block of `model.layers` in place with torch.compile's defaults (inductor)."""
    for block in model.layers:
        block.compile()


def compiler_missing(device_type: str) -> Optional[str]:
    """What inductor lacks here to compile for `device_type` ("cpu" or "cuda"), or None: a C++
    compiler on CPU (g++, or $CXX as inductor reads it), Triton on CUDA."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "compiling for CUDA needs triton"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"compiling for CPU needs a C++ compiler; {cxx!r} is not on PATH"


__all__ = ["compile_blocks", "compiler_missing"]

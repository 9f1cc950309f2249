"""torch.compile of one block (`train.compile`) against the same block in eager mode, on this machine.

For a dense block and a dropless MoE block (reference "torch" experts, sigmoid top-k routing,
shared expert), at a tiny size (the tests' d=64, 4 experts, 4 x 32 tokens) and a CPU-sized one
(d=256, 16 experts top-1, expert and shared hidden 512, 4 x 512 tokens):
- graphs and graph breaks per block, from `torch._dynamo.explain` (models/compile.py explains them);
- compile time: the first compiled forward + backward;
- forward + backward ms, eager and compiled, median over interleaved rounds (load from other
  processes hits both alike), and the compiled speed relative to eager.

    python benchmarks/compile_blocks.py
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Callable

import torch

from llamoe.attention.rope import rope_angles
from llamoe.models import ModelConfig, Transformer, presets

ROUNDS, WARMUP = 7, 2


def configs() -> dict[str, tuple[ModelConfig, int, int]]:
    """name -> (one-layer model config, batch, sequence length)."""
    tiny = presets.get("llama4-tiny")
    assert tiny.moe is not None
    small_moe = replace(tiny.moe, num_experts=4, expert_hidden_dim=64, interleave_step=1)
    small = replace(tiny, dim=64, n_heads=4, n_kv_heads=2, multiple_of=16, n_layers=1, moe=small_moe)
    cpu_moe = replace(tiny.moe, num_experts=16, expert_hidden_dim=512, shared_expert_hidden_dim=512, interleave_step=1)
    cpu = replace(tiny, n_layers=1, moe=cpu_moe)
    return {
        "dense, tiny": (replace(small, moe=None), 4, 32),
        "MoE, tiny": (small, 4, 32),
        "dense, d=256": (replace(cpu, moe=None, ffn_hidden_dim=1024), 4, 512),
        "MoE, d=256": (cpu, 4, 512),
    }


def step_of(block: torch.nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        out, aux, _ = block(x, rope, 0, None)
        (out.square().mean() + (aux if aux is not None else 0)).backward()

    return step


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; medians of {ROUNDS} rounds after {WARMUP} warm-up")
    print("| block | graphs | breaks | compile s | eager ms | compiled ms | compiled speed vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name, (cfg, batch, length) in configs().items():
        torch.manual_seed(0)
        model = Transformer(cfg)
        eager, compiled = model.layers[0], Transformer(cfg).layers[0]
        compiled.load_state_dict(eager.state_dict())
        x = torch.randn(batch, length, cfg.dim, requires_grad=True)
        rope = rope_angles(model.rope_freqs, torch.arange(length))
        explained = torch._dynamo.explain(eager)(x, rope, 0, None)
        torch._dynamo.reset()
        compiled.compile()
        start = time.perf_counter()
        step_of(compiled, x, rope)()
        compile_s = time.perf_counter() - start
        steps = {"eager": step_of(eager, x, rope), "compiled": step_of(compiled, x, rope)}
        for _ in range(WARMUP):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(ROUNDS):
            for key, step in steps.items():
                start = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]) * 1e3, statistics.median(times["compiled"]) * 1e3
        print(
            f"| {name} | {explained.graph_count} | {explained.graph_break_count} | {compile_s:.1f} | "
            f"{e:.1f} | {c:.1f} | {e / c:.2f}x |"
        )


if __name__ == "__main__":
    main()

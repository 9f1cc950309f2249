"""MoE speed against in-process baselines: one layer, then a whole model's training step.

1. Layer: forward + backward of `moe.MoE` (d=256, expert and shared
   hidden F=512, 8 × 512 tokens) against a dense SwiGLU with the same active parameters (hidden (k+1)·F), for
   E = 8/16/64 experts and top-k 1/2, with each expert backend that runs here.
2. Model: training steps (forward, backward, AdamW) of llamoe's Transformer with 16 experts
   top-1 + shared on every one of 8 layers (d=256, seq 512) against
   - transformers' Llama4ForCausalLM with the same config and weights (`llamoe.models.hf.to_hf`),
     which computes every expert for every token (goal: >= 3x its throughput), and
   - a dense llamoe model with the same active parameters (goal: >= 0.75x its throughput).

Each round times one step of every contender in turn and the median over rounds is
reported, so load from other processes hits all of them alike. Ratios are throughput
relative to the baseline named in each table.

    python benchmarks/moe_layer.py                 # both parts
    python benchmarks/moe_layer.py --part layer    # or --part model
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from llamoe.models import ModelConfig, MoEConfig, Transformer, presets
from llamoe.models.build import build_model
from llamoe.models.layers import FeedForward
from llamoe.moe.experts import BACKENDS
from llamoe.moe.layer import MoE

DIM = 256


def median_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step, interleaving the contenders round by round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_backends() -> list[str]:
    usable = []
    for name, cls in BACKENDS.items():
        try:
            cls.check_available(512)
        except ValueError:
            continue
        usable.append(name)
    return usable


def layer_benchmark(rounds: int, warmup: int) -> None:
    tokens, hidden = 8 * 512, 512
    x = torch.randn(8, 512, DIM)
    grad = torch.randn_like(x)
    backends = cpu_backends()
    print(f"\n## Layer forward+backward, {tokens} tokens, d={DIM}, expert/shared hidden {hidden}")
    print("| E | top-k | dense SwiGLU ms | " + " | ".join(f"MoE {b} ms (x dense)" for b in backends) + " |")
    print("|---|---|---|" + "---|" * len(backends))
    for num_experts in (8, 16, 64):
        for top_k in (1, 2):
            dense = FeedForward(DIM, (top_k + 1) * hidden)  # same active parameters as k experts + shared
            dense.init_weights(0.02, 0.02)
            steps: dict[str, Callable[[], None]] = {"dense": lambda m=dense: m(x).backward(grad)}
            for backend in backends:
                moe_cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden_dim=hidden, backend=backend)
                layer = MoE(DIM, moe_cfg)
                layer.init_weights(0.02, 0.02)
                steps[backend] = lambda m=layer: m(x).out.backward(grad)
            t = median_times(steps, rounds, warmup)
            cells = " | ".join(f"{t[b] * 1e3:.0f} ({t['dense'] / t[b]:.2f}x)" for b in backends)
            print(f"| {num_experts} | {top_k} | {t['dense'] * 1e3:.0f} | {cells} |")


def model_configs() -> tuple[ModelConfig, ModelConfig]:
    """llama4-tiny's attention and sizes with 8 layers, 16 experts top-1 + shared on every layer,
    and its dense twin whose FFN hidden equals routed + shared hidden."""
    tiny = presets.get("llama4-tiny")
    assert tiny.moe is not None
    moe = replace(tiny, n_layers=8, moe=replace(tiny.moe, num_experts=16, interleave_step=1))
    hidden = tiny.moe.expert_hidden_dim * (tiny.moe.top_k + 1)
    dense = replace(tiny, n_layers=8, moe=None, ffn_hidden_dim=hidden)
    return moe, dense


def training_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        if isinstance(model, Transformer):
            loss = loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def model_benchmark(rounds: int, warmup: int, batch_size: int, seq_len: int) -> None:
    from llamoe.models.hf import to_hf

    moe_cfg, dense_cfg = model_configs()
    ours = build_model(moe_cfg)
    hf = to_hf(ours).train()
    dense = build_model(dense_cfg)
    tokens = torch.randint(0, moe_cfg.vocab_size, (batch_size, seq_len + 1))
    with torch.no_grad():  # same config and weights: same logits
        diff = (ours(tokens[:, :-1]).logits - hf(tokens[:, :-1]).logits).abs().max().item()
    steps = {"llamoe MoE": training_step(ours, tokens), "HF Llama4": training_step(hf, tokens)}
    steps["llamoe dense"] = training_step(dense, tokens)
    t = median_times(steps, rounds, warmup)
    n = batch_size * seq_len
    print(
        f"\n## Whole model training step: 8 layers all MoE (16 experts top-1 + shared, F={moe_cfg.moe.expert_hidden_dim}),"
        f" d={DIM}, batch {batch_size} x seq {seq_len}; logits max |llamoe - HF| = {diff:.1e}"
    )
    print(
        f"params: MoE {moe_cfg.num_params():,} (active {moe_cfg.num_active_params():,}); "
        f"dense {dense_cfg.num_params():,}"
    )
    print("| model | step ms | tokens/s | llamoe MoE throughput relative to it |")
    print("|---|---|---|---|")
    for name, sec in t.items():
        print(f"| {name} | {sec * 1e3:.0f} | {n / sec:,.0f} | {sec / t['llamoe MoE']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["layer", "model", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps shared machines fair)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4, help="model part only")
    parser.add_argument("--seq-len", type=int, default=512, help="model part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} rounds")
    if args.part in ("layer", "all"):
        layer_benchmark(args.rounds, args.warmup)
    if args.part in ("model", "all"):
        model_benchmark(args.rounds, args.warmup, args.batch_size, args.seq_len)


if __name__ == "__main__":
    main()

"""Training throughput and MFU of a ~1B dense model and an MoE model of similar active size, across backends.

Baseline in the same process: the reference backends (attention "sdpa", experts "torch").
Every other backend combination prints its tokens/s as a ratio against it.

    python benchmarks/train_throughput.py                  # GPU: bf16, 1B-class configs
    python benchmarks/train_throughput.py --small          # CPU-sized smoke run of the same script

Configs (Llama 3.2 1B shape): dim 2048, 16 layers, 32 heads, 8 kv heads, vocab 128256, tied head.
Dense FFN hidden 8192. The MoE twin has 16 experts top-1 with expert and shared hidden 4096 on
every layer, so its active FFN width equals the dense one (active params match up to routers).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import torch

from llamoe.experiments.commands.bench import measure_training_throughput
from llamoe.models import AttentionConfig, ModelConfig, MoEConfig, RopeConfig


def dense_1b(small: bool) -> ModelConfig:
    if small:
        return ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2048, ffn_hidden_dim=1024)
    return ModelConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_hidden_dim=8192,
        tie_embeddings=True,
        rope=RopeConfig(theta=500000.0),
    )


def moe_1b(small: bool) -> ModelConfig:
    cfg = dense_1b(small)
    hidden = cfg.ffn_hidden // 2
    return replace(
        cfg,
        moe=MoEConfig(num_experts=16, top_k=1, interleave_step=1, expert_hidden_dim=hidden, num_shared_experts=1),
        attention=AttentionConfig(nope_layer_interval=4, chunk_size=2048 if not small else 64),
    )


def available_backends(device: str) -> tuple[list[str], list[str]]:
    """Attention and expert backends that can run on this device."""
    if device != "cuda":
        return ["sdpa"], ["torch"]
    attn = ["sdpa", "flex"]
    experts = ["torch", "grouped_mm"]
    try:
        import flash_attn  # noqa: F401

        attn.append("flash")
    except ImportError:
        print("flash-attn not installed: skipping attention.backend=flash")
    try:
        import megablocks  # noqa: F401

        experts.append("megablocks")
    except ImportError:
        print("megablocks not installed: skipping moe.backend=megablocks")
    return attn, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized configs (smoke test of the script)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = args.batch_size or (4 if small else 8)
    seq = args.seq_len or (256 if small else 4096)
    attn_backends, expert_backends = available_backends(device)
    print(f"device={device} dtype={dtype} batch={batch} seq={seq}")
    for name, build in (("dense", dense_1b), ("moe", moe_1b)):
        baseline = None
        for attn, experts in itertools.product(attn_backends, expert_backends if name == "moe" else ["-"]):
            cfg = build(small)
            cfg = replace(cfg, attention=replace(cfg.attention, backend=attn))
            if cfg.moe is not None:
                cfg = replace(cfg, moe=replace(cfg.moe, backend=experts))
            result = measure_training_throughput(
                cfg, batch_size=batch, seq_len=seq, steps=args.steps, dtype=dtype, device=device
            )
            baseline = baseline or result.tokens_per_s
            mfu = f"{100 * result.mfu:5.1f}%" if result.mfu is not None else "  n/a"
            print(
                f"{name:5s} attn={attn:5s} experts={experts:10s} params={cfg.num_params() / 1e6:8.1f}M "
                f"active={cfg.num_active_params() / 1e6:8.1f}M tokens/s={result.tokens_per_s:10.0f} "
                f"ratio={result.tokens_per_s / baseline:5.2f} MFU={mfu}"
            )


if __name__ == "__main__":
    main()

"""How iRoPE attention scales with context: compute per token, prefill memory, KV-cache size.

1. Forward time per token of one chunked (RoPE) and one global (NoPE) attention layer at
   L = 1K..32K, batch 1, printed as ratios against each layer's own 1K time. Chunked
   attention costs O(L·C), so its per-token time should stay flat (goal: within 1.3x at
   32K); global attention costs O(L²), so its per-token time should grow linearly.
2. Peak memory of the last block of a blocked 64K-token prefill through a global layer
   with a cache (4K queries over 64K keys), with SDPA's masks sliced to the default budget
   and, for comparison, built whole.
3. KV-cache bytes of the Llama 4 Scout attention layout (iRoPE: 36 chunked + 12 global
   layers) against the same model with every layer global, at 64K and 1M positions, bf16,
   computed from `Transformer.make_cache` on the meta device (nothing is allocated).

    python benchmarks/attention_scaling.py            # 3-5 minutes on a shared 2-core CPU
    python benchmarks/attention_scaling.py --max-len 8192 --reps 1     # quick look

Shapes: B batch, L sequence, D model dim, H query heads, K kv heads, Dh head dim, C chunk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from dataclasses import replace

import torch

from llamoe.attention.attention import Attention
from llamoe.attention.backends import SDPA_MASK_BUDGET, sdpa_attention
from llamoe.attention.rope import rope_angles, rope_frequencies
from llamoe.models import AttentionConfig, ModelConfig, Transformer, presets

GIB = 1024**3


def layer_config(chunk: int) -> ModelConfig:
    """Layer 0 is RoPE + chunked, layer 1 NoPE + global with temperature tuning (Llama 4 style)."""
    return ModelConfig(
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=256,
        max_seq_len=1 << 20,
        attention=AttentionConfig(
            nope_layer_interval=2, chunk_size=chunk, qk_norm=True, temperature_tuning=True, floor_scale=chunk
        ),
    )


@torch.no_grad()
def time_per_token(layer: Attention, cfg: ModelConfig, length: int, reps: int) -> float:
    """Best-of-reps seconds per token of one forward over `length` tokens (after a warm-up run)."""
    x = torch.randn(1, length, cfg.dim)
    rope = rope_angles(rope_frequencies(cfg.head_size, cfg.rope), torch.arange(length))
    layer(x, rope)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        layer(x, rope)
        best = min(best, time.perf_counter() - start)
    return best / length


def scaling(max_len: int, chunk: int, reps: int) -> None:
    cfg = layer_config(chunk)
    sizes = (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.norm_eps, cfg.attention)
    layers = {"chunked": Attention(*sizes, 0).eval(), "global": Attention(*sizes, 1).eval()}
    for layer in layers.values():
        layer.init_weights(0.02, 0.02)
    lengths = [1024 * 2**i for i in range(max_len.bit_length()) if 1024 * 2**i <= max_len]
    print(
        f"\n1. forward time per token, one attention layer (D={cfg.dim}, H={cfg.n_heads}, K={cfg.kv_heads}, "
        f"Dh={cfg.head_size}, C={chunk}), batch 1, best of {reps}"
    )
    print(f"{'L':>7s} {'chunked us/tok':>15s} {'ratio':>6s} {'global us/tok':>14s} {'ratio':>6s}")
    base: dict[str, float] = {}
    for length in lengths:
        row = []
        for name, layer in layers.items():
            t = time_per_token(layer, cfg, length, reps)
            base.setdefault(name, t)
            row.append(f"{t * 1e6:15.2f} {t / base[name]:6.2f}")
        print(f"{length:7d} " + " ".join(row))


def _last_block_peak_gib(cache_len: int, block: int, max_mask_elements: int) -> float:
    """In a fresh process: GiB by which peak resident memory exceeds the resident size before one SDPA call."""
    torch.set_num_threads(1)
    q = torch.randn(1, 2, block, 64)  # [B, H, Lq, Dh]: the newest prefill block
    k, v = torch.randn(1, 1, cache_len, 64), torch.randn(1, 1, cache_len, 64)  # [B, K, Lk, Dh]
    with open("/proc/self/statm") as statm:  # resident pages now (Linux); ru_maxrss is the peak so far
        before = int(statm.read().split()[1]) * resource.getpagesize()
    with torch.no_grad():
        sdpa_attention(q, k, v, max_mask_elements=max_mask_elements)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / GIB


def prefill_memory(cache_len: int, block: int) -> None:
    print(f"\n2. last block of a blocked prefill through a global layer: {block} queries over {cache_len} cached keys")
    budgets = {"sliced masks (default budget)": SDPA_MASK_BUDGET, "one whole mask": block * cache_len}
    for name, budget in budgets.items():
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process per measurement
            peak = pool.apply(_last_block_peak_gib, (cache_len, block, budget))
        print(
            f"   {name:30s} mask elements per call {min(budget, block * cache_len):>11d}: peak memory +{peak:.3f} GiB"
        )


def cache_bytes() -> None:
    scout = presets.get("llama4-scout")
    all_global = replace(scout, attention=replace(scout.attention, chunk_size=None))
    print("\n3. KV cache, Llama 4 Scout attention layout, batch 1, bf16 (meta device: nothing allocated)")
    print(f"{'positions':>10s} {'iRoPE GiB':>10s} {'all-global GiB':>15s} {'ratio':>6s}")
    with torch.device("meta"):
        models = Transformer(scout), Transformer(all_global)
    for n in (64 * 1024, 1 << 20):
        irope, full = (m.make_cache(1, n, dtype=torch.bfloat16).nbytes() for m in models)
        print(f"{n:10d} {irope / GIB:10.2f} {full / GIB:15.2f} {irope / full:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    scaling(args.max_len, args.chunk, args.reps)
    prefill_memory(cache_len=65536, block=4096)
    cache_bytes()


if __name__ == "__main__":
    main()

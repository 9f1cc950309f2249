"""CPU checks of three issue-22 paths, each against the code it replaced (run in-process as the baseline).

1. SDPA prefill behind a cache (GQA, 4096 queries over 65536 keys): the lower-right causal bias in
   mask-budget slices (attention/backends.py) against the boolean-mask slices it replaced; time and
   peak memory above the start, each in a fresh process.
2. clip_grad_norm (experiments/train/distributed.py) on bf16 gradients: foreach norms against the per-tensor
   fp32 copies it replaced; time, the bytes the CPU allocator hands out during the call (profiler) and
   the norm's error against an fp64 sum.
3. The megablocks operand layout (moe/experts/megablocks_dmoe.py): the [D, E·F] views against the
   per-forward permute + copy; time and bytes copied per forward. The kernels need CUDA.

    python benchmarks/precision_paths.py      # about a minute on a shared 2-core CPU

Shapes: H query heads, K kv heads, Lq queries, Lk keys, Dh head dim, E experts, D model dim, F hidden dim.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from llamoe.attention.backends import SDPA_MASK_BUDGET, sdpa_attention
from llamoe.experiments.train.distributed import World, clip_grad_norm
from llamoe.moe.experts.megablocks_dmoe import MegaBlocksExperts

MIB = 1024**2


def _median_s(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _boolean_mask_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The replaced prefill path: boolean tril masks in slices of at most SDPA_MASK_BUDGET elements."""
    lq, lk = q.size(2), k.size(2)
    offset, rows = lk - lq, max(1, SDPA_MASK_BUDGET // lk)
    outs = []
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        mask = torch.ones(r1 - r0, offset + r1, dtype=torch.bool).tril(diagonal=offset + r0)
        keys = offset + r1
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, r0:r1], k[:, :, :keys], v[:, :, :keys], attn_mask=mask, enable_gqa=True
            )
        )
    return torch.cat(outs, dim=2)


def _prefill(path: str) -> tuple[float, float, torch.Tensor]:
    """In a fresh process: (seconds, MiB of peak resident memory above the start, output) of one prefill."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 4096, 64)  # [B, H, Lq, Dh]
    k, v = torch.randn(1, 1, 65536, 64), torch.randn(1, 1, 65536, 64)  # [B, K, Lk, Dh]
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * resource.getpagesize()
    fn = sdpa_attention if path == "bias" else _boolean_mask_slices
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(q, k, v)
    seconds = time.perf_counter() - t0
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / MIB, out[:, :, ::512]


def prefill() -> None:
    print("1. SDPA prefill, 4096 queries over 65536 keys, GQA 4:1, Dh 64, 1 thread")
    results = {}
    for path in ("boolean mask", "bias"):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results[path] = pool.apply(_prefill, (path,))
    base = results["boolean mask"]
    for path, (seconds, peak, out) in results.items():
        diff = (out - base[2]).abs().max().item()
        print(
            f"   {path:13s} {seconds:6.2f} s ({seconds / base[0]:.2f}x)  peak +{peak:7.1f} MiB  max |diff| {diff:.1e}"
        )


def _old_clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    grads = [p.grad.detach().float() for p in params]
    norm = torch.stack([g.square().sum() for g in grads]).sum().sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(scale)
    return norm


def _allocated_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """(MiB the CPU allocator handed out during fn, its largest single allocation in MiB)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return sum(sizes) / MIB, max(sizes, default=0) / MIB


def clipping() -> None:
    shapes = [(4096, 1024)] * 4 + [(1024, 4096)] * 2 + [(1024,)] * 8  # 24M bf16 gradient elements
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape).bfloat16())
        p.grad = torch.randn(shape).bfloat16()
        params.append(p)
    total = sum(p.numel() for p in params) * 2 / MIB
    print(f"\n2. clip_grad_norm, {len(params)} bf16 gradients, {total:.0f} MiB, 2 threads")
    runs = {"per-tensor fp32": lambda: _old_clip(params, 1e9), "foreach": lambda: clip_grad_norm(params, 1e9, World())}
    exact = sum(p.grad.double().square().sum() for p in params).sqrt().item()  # max_norm 1e9: nothing is scaled
    base = None
    for name, fn in runs.items():
        seconds = _median_s(fn, 5)
        allocated, largest = _allocated_mib(fn)
        error = abs(float(fn()) - exact) / exact
        base = base or seconds
        print(
            f"   {name:16s} {seconds * 1e3:7.1f} ms ({seconds / base:.2f}x)  allocated {allocated:6.1f} MiB, "
            f"largest {largest:5.1f} MiB  norm rel. error vs fp64 {error:.1e}"
        )


def megablocks_operands() -> None:
    e, d, f = 16, 1024, 1024
    experts = MegaBlocksExperts(e, d, f)
    experts.init_weights(0.02, 0.02)

    before = [w.detach().contiguous() for w in (experts.w1, experts.w3)]  # the old [E, D, F] memory order

    def old() -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(w.permute(1, 0, 2).reshape(d, e * f) for w in before)  # type: ignore[return-value]

    print(f"\n3. megablocks w1/w3 operands, E={e} D={d} F={f}, fp32 weights and compute")
    t_old, t_new = _median_s(old, 5), _median_s(lambda: experts._dense_weights(torch.float32), 5)
    copied = 2 * e * d * f * 4 / MIB
    print(f"   permute + copy   {t_old * 1e3:8.3f} ms  {copied:.0f} MiB copied per forward")
    print(f"   views            {t_new * 1e3:8.3f} ms  ({t_new / t_old:.1e}x)  0 MiB copied")
    assert all(torch.equal(a, b) for a, b in zip(old(), experts._dense_weights(torch.float32)))


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}")
    prefill()
    clipping()
    megablocks_operands()

"""`llamoe bench`: training-step throughput and model FLOPs utilisation (MFU) of a model config.

MFU = achieved model FLOPs / peak FLOPs, with model FLOPs from
`ModelConfig.flops_per_token(seq_len)` (3 × forward matmul + causal attention
FLOPs, chunked layers counted at their real cost). Peak FLOPs are looked up
for known GPUs (dense bf16 tensor-core figures from the vendor data sheets) or
given with --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from llamoe.experiments.config import resolve_model
from llamoe.models import ModelConfig
from llamoe.models.build import build_model

# Dense (no sparsity) peak TFLOP/s by device-name substring and dtype.
PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.4,
    ("H200", torch.bfloat16): 989.4,
    ("A100", torch.bfloat16): 312.0,
    ("B200", torch.bfloat16): 2250.0,  # HGX B200 (1000 W)
    ("H100", torch.float32): 66.9,
    ("H200", torch.float32): 66.9,
    ("A100", torch.float32): 19.5,
    ("B200", torch.float32): 80.0,
}


@dataclass
class Throughput:
    tokens_per_s: float
    step_time_s: float
    flops_per_token: float
    achieved_tflops: float
    mfu: Optional[float]
    peak_memory_gib: Optional[float]


def peak_tflops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Vendor peak for the current CUDA device and dtype, or None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for (key, dt), v in PEAK_TFLOPS.items() if key in name and dt == dtype), None)


def measure_training_throughput(
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    steps: int = 5,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    peak: Optional[float] = None,
) -> Throughput:
    """Time full training steps (forward, backward, AdamW) on random tokens after `warmup` steps."""
    dev = torch.device(device)
    model = build_model(cfg, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss = loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = (time.perf_counter() - start) / steps
    fpt = cfg.flops_per_token(seq_len)
    achieved = fpt * batch_size * seq_len / elapsed / 1e12
    peak = peak if peak is not None else peak_tflops(dev, dtype)
    return Throughput(
        tokens_per_s=batch_size * seq_len / elapsed,
        step_time_s=elapsed,
        flops_per_token=fpt,
        achieved_tflops=achieved,
        mfu=achieved / peak if peak else None,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    )


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamoe bench", description=__doc__)
    parser.add_argument("model", help="preset name, e.g. llama4-tiny")
    parser.add_argument("overrides", nargs="*", help="model field overrides, e.g. moe.backend=grouped_mm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak for MFU")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_model(args.model, args.overrides)  # experiments/config.py's model rules
    except (KeyError, ValueError) as err:
        print(f"llamoe bench: {err}", file=sys.stderr)
        return 2
    result = measure_training_throughput(
        cfg,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        peak=args.peak_tflops,
    )
    print(json.dumps({"model": args.model, "overrides": args.overrides, **asdict(result)}, indent=2))
    return 0

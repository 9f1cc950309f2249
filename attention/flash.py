"""flash-attn versions: which one runs on this GPU, and one causal call over all of them.

| version | import | needs compute capability |
|---|---|---|
| FA4 | `from flash_attn.cute import flash_attn_func` (CuTe DSL) | sm90 or sm100 (9.x, 10.x) |
| FA3 | `from flash_attn_interface import flash_attn_func` (the `hopper/` build) | sm90 (9.x) |
| FA2 | `from flash_attn import flash_attn_func` | sm80 or newer (8.x+) |

The rule (`select`): the newest installed version that supports the device's compute capability,
so FA4 on Blackwell and Hopper where it is installed, FA3 on Hopper, else FA2. When none fits,
ConfigError names `attention.backend`, what is installed and what each version needs.

All three take q/k/v as [B, L, heads, Dh] in fp16/bf16, grouped-query attention natively (the
kv heads divide the query heads), and `causal=True` bottom-right aligned (FA2 since 2.1). They
differ in what they return: FA4 returns (out, lse); FA3 returned (out, lse) until it made the
lse optional and now returns out; FA2 returns out. `flash_causal` takes the output either way.

Shapes: B batch, H query heads, K kv heads, Lq queries, Lk keys, Dh head dim.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from llamoe.config_error import ConfigError

FlashFn = Callable[..., Any]


@dataclass(frozen=True)
class FlashVersion:
    """One flash-attn release line: where its `flash_attn_func` lives and which GPUs it runs on."""

    name: str
    module: str
    min_major: int  # compute capability majors [min_major, max_major] it supports
    max_major: Optional[int]  # None: no upper bound

    def supports(self, capability: tuple[int, int]) -> bool:
        major = capability[0]
        return major >= self.min_major and (self.max_major is None or major <= self.max_major)

    def needs(self) -> str:
        if self.max_major is None:
            return f"sm{self.min_major}0 or newer"
        return " or ".join(f"sm{m}0" for m in range(self.min_major, self.max_major + 1))


# Newest first: `select` takes the first that is installed and supports the GPU.
VERSIONS = (
    FlashVersion("FA4", "flash_attn.cute", 9, 10),
    FlashVersion("FA3", "flash_attn_interface", 9, 9),
    FlashVersion("FA2", "flash_attn", 8, None),
)


def _load(version: FlashVersion) -> Optional[FlashFn]:
    """The version's flash_attn_func, or None if it is not installed (or does not import)."""
    try:
        return getattr(importlib.import_module(version.module), "flash_attn_func", None)
    except ImportError:
        return None


def installed() -> list[tuple[FlashVersion, FlashFn]]:
    """The flash-attn versions importable here, newest first, with their flash_attn_func."""
    found = [(v, _load(v)) for v in VERSIONS]
    return [(v, fn) for v, fn in found if fn is not None]


def select(capability: tuple[int, int]) -> tuple[FlashVersion, FlashFn]:
    """The newest installed flash-attn version that runs on a GPU of `capability` (major, minor)."""
    found = installed()
    for version, fn in found:
        if version.supports(capability):
            return version, fn
    have = ", ".join(f"{v.name} ({v.module})" for v, _ in found) or "no flash-attn version"
    needs = "; ".join(f"{v.name} needs {v.needs()}" for v in VERSIONS)
    raise ConfigError(
        "attention.backend",
        f"'flash' found {have} installed and none runs on this GPU (sm{capability[0]}{capability[1]}): {needs}. "
        "Install a version for this GPU (FA2: pip install --no-build-isolation flash-attn) "
        "or set attention.backend=sdpa (reference) or flex",
    )


def flash_causal(fn: FlashFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bottom-right aligned causal attention of q [B, H, Lq, Dh] over k, v [B, K, Lk, Dh] with a flash
    `flash_attn_func`; inputs that are not fp16/bf16 run in bf16 and the result is cast back."""
    dtype = q.dtype
    run_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    # [B, heads, L, Dh] -> [B, L, heads, Dh]; flash needs only the last dim contiguous
    q, k, v = (t.transpose(1, 2).to(run_dtype) for t in (q, k, v))
    out = fn(q, k, v, causal=True)
    if isinstance(out, tuple):  # FA4, and FA3 releases before the lse became optional: (out, lse)
        out = out[0]
    return out.transpose(1, 2).to(dtype)  # [B, Lq, H, Dh] -> [B, H, Lq, Dh]


__all__ = ["VERSIONS", "FlashVersion", "flash_causal", "installed", "select"]

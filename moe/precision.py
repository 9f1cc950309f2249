"""The MoE precision policy, in one place.

Under mixed precision (bf16 autocast over fp32 weights and an fp32 residual stream):

| what | dtype |
|---|---|
| router input, logits, top-k, gates, aux and z losses | fp32, always (autocast is off inside the router) |
| router buffers `expert_bias`, `expert_load` | fp32, always: `model.to(dtype)` does not cast them |
| expert inputs (the permuted slots), the all-to-all payloads, the expert GEMMs | the compute dtype |
| expert outputs, from the weighted combine on | the input's dtype (fp32 residual stream) |

The compute dtype is autocast's dtype where autocast is on for the input's device, otherwise the
input's own dtype (a model cast to bf16 computes in bf16). Why fp32 routing: sigmoid gates in bf16
are quantised to about 4e-3, the size of the bias update rate, and a bf16 load counter saturates
at 256 (Meta's Llama 4 and DeepSeek-V3 route in fp32). Why the compute dtype for experts: the
`grouped_mm` and megablocks kernels are not autocast-registered, so an fp32 input would run fp32
GEMMs, and an fp32 all-to-all ships twice the bytes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # device types torch.autocast accepts


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in for input `x`: autocast's dtype if it is on for x's device, else x's."""
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def full_precision(x: torch.Tensor) -> AbstractContextManager[Any]:
    """A region where autocast is off for x's device, so `F.linear` on fp32 tensors stays fp32."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if device in _AUTOCAST_DEVICES else nullcontext()


class Fp32Buffers(nn.Module):
    """A module whose floating-point buffers stay fp32 when the module is cast (`.to(dtype)`, `.half()`).

    Moves (`.to(device)`, `to_empty`) apply as usual; only a change of dtype is refused, so the
    buffers keep their exact values.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Fp32Buffers:
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and old.is_floating_point() and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # moved if asked, never cast
        return self


__all__ = ["Fp32Buffers", "compute_dtype", "full_precision"]

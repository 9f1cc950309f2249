"""The one place the training loop issues a collective: every tensor sits on the backend's device.

NCCL accepts only CUDA tensors, gloo CPU ones. Control-plane values (stop flags, save and load
agreements, loss sums) are naturally built on the CPU, so each collective here moves its tensor to
`backend_device(group)` and copies the result back into the caller's tensor: one code path for gloo on
CPU and NCCL on GPU. The MoE all-to-all (moe/dispatch.py) exchanges activations, which already live on
the compute device, and DeepSpeed's engine issues its own gradient collectives.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def backend_device(group: Optional[Any] = None) -> torch.device:
    """The device the process group `group` (default: the world) takes tensors on."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Optional[Any] = None) -> torch.Tensor:
    """Reduce `tensor` in place over `group` with `op` ("sum", "max" or "mean"); returns it. A no-op
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = backend_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=_OPS["sum" if op == "mean" else op], group=group)
    if op == "mean":
        work /= dist.get_world_size(group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def agree_max(value: int) -> int:
    """The largest `value` over all ranks (an exit status every rank stops with)."""
    return int(all_reduce(torch.tensor([value], dtype=torch.int64), "max"))


def all_true(ok: bool) -> bool:
    """Whether `ok` holds on every rank."""
    return int(all_reduce(torch.tensor([0 if ok else 1], dtype=torch.int64))) == 0


def barrier() -> None:
    """Wait for every rank (on the backend's device: NCCL's barrier needs the current CUDA device set)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["agree_max", "all_reduce", "all_true", "backend_device", "barrier"]

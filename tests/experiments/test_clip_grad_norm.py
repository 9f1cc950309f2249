"""`llamoe.experiments.train.distributed.clip_grad_norm`: foreach norms grouped by device and dtype, fp32 accumulation.

It must equal torch.nn.utils.clip_grad_norm_ (norm and clipped gradients), keep the expert-parallel
semantics (expert squared norms summed over the EP group, replicated ones counted once), and never
make a full-size copy of a gradient: a TorchDispatchMode records every tensor the ops create.
"""

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from llamoe.experiments.train import distributed
from llamoe.experiments.train.distributed import World, clip_grad_norm


def _params(dtypes: tuple[torch.dtype, ...], seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (3, 40, 24), (7,)]
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        p.grad = (torch.randn(shape, generator=g) * (i + 1)).to(dtype)
        params.append(p)
    return params


def _copies(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e6])
def test_equals_torch_clip_grad_norm(dtypes: tuple[torch.dtype, ...], max_norm: float) -> None:
    ours, theirs = _params(dtypes), _params(dtypes)
    norm = clip_grad_norm(ours, max_norm, World())
    # torch's reference in fp32 (it would accumulate a bf16 group's norm in bf16)
    reference = [nn.Parameter(p.detach().float()) for p in theirs]
    for r, p in zip(reference, theirs):
        r.grad = p.grad.float()
    want = torch.nn.utils.clip_grad_norm_(reference, max_norm if max_norm > 0 else float("inf"))
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    for p, r, original in zip(ours, reference, theirs):
        expected = r.grad if max_norm > 0 else original.grad.float()
        tol = 1e-6 if p.grad.dtype == torch.float32 else 8e-3  # bf16 grads are scaled in place, in bf16
        torch.testing.assert_close(p.grad.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_expert_norms_are_summed_over_the_expert_parallel_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two EP ranks hold the same dense parameters and different experts: each must report the norm over the
    dense ones once plus both ranks' experts, the norm of the unsharded model."""
    rank0, rank1 = _params((torch.float32,), seed=1), _params((torch.float32,), seed=2)
    for p in rank0[2:] + rank1[2:]:
        p.allreduce = False  # type: ignore[attr-defined]  # routed experts (mark_expert_params)
    for p, q in zip(rank0[:2], rank1[:2]):
        q.grad = p.grad.clone()  # replicated: already averaged, equal on both ranks
    other_expert_sq = sum(float(p.grad.double().square().sum()) for p in rank1[2:])
    reduced: list[Any] = []

    def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
        reduced.append(group)
        return tensor.add_(other_expert_sq)  # what rank 1 contributes to the sum

    monkeypatch.setattr(distributed.collectives, "all_reduce", all_reduce)
    unsharded = _copies(rank0[:2] + rank0[2:] + rank1[2:])
    want = torch.nn.utils.clip_grad_norm_(unsharded, float("inf"))
    norm = clip_grad_norm(rank0, 0.0, World(ep_size=2, ep_group="ep_group"))
    assert reduced == ["ep_group"]
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)


class _CreatedTensors(TorchDispatchMode):
    """Records the element count of every new tensor an op returns (in-place results are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


def test_bf16_gradients_are_not_copied_to_fp32() -> None:
    params = _params((torch.bfloat16,))
    biggest = max(p.grad.numel() for p in params)
    with _CreatedTensors() as seen:
        params[0].grad.float()  # the harness sees a full copy when one is made
    assert seen.sizes == [params[0].grad.numel()]
    with _CreatedTensors() as seen:
        clip_grad_norm(params, 1.0, World())
    assert seen.sizes and max(seen.sizes) < biggest, seen.sizes

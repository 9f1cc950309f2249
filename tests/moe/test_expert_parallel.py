"""Expert parallelism: a layer whose experts are split over 2 gloo ranks equals the unsharded layer,
syncs with the host once per forward, and exchanges bf16 under bf16 autocast."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.host_syncs import HostSyncs
from llamoe.moe import dispatch
from llamoe.moe.config import MoEConfig
from llamoe.moe.layer import MoE

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layer(rank: int, top_k: int, score_on: str) -> None:
    moe = MoEConfig(num_experts=6, top_k=top_k, expert_hidden_dim=8, score_on=score_on)
    torch.manual_seed(0)  # identical weights on both ranks
    full = MoE(12, moe)
    full.init_weights(0.3, 0.2)
    sharded = MoE(12, moe)
    sharded.load_state_dict(full.state_dict())
    sharded.set_expert_parallel(dist.group.WORLD, ep_rank=rank, ep_size=WORLD)
    assert sharded.experts.w1.shape[0] == 3

    torch.manual_seed(100 + rank)  # each rank routes its own tokens (rank 1 has more)
    x = torch.randn(2, 5 + 3 * rank, 12)
    g = torch.randn_like(x)
    x_full = x.clone().requires_grad_(True)
    x_ep = x.clone().requires_grad_(True)
    out_full = full(x_full).out
    out_ep = sharded(x_ep).out
    torch.testing.assert_close(out_ep, out_full, rtol=0, atol=1e-5)

    (out_full * g).sum().backward()
    (out_ep * g).sum().backward()
    torch.testing.assert_close(x_ep.grad, x_full.grad, rtol=0, atol=1e-5)
    for name in ("router.gate.weight", "shared_expert.w1.weight", "shared_expert.w2.weight"):
        ref = dict(full.named_parameters())[name].grad
        torch.testing.assert_close(dict(sharded.named_parameters())[name].grad, ref, rtol=0, atol=1e-5)
    for name in ("w1", "w3", "w2"):
        total = getattr(full.experts, name).grad.clone()
        dist.all_reduce(total)  # an expert's gradient gathers the tokens of every rank
        local = total[3 * rank : 3 * rank + 3]
        torch.testing.assert_close(getattr(sharded.experts, name).grad, local, rtol=0, atol=1e-5)


def check_one_sync_and_bf16_payloads(rank: int, capacity_factor: float | None) -> None:
    """Forward + backward of an EP layer: one host sync (the split sizes), every all-to-all in bf16."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, backend="grouped_mm", capacity_factor=capacity_factor)
    layer = MoE(16, moe)  # bf16 grouped GEMM rows: multiples of 8
    layer.init_weights(0.3, 0.2)
    layer.set_expert_parallel(dist.group.WORLD, ep_rank=rank, ep_size=WORLD)
    payloads: list[torch.dtype] = []
    original = dispatch._AllToAll.forward

    def recording(ctx, x, out_splits, in_splits, group):  # type: ignore[no-untyped-def]
        payloads.append(x.dtype)
        return original(ctx, x, out_splits, in_splits, group)

    dispatch._AllToAll.forward = staticmethod(recording)  # type: ignore[method-assign]
    try:
        x = torch.randn(2, 6 + rank, 16, requires_grad=True)
        with HostSyncs() as syncs:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            out.out.square().sum().backward()
    finally:
        dispatch._AllToAll.forward = staticmethod(original)  # type: ignore[method-assign]
    assert syncs.calls == ["tolist"]
    assert payloads == [torch.bfloat16] * 4  # dispatch and combine, forward and backward
    assert torch.isfinite(x.grad).all()


def run_rank(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check_layer(rank, top_k=2, score_on="input")
        check_layer(rank, top_k=1, score_on="output")
        check_one_sync_and_bf16_payloads(rank, capacity_factor=None)
        check_one_sync_and_bf16_payloads(rank, capacity_factor=0.75)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ep2_equals_unsharded_layer() -> None:
    mp.spawn(run_rank, args=(free_port(),), nprocs=WORLD, join=True)

"""Capacity under expert parallelism is per sending rank (moe/config.py, MoEConfig.capacity_factor): each
rank's tokens are planned on their own, so an EP layer with a capacity drops exactly what the unsharded
layer drops on that rank's tokens alone, and an expert can receive up to ep_size x the local capacity."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamoe.moe.config import MoEConfig
from llamoe.moe.dispatch import expert_capacity
from llamoe.moe.layer import MoE

WORLD = 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        moe = MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=8, capacity_factor=0.5)
        torch.manual_seed(0)
        full = MoE(12, moe)
        full.init_weights(0.3, 0.2)
        sharded = MoE(12, moe)
        sharded.load_state_dict(full.state_dict())
        sharded.set_expert_parallel(dist.group.WORLD, ep_rank=rank, ep_size=WORLD)
        torch.manual_seed(7 + rank)
        x = torch.randn(1, 16, 12)
        ref, got = full(x), sharded(x)
        torch.testing.assert_close(got.out, ref.out, rtol=0, atol=1e-5)
        assert float(got.stats["dropped_frac"]) == float(ref.stats["dropped_frac"]) > 0  # the capacity binds
        # what each expert received from both ranks: at most ep_size x the local capacity
        cap = expert_capacity(16, 1, 4, 0.5)
        kept = torch.bincount(full.router(x.reshape(-1, 12)).expert_ids.flatten(), minlength=4).clamp(max=cap)
        dist.all_reduce(kept)
        assert int(kept.max()) <= WORLD * cap and int(kept.max()) > cap
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_capacity_is_per_sending_rank_under_expert_parallelism() -> None:
    mp.spawn(_check, args=(_free_port(),), nprocs=WORLD, join=True)

"""The aux-loss-free bias balancer: the update by hand, micro-batch accumulation, one stacked all-reduce."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llamoe.moe.balance import BiasBalancer
from llamoe.moe.config import MoEConfig
from llamoe.moe.layer import MoE
from llamoe.moe.router import Router

DIM = 8


def make_router(**kw) -> Router:
    router = Router(DIM, MoEConfig(**{"num_experts": 4, "top_k": 1, "bias_balancing": True, **kw}))
    router.init_weights(0.5)
    return router


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        ([10.0, 0.0, 5.0, 5.0], [-0.1, 0.1, 0.0, 0.0]),  # mean 5: experts at the mean keep their bias
        ([10.0, 0.0, 2.0, 4.0], [-0.1, 0.1, 0.1, 0.0]),  # mean 4
    ],
)
def test_update_is_rate_times_sign_of_load_error_and_clears_load(load: list[float], expected: list[float]) -> None:
    router = make_router(bias_update_rate=0.1)
    router.expert_load.copy_(torch.tensor(load))
    balancer = BiasBalancer.of(router)
    balancer.step()
    torch.testing.assert_close(router.expert_bias, torch.tensor(expected))
    assert router.expert_load.sum() == 0
    balancer.step()  # nothing routed since: no change
    torch.testing.assert_close(router.expert_bias, torch.tensor(expected))


def test_micro_batches_accumulate_into_one_update() -> None:
    router = make_router(bias_update_rate=0.5)
    balancer = BiasBalancer([router])
    router.train()
    counts = [router(torch.randn(n, DIM)).tokens_per_expert for n in (7, 13, 5)]  # three micro batches
    router.eval()
    router(torch.randn(50, DIM))  # evaluation does not count
    total = torch.stack(counts).sum(0).float()
    assert total.sum() == 25
    balancer.step()
    torch.testing.assert_close(router.expert_bias, 0.5 * torch.sign(total.mean() - total), rtol=0, atol=0)


class TwoRanks:
    """A stand-in for a 2-rank all-reduce: adds the other rank's tensor in place and records each call."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.calls: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(tensor.clone())
        return tensor.add_(self.other)


def test_all_layers_are_reduced_in_one_collective_before_the_update() -> None:
    routers = [make_router(bias_update_rate=0.1), make_router(num_experts=3, bias_update_rate=0.2)]
    routers[0].expert_load.copy_(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    routers[1].expert_load.copy_(torch.tensor([1.0, 1.0, 4.0]))
    other_rank = torch.tensor([0.0, 4.0, 2.0, 2.0, 5.0, 1.0, 0.0])  # its layer-0 load, then its layer-1 load
    reduce = TwoRanks(other_rank)
    BiasBalancer(routers, reduce).step()
    assert len(reduce.calls) == 1
    assert reduce.calls[0].tolist() == [4.0, 0.0, 2.0, 2.0, 1.0, 1.0, 4.0]  # every layer, stacked
    # global loads [4, 4, 4, 4] (balanced) and [6, 2, 4] (mean 4)
    torch.testing.assert_close(routers[0].expert_bias, torch.zeros(4))
    torch.testing.assert_close(routers[1].expert_bias, torch.tensor([-0.2, 0.2, 0.0]))
    assert all(r.expert_load.sum() == 0 for r in routers)


def test_of_finds_every_balancing_router_in_a_model() -> None:
    on = MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=8, bias_balancing=True)
    model = nn.Sequential(MoE(DIM, on), nn.Linear(DIM, DIM), MoE(DIM, on))
    assert BiasBalancer.of(model).routers == [model[0].router, model[2].router]


def test_without_bias_balancing_nothing_happens() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=8)
    layer = MoE(DIM, cfg)
    layer.init_weights(0.3, 0.2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    reduce = TwoRanks(torch.ones(4))
    balancer = BiasBalancer.of(layer, reduce)
    assert balancer.routers == []
    layer.train()
    layer(torch.randn(1, 8, DIM))
    balancer.step()
    assert reduce.calls == []  # no collective either
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_balancing_reduces_imbalance() -> None:
    layer = MoE(16, MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=12, bias_balancing=True,
                              bias_update_rate=0.02, num_shared_experts=0))  # fmt: skip
    layer.init_weights(0.3, 0.2)
    balancer = BiasBalancer.of(layer)
    with torch.no_grad():
        layer.router.gate.weight[0] += 1.0  # skew: expert 0 wins for inputs with a positive sum
    layer.train()
    x = (torch.randn(256, 16).abs() * 0.5 + torch.randn(256, 16) * 0.2).unsqueeze(0)
    with torch.no_grad():
        start = layer(x).stats["load_imbalance"].item()
        layer.router.expert_load.zero_()
        for _ in range(40):
            layer(x)
            balancer.step()
        end = layer(x).stats["load_imbalance"].item()
    assert start == 4.0  # every token on expert 0
    assert end < 1.3
    assert layer.router.expert_bias[0] < 0


# ---------------------------------------------------------------------- real gloo process group
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ranks_agree(rank: int) -> None:
    torch.manual_seed(0)  # identical routers on both ranks
    routers = [make_router(bias_update_rate=0.1), make_router(num_experts=6, top_k=2, bias_update_rate=0.1)]
    torch.manual_seed(100 + rank)  # each rank routes its own tokens
    for r in routers:
        r.train()
        r(torch.randn(10 + 7 * rank, DIM))
    local = torch.cat([r.expert_load for r in routers])
    calls = []

    def all_reduce(tensor: torch.Tensor) -> None:
        calls.append(tensor.numel())
        dist.all_reduce(tensor)

    BiasBalancer(routers, all_reduce).step()
    assert calls == [10]  # one collective of 4 + 6 counts
    total = local.clone()
    dist.all_reduce(total)
    for r, load in zip(routers, total.split([4, 6])):
        torch.testing.assert_close(r.expert_bias, 0.1 * torch.sign(load.mean() - load), rtol=0, atol=0)
    biases = torch.cat([r.expert_bias for r in routers])
    gathered = [torch.empty_like(biases) for _ in range(WORLD)]
    dist.all_gather(gathered, biases)
    assert torch.equal(gathered[0], gathered[1])  # every replica applied the same update
    assert not torch.equal(local, total / WORLD)  # the ranks did route differently


def run_rank(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        check_ranks_agree(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_apply_the_same_update() -> None:
    mp.spawn(run_rank, args=(free_port(),), nprocs=WORLD, join=True)

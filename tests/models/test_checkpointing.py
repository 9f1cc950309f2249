"""Activation checkpointing: the same losses, gradients, router load and balancer biases as without it.

Checkpointing recomputes the same ops on the same inputs, so on CPU everything is compared
bitwise, in one process and under expert parallelism (2 gloo ranks, where the recompute repeats
the all-to-alls). Counters of block forwards and saved bytes show the recompute really happens
(otherwise the equality, and the load counted once, would hold trivially). The load is compared
itself, not only the biases: the sign update cannot see a load counted twice in every layer.
"""

import os
import socket
from dataclasses import replace
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from llamoe.models import ModelConfig, Transformer, presets
from llamoe.models.build import build_model
from llamoe.models.checkpointing import checkpointed_layers
from llamoe.moe.balance import BiasBalancer

STEPS, MICRO = 3, 2


def tiny_config(kind: str) -> ModelConfig:
    """Four small blocks. The MoE models have jitter (the recompute must draw the same noise), both aux
    losses and bias balancing; "moe" has four MoE blocks, "llama4" two interleaved with dense ones."""
    if kind == "dense":
        cfg = replace(presets.get("llama3.1-tiny"), dim=32, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16)
    else:
        base = presets.get("llama4-tiny")
        moe = replace(
            base.moe, num_experts=4, top_k=2, expert_hidden_dim=32, jitter=0.1, aux_loss_weight=0.01,
            z_loss_weight=1e-3, bias_balancing=True, bias_update_rate=0.05, interleave_step=1 if kind == "moe" else 2,
        )  # fmt: skip
        attention = replace(base.attention, chunk_size=8, nope_layer_interval=2)
        cfg = replace(base, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16, moe=moe, attention=attention)
    return cfg


def tiny_model(kind: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(kind))


def train(model: Transformer, policy: str, data_seed: int = 1, reduce: Optional[Any] = None) -> dict[str, Any]:
    """STEPS optimizer steps of MICRO micro batches each; everything a step produces, per step."""
    model.set_activation_checkpointing(policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    balancer = BiasBalancer.of(model, reduce)
    gen = torch.Generator().manual_seed(data_seed)
    record: dict[str, list[Any]] = {"loss": [], "aux": [], "stats": [], "grads": [], "load": [], "bias": []}
    torch.manual_seed(2)  # router jitter
    for _ in range(STEPS):
        for _ in range(MICRO):
            tokens = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=gen)
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
            (loss + out.aux_loss).backward()
            record["loss"].append(loss.detach())
            record["aux"].append(out.aux_loss.detach())
            record["stats"].append(out.router_stats)
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        record["load"].append([r.expert_load.clone() for r in balancer.routers])
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        record["bias"].append([r.expert_bias.clone() for r in balancer.routers])
    return record


def assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)


def test_policies_name_the_blocks() -> None:
    assert checkpointed_layers("none", 4) == [False] * 4
    assert checkpointed_layers("full", 4) == [True] * 4
    assert checkpointed_layers("selective", 5) == [True, False, True, False, True]
    with pytest.raises(ValueError, match="none|full|selective"):
        checkpointed_layers("attention", 4)


@pytest.mark.parametrize("kind", ["dense", "moe", "llama4"])
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_is_bitwise_equal(kind: str, policy: str) -> None:
    reference, checkpointed = train(tiny_model(kind), "none"), train(tiny_model(kind), policy)
    for key in reference:
        assert_identical(checkpointed[key], reference[key])
    if kind != "dense":  # the balancer moved the biases, from loads counted once per micro batch
        assert all(b.abs().sum() > 0 for b in reference["bias"][-1])
        slots = 2 * 16 * 2 * MICRO  # tokens x top_k per micro batch, MICRO micro batches
        assert all(float(load.sum()) == slots for load in reference["load"][0])


def forward_backward(policy: str) -> tuple[list[int], int, list[int]]:
    """Block forward calls in one training forward + backward, the bytes the autograd graph keeps outside
    checkpointed blocks, and the block calls of a no_grad forward after it."""
    model = tiny_model("moe")
    model.set_activation_checkpointing(policy)
    calls = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
    out.logits.sum().backward()
    trained = list(calls)
    with torch.no_grad():
        model(tokens)
    return trained, saved, [c - t for c, t in zip(calls, trained)]


def test_checkpointed_blocks_run_twice_and_keep_less() -> None:
    saved = {}
    for policy in ("none", "full", "selective"):
        trained, saved[policy], inference = forward_backward(policy)
        assert trained == [2 if c else 1 for c in checkpointed_layers(policy, 4)], policy
        assert inference == [1] * 4, policy  # no backward follows: no checkpointing
    assert saved["full"] < saved["selective"] < saved["none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_expert_parallel(rank: int, port: int) -> None:
    """One of 2 ranks: each holds 2 of the 4 experts and routes its own tokens; every policy trains alike."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        runs = {}
        for policy in ("none", "full", "selective"):
            model = build_model(tiny_config("moe"), seed=0, ep_rank=rank, ep_size=2, ep_group=dist.group.WORLD)
            assert model.layers[0].feed_forward.experts.w1.shape[0] == 2
            calls = [0] * len(model.layers)
            for i, layer in enumerate(model.layers):
                layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
            runs[policy] = train(model, policy, data_seed=1 + rank, reduce=dist.all_reduce)
            per_forward = [2 if c else 1 for c in checkpointed_layers(policy, 4)]
            assert calls == [STEPS * MICRO * n for n in per_forward], policy  # the recompute ran
        for policy in ("full", "selective"):
            for key in runs["none"]:
                assert_identical(runs[policy][key], runs["none"][key])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_checkpointing_under_expert_parallelism_is_bitwise_equal() -> None:
    mp.spawn(run_expert_parallel, args=(free_port(),), nprocs=2, join=True)

"""The MoE layer against a naive dense reference that runs every expert on every token."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from llamoe.moe.config import MoEConfig
from llamoe.moe.layer import MoE, MoEOutput

DIM = 16


def make_cfg(**moe_kw) -> MoEConfig:
    moe = {"num_experts": 6, "top_k": 2, "expert_hidden_dim": 12, "shared_expert_hidden_dim": 20, **moe_kw}
    return MoEConfig(**moe)


def make_moe(**moe_kw) -> MoE:
    layer = MoE(DIM, make_cfg(**moe_kw))
    layer.init_weights(0.3, 0.2)
    return layer


def dense_reference(layer: MoE, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Every expert on every token; each output masked by the routing, computed from scratch."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ layer.router.gate.weight.T  # [N, E]
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    ids = logits.topk(cfg.top_k, dim=-1).indices
    chosen = scores.gather(-1, ids)
    if cfg.renormalize:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    gate = torch.zeros_like(scores).scatter(-1, ids, chosen)  # [N, E], zero for unchosen experts
    out = torch.zeros_like(flat)
    if layer.shared_expert is not None:
        s = layer.shared_expert
        out = out + F.silu(flat @ s.w1.weight.T) * (flat @ s.w3.weight.T) @ s.w2.weight.T
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    for e in range(cfg.num_experts):
        g = gate[:, e : e + 1]
        inp = flat * g if cfg.score_on == "input" else flat
        y = (F.silu(inp @ w1[e]) * (inp @ w3[e])) @ w2[e]
        y = y if cfg.score_on == "input" else y * g
        out = out + y * (g != 0)
    return out.reshape(x.shape)


# top-1 renormalised is refused (its gate is exactly 1: tests/moe/test_router_learns.py)
CASES = [
    c
    for c in itertools.product(["sigmoid", "softmax"], ["input", "output"], [1, 2], [False, True])
    if c[2:] != (1, True)
]


@pytest.mark.parametrize("score_func,score_on,top_k,renormalize", CASES)
def test_matches_dense_reference_forward_and_backward(score_func, score_on, top_k, renormalize) -> None:
    layer = make_moe(score_func=score_func, score_on=score_on, top_k=top_k, renormalize=renormalize)
    cfg = make_cfg(score_func=score_func, score_on=score_on, top_k=top_k, renormalize=renormalize)
    x = torch.randn(3, 7, DIM, requires_grad=True)
    out = layer(x)
    assert isinstance(out, MoEOutput) and out.out.shape == x.shape
    ref = dense_reference(layer, x, cfg)
    torch.testing.assert_close(out.out, ref, rtol=0, atol=1e-5)

    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out.out * g).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *layer.parameters()])
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_without_shared_expert() -> None:
    layer = make_moe(num_shared_experts=0)
    assert layer.shared_expert is None
    x = torch.randn(2, 5, DIM)
    reference = dense_reference(layer, x, make_cfg(num_shared_experts=0))
    torch.testing.assert_close(layer(x).out, reference, rtol=0, atol=1e-5)


def test_gradients_reach_router_experts_and_shared_expert() -> None:
    layer = make_moe(top_k=1)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    layer(x).out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_aux_loss_is_weighted_sum_and_stats_are_unscaled() -> None:
    layer = make_moe(aux_loss_weight=0.01, z_loss_weight=0.001)
    out = layer(torch.randn(2, 8, DIM))
    expected = 0.01 * out.stats["aux_loss"] + 0.001 * out.stats["z_loss"]
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    assert out.aux_loss.requires_grad
    assert make_moe()(torch.randn(2, 8, DIM)).aux_loss.item() == 0.0


def test_stats_describe_the_load() -> None:
    layer = make_moe(top_k=2, bias_balancing=True)
    out = layer(torch.randn(4, 8, DIM))
    s = out.stats
    load = s["tokens_per_expert"].float()
    assert load.sum() == 4 * 8 * 2
    torch.testing.assert_close(s["load_imbalance"], load.max() / load.mean())
    torch.testing.assert_close(s["cv"], load.std(unbiased=False) / load.mean())
    torch.testing.assert_close(s["frac_empty_experts"], (load == 0).float().mean())
    assert s["dropped_frac"].item() == 0.0
    assert 0 < s["router_entropy"].item() <= torch.log(torch.tensor(6.0)).item() + 1e-6
    assert s["expert_bias_norm"].item() == 0.0
    assert all(not v.requires_grad for v in s.values())
    assert "expert_bias_norm" not in make_moe()(torch.randn(1, 4, DIM)).stats


def test_capacity_drop_accounting() -> None:
    layer = make_moe(top_k=1, capacity_factor=1.0, num_shared_experts=0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 5.0  # tokens with x[0] > 0 all pick expert 2
    x = torch.randn(1, 24, DIM)
    x[0, :, 0] = x[0, :, 0].abs() + 0.1  # every token to expert 2
    out = layer(x)
    capacity = 4  # ceil(1.0 * 24 * 1 / 6)
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, 24, 0, 0, 0]
    torch.testing.assert_close(out.stats["dropped_frac"], torch.tensor(20 / 24))
    kept = out.out[0].abs().sum(-1) > 0
    assert kept.tolist() == [True] * capacity + [False] * (24 - capacity)  # earliest tokens are kept


def test_meta_construction_does_not_allocate() -> None:
    cfg = MoEConfig(num_experts=128, expert_hidden_dim=8192, interleave_step=2, bias_balancing=True)
    with torch.device("meta"):
        layer = MoE(5120, cfg)
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(t.is_meta for t in tensors)
    n = sum(p.numel() for p in layer.parameters())
    assert n == 5120 * 128 + 128 * 3 * 5120 * 8192 + 3 * 5120 * 8192


def test_meta_then_materialise_and_init() -> None:
    cfg = make_cfg(bias_balancing=True)
    with torch.device("meta"):
        layer = MoE(DIM, cfg)
    layer.to_empty(device="cpu")
    layer.init_weights(0.02, 0.01)
    assert layer.router.expert_bias.abs().sum() == 0 and layer.router.expert_load.abs().sum() == 0
    out = layer(torch.randn(2, 4, DIM))
    assert torch.isfinite(out.out).all()


def test_bf16_input_keeps_dtype() -> None:
    layer = make_moe().to(torch.bfloat16)
    x = torch.randn(2, 6, DIM)
    out = layer(x.bfloat16()).out
    assert out.dtype == torch.bfloat16
    ref = make_moe()
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x.bfloat16().float()).out, rtol=0.05, atol=0.02)

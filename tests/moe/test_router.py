"""Router semantics against direct computation, and the aux-loss / z-loss formulas by hand."""

import math

import pytest
import torch

from llamoe.models.config import MoEConfig
from llamoe.moe.router import Router, load_balancing_loss, z_loss


def make_router(dim: int = 8, **kw) -> Router:
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, **kw})
    router = Router(dim, cfg)
    router.init_weights(0.5)
    return router


def test_gate_is_linear_without_bias() -> None:
    router = make_router()
    assert router.gate.weight.shape == (6, 8)
    assert router.gate.bias is None


def test_sigmoid_topk_matches_direct_computation() -> None:
    router = make_router(top_k=2, score_func="sigmoid")
    x = torch.randn(20, 8)
    r = router(x)
    logits = x @ router.gate.weight.T
    ids = logits.topk(2, dim=-1).indices
    assert torch.equal(r.expert_ids, ids)
    torch.testing.assert_close(r.weights, torch.sigmoid(logits).gather(-1, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(r.weights.sum(-1), torch.ones(20))  # Llama 4 does not renormalise


def test_softmax_scores_over_all_experts_then_topk() -> None:
    router = make_router(top_k=3, score_func="softmax")
    x = torch.randn(20, 8)
    r = router(x)
    probs = torch.softmax(x @ router.gate.weight.T, dim=-1)
    vals, ids = probs.topk(3, dim=-1)
    assert torch.equal(r.expert_ids, ids)
    torch.testing.assert_close(r.weights, vals, rtol=0, atol=1e-6)
    assert (r.weights.sum(-1) < 1).all()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_renormalize_divides_by_topk_sum(score_func: str) -> None:
    plain = make_router(top_k=3, score_func=score_func)
    renorm = make_router(top_k=3, score_func=score_func, renormalize=True)
    renorm.load_state_dict(plain.state_dict())
    x = torch.randn(10, 8)
    a, b = plain(x), renorm(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(b.weights, a.weights / a.weights.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.weights.sum(-1), torch.ones(10), rtol=0, atol=1e-6)


def test_router_computes_in_fp32_for_bf16_input() -> None:
    router = make_router()
    x = torch.randn(10, 8)
    r16 = router(x.bfloat16())
    assert r16.weights.dtype == torch.float32
    ref = torch.sigmoid(x.bfloat16().float() @ router.gate.weight.T).gather(-1, r16.expert_ids)
    torch.testing.assert_close(r16.weights, ref, rtol=0, atol=1e-6)


def test_tokens_per_expert_counts_slots() -> None:
    router = make_router(top_k=2)
    r = router(torch.randn(50, 8))
    assert r.tokens_per_expert.sum() == 100
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_ids.flatten(), minlength=6))


def two_expert_router(score_func: str) -> Router:
    router = Router(2, MoEConfig(num_experts=2, top_k=1, score_func=score_func))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))  # logits = x
    return router


def test_aux_and_z_loss_by_hand_softmax() -> None:
    rows = [[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [4.0, 0.0]]
    r = two_expert_router("softmax")(torch.tensor(rows))
    p0 = [math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in rows]
    f = [3 / 4, 1 / 4]  # tokens 0, 1, 3 pick expert 0; token 2 picks expert 1
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    aux = 2 * (f[0] * P[0] + f[1] * P[1])
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in rows) / 4
    assert r.aux_loss.item() == pytest.approx(aux, abs=1e-6)
    assert r.z_loss.item() == pytest.approx(z, abs=1e-5)


def test_aux_loss_by_hand_sigmoid_uses_normalised_scores() -> None:
    rows = [[2.0, -1.0], [0.5, 1.0], [0.0, 3.0]]
    r = two_expert_router("sigmoid")(torch.tensor(rows))
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in rows]
    p = [[s / sum(row) for s in row] for row in sig]
    f = [1 / 3, 2 / 3]
    P = [sum(row[e] for row in p) / 3 for e in range(2)]
    assert r.aux_loss.item() == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), abs=1e-6)
    ent = -sum(sum(q * math.log(q) for q in row) for row in p) / 3
    assert r.entropy.item() == pytest.approx(ent, abs=1e-6)


def test_aux_loss_extremes() -> None:
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([2, 2, 2, 2])).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    assert load_balancing_loss(collapsed, torch.tensor([8, 0, 0, 0])).item() == pytest.approx(4.0)
    assert z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_aux_loss_gradient_reaches_gate() -> None:
    router = make_router(score_func="softmax")
    r = router(torch.randn(16, 8))
    (r.aux_loss + r.z_loss).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_jitter_only_in_training() -> None:
    router = make_router(jitter=0.5)
    x = torch.randn(64, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.weights, b.weights)
    router.train()
    c = router(x)
    assert not torch.allclose(c.weights, a.weights)
    quiet = make_router(jitter=0.0)
    quiet.train()
    assert torch.equal(quiet(x).weights, quiet.eval()(x).weights)


def test_expert_bias_steers_selection_not_weights() -> None:
    router = make_router(top_k=1, bias_balancing=True)
    x = torch.randn(30, 8)
    with torch.no_grad():
        router.expert_bias[4] = 10.0
    r = router(x)
    assert (r.expert_ids == 4).all()
    logits = x @ router.gate.weight.T
    torch.testing.assert_close(r.weights[:, 0], torch.sigmoid(logits[:, 4]), rtol=0, atol=1e-6)


def test_load_accumulates_in_training_only() -> None:
    router = make_router(top_k=2, bias_balancing=True)
    x = torch.randn(10, 8)
    router.eval()
    router(x)
    assert router.expert_load.sum() == 0
    router.train()
    r1 = router(x)
    router(x)
    torch.testing.assert_close(router.expert_load, 2 * r1.tokens_per_expert.float())
    assert {"expert_bias", "expert_load"} <= router.state_dict().keys()

"""The router learns from the loss: every layout MoEConfig accepts passes the loss's gradient to the
router weights, and the layouts whose gate is a constant (no gradient) are refused naming the keys."""

import itertools

import pytest
import torch

from llamoe.config_error import ConfigError
from llamoe.moe.config import MoEConfig
from llamoe.moe.layer import MoE

DIM = 16
REL_GRAD = 1e-4  # |dL/dW| / |W| of the router; accepted layouts measure 1e-3..3e-2, a constant gate ~1e-9

LAYOUTS = list(itertools.product([1, 2], [False, True], ["input", "output"], ["softmax", "sigmoid"]))


def constant_gate(top_k: int, renormalize: bool) -> bool:
    """The measured rule: one renormalised gate is s / s = 1, whatever the score."""
    return top_k == 1 and renormalize


def router_rel_grad(cfg: MoEConfig) -> float:
    """Relative gradient of the router weight from a loss on the layer's output alone (no aux loss)."""
    layer = MoE(DIM, cfg)
    layer.init_weights(0.3, 0.2)
    x = torch.randn(4, 16, DIM)
    target = torch.randn(4, 16, DIM)
    (layer(x).out - target).square().mean().backward()
    w = layer.router.gate.weight
    return (w.grad.norm() / w.norm()).item()


@pytest.mark.parametrize(("top_k", "renormalize", "score_on", "score_func"), LAYOUTS)
def test_accepted_layouts_pass_gradient_to_the_router_and_constant_gates_are_refused(
    top_k: int, renormalize: bool, score_on: str, score_func: str
) -> None:
    layout = {"top_k": top_k, "renormalize": renormalize, "score_on": score_on, "score_func": score_func}
    moe = {"num_experts": 6, "expert_hidden_dim": 12, "shared_expert_hidden_dim": 20, **layout}
    if constant_gate(top_k, renormalize):
        with pytest.raises(ConfigError) as err:
            MoEConfig(**moe)
        assert err.value.key == "moe.renormalize"
        assert "moe.top_k=1" in str(err.value) and "moe.renormalize=false" in str(err.value)
    else:
        assert router_rel_grad(MoEConfig(**moe)) > REL_GRAD


def test_aux_loss_does_not_make_a_constant_gate_acceptable() -> None:
    """The aux loss and z-loss pull towards balance and small logits, never towards the better expert."""
    with pytest.raises(ConfigError, match="moe.top_k=1"):
        MoEConfig(top_k=1, renormalize=True, aux_loss_weight=0.01, z_loss_weight=1e-3)


def test_softmax_over_one_expert_is_refused_and_sigmoid_over_one_learns() -> None:
    with pytest.raises(ConfigError) as err:
        MoEConfig(num_experts=1, score_func="softmax")
    assert err.value.key == "moe.score_func" and "moe.num_experts=1" in str(err.value)
    assert router_rel_grad(MoEConfig(num_experts=1, expert_hidden_dim=12, score_func="sigmoid")) > REL_GRAD

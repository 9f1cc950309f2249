"""The MoE precision policy (moe/precision.py) under CPU bf16 autocast: dtype at every boundary, fp32 buffers."""

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamoe.moe.config import MoEConfig
from llamoe.moe.dispatch import LocalExchange
from llamoe.moe.layer import MoE
from llamoe.moe.router import Router

DIM = 16
BF16 = torch.bfloat16


def autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=BF16)


def make_moe(**kw: Any) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden_dim": 16, "bias_balancing": True, **kw})
    layer = MoE(DIM, cfg)
    layer.init_weights(0.3, 0.2)
    return layer


class RecordingExchange(LocalExchange):
    """The identity exchange, recording the dtype of what would cross the wire in each direction."""

    def __init__(self) -> None:
        self.sent: list[torch.dtype] = []  # dispatch payloads, forward
        self.returned: list[torch.dtype] = []  # combine payloads, forward
        self.grads: list[torch.dtype] = []  # what the backward exchanges carry

    def dispatch(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        self.sent.append(x.dtype)
        x.register_hook(lambda g: self.grads.append(g.dtype))
        return x, tokens_per_expert, None

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        self.returned.append(y.dtype)
        y.register_hook(lambda g: self.grads.append(g.dtype))
        return y


class GemmInputs(TorchDispatchMode):
    """Records the input dtypes of every matrix product (mm, addmm, bmm, _grouped_mm)."""

    OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten._grouped_mm.default"}

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name in self.OPS:
            a, b = (args[1], args[2]) if name == "aten.addmm.default" else (args[0], args[1])
            self.dtypes.append((name, a.dtype, b.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_under_autocast_is_exactly_the_fp32_router(score_func: str) -> None:
    router = Router(DIM, MoEConfig(num_experts=6, top_k=2, score_func=score_func, bias_balancing=True))
    router.init_weights(0.5)
    x = torch.randn(40, DIM)
    ref = router(x)
    with autocast():
        got = router(x)
    for name in ("weights", "aux_loss", "z_loss", "entropy"):
        assert getattr(got, name).dtype == torch.float32, name
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(got.expert_ids, ref.expert_ids)


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
@pytest.mark.parametrize("score_on", ["input", "output"])
def test_dtype_at_each_boundary_under_bf16_autocast(backend: str, score_on: str) -> None:
    layer = make_moe(backend=backend, score_on=score_on, capacity_factor=1.0)
    exchange = layer.exchange = RecordingExchange()
    seen: list[torch.dtype] = []
    layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 12, DIM, requires_grad=True)  # the fp32 residual stream
    with GemmInputs() as gemms:
        with autocast():
            out = layer(x)
        (out.out.square().sum() + out.aux_loss).backward()  # outside autocast, as torch advises and train.py does

    assert seen == [BF16]  # expert inputs
    assert exchange.sent == [BF16] and exchange.returned == [BF16] and exchange.grads == [BF16, BF16]
    assert all(a == b for _, a, b in gemms.dtypes)  # no mixed-dtype product
    grouped = [d for d in gemms.dtypes if d[0] == "aten._grouped_mm.default"]
    if backend == "grouped_mm":
        assert len(grouped) == 9 and all(d[1:] == (BF16, BF16) for d in grouped)  # 3 forward, 6 backward
    fp32_gemms = [d for d in gemms.dtypes if d[1] == torch.float32]
    # the router's forward (logits) and backward (input and weight gradients) products, and nothing else
    assert len(fp32_gemms) == 3
    assert out.out.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert layer.router.gate.weight.grad.dtype == torch.float32


def test_model_cast_keeps_router_buffers_fp32_and_exact() -> None:
    layer = make_moe()
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.5 + 3e-3)  # bf16 would round it to 0.50390625
        layer.router.expert_load.fill_(300.0)  # bf16 would round it to 300 but saturate 301 to 300
        layer.router.expert_load[0] = 301.0
    bias, load = layer.router.expert_bias.clone(), layer.router.expert_load.clone()
    layer.to(BF16)
    assert layer.router.gate.weight.dtype == BF16 and layer.experts.w1.dtype == BF16  # parameters are cast
    assert layer.router.expert_bias.dtype == torch.float32 and layer.router.expert_load.dtype == torch.float32
    assert torch.equal(layer.router.expert_bias, bias) and torch.equal(layer.router.expert_load, load)
    layer.train()
    layer(torch.randn(1, 8, DIM, dtype=BF16))
    assert layer.router.expert_load.sum() == load.sum() + 16  # 8 tokens x top-2 counted exactly


def test_meta_build_then_materialise_in_bf16_keeps_buffers_fp32() -> None:
    with torch.device("meta"):
        layer = MoE(DIM, MoEConfig(num_experts=4, top_k=1, expert_hidden_dim=16, bias_balancing=True))
    layer.to(BF16).to_empty(device="cpu")
    assert layer.router.expert_load.dtype == torch.float32 and layer.router.expert_load.device.type == "cpu"
    layer.init_weights(0.3, 0.2)
    state = layer.state_dict()
    assert state["router.expert_bias"].dtype == torch.float32 and state["experts.w2"].dtype == BF16

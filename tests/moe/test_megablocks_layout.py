"""The megablocks backend hands its kernels views of the expert weights, never a per-forward relayout.

w1 and w3 [E, D, F] are stored hidden-major ([E, F, D] memory order), so the [D, E·F] operand of
stk's sdd is a view: these tests check on CPU that the tensors `_dense_weights` returns share the
parameters' storage (no copy) and hold the values the old permute + reshape made, that every way a
model is built, cast, loaded, sliced and stepped keeps the layout, and that checkpoints and the Hugging
Face conversion are unchanged (a torch-backend checkpoint loads, and the round trip is exact). The
kernels themselves need CUDA and megablocks: tests/moe/test_experts_backends.py (gpu).
"""

import io
from dataclasses import replace

import pytest
import torch

from llamoe.models import presets
from llamoe.models.build import build_model
from llamoe.models.hf import state_dict_from_hf, state_dict_to_hf
from llamoe.moe.experts.megablocks_dmoe import MegaBlocksExperts
from llamoe.moe.experts.torch_loop import TorchExperts

E, D, F = 4, 16, 8


def _hidden_major(w: torch.Tensor) -> bool:
    return w.transpose(1, 2).is_contiguous()


def _old_relayout(w: torch.Tensor) -> torch.Tensor:
    """What the backend did on every forward before: [E, D, F] -> [D, E·F] by a copy."""
    e, d, f = w.shape
    return w.permute(1, 0, 2).reshape(d, e * f)


def _experts(dtype: torch.dtype = torch.float32) -> MegaBlocksExperts:
    experts = MegaBlocksExperts(E, D, F).to(dtype)
    experts.init_weights(0.2, 0.2)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_operands_are_views_of_the_parameters(dtype: torch.dtype) -> None:
    experts = _experts(dtype)
    w1, w3, w2 = experts._dense_weights(dtype)
    for got, param in ((w1, experts.w1), (w3, experts.w3), (w2, experts.w2)):
        assert got.data_ptr() == param.data_ptr() and got.untyped_storage().size() == param.untyped_storage().size()
    assert w1.shape == (D, E * F) and w1.stride() == (1, D)  # the transposed [E·F, D] stk's sdd takes
    assert torch.equal(w1, _old_relayout(experts.w1)) and torch.equal(w3, _old_relayout(experts.w3))
    assert torch.equal(w2, experts.w2.reshape(E * F, D))


def test_a_cast_gives_the_kernel_layout_and_a_flattened_parameter_the_right_operand() -> None:
    experts = _experts()
    w1, _, _ = experts._dense_weights(torch.bfloat16)  # autocast: fp32 weights, bf16 compute
    assert w1.dtype == torch.bfloat16 and w1.stride() == (1, D)
    assert torch.equal(w1, _old_relayout(experts.w1).bfloat16())
    with torch.no_grad():  # what DeepSpeed ZeRO-1/2 does: the parameter's data becomes a contiguous buffer
        experts.w1.data = experts.w1.detach().contiguous()
    assert torch.equal(experts._dense_weights(torch.float32)[0], _old_relayout(experts.w1))


def test_gradients_flow_through_the_views() -> None:
    experts = _experts()
    w1, w3, w2 = experts._dense_weights(torch.float32)
    r = torch.randn(D, E * F)
    ((w1 * r).sum() + (w3 * 2 * r).sum() + w2.sum()).backward()
    assert torch.equal(_old_relayout(experts.w1.grad), r) and torch.equal(_old_relayout(experts.w3.grad), 2 * r)
    assert experts.w1.grad.stride() == experts.w1.stride()  # gradients (so AdamW moments) share the layout


def test_meta_build_cast_to_empty_slice_and_optimizer_keep_the_layout() -> None:
    with torch.device("meta"):
        experts = MegaBlocksExperts(E, D, F)
    experts.to(torch.bfloat16).to_empty(device="cpu")  # the build path's order (models/build.py)
    assert _hidden_major(experts.w1) and _hidden_major(experts.w3) and experts.w1.dtype == torch.bfloat16
    experts = _experts()
    part = experts.local_slice(1, 2)
    assert _hidden_major(part.w1) and torch.equal(part.w1, experts.w1[1:3])
    optimizer = torch.optim.AdamW(experts.parameters(), lr=0.1)
    (experts.w1 * torch.randn(E, D, F)).sum().backward()
    optimizer.step()
    assert _hidden_major(experts.w1) and _hidden_major(optimizer.state[experts.w1]["exp_avg"])


@pytest.fixture
def megablocks_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build megablocks models without CUDA (their layout, not their kernels, is under test)."""
    monkeypatch.setattr(MegaBlocksExperts, "check_available", classmethod(lambda cls, hidden_dim: None))


@pytest.mark.usefixtures("megablocks_anywhere")
def test_checkpoints_and_hf_conversion_are_unchanged() -> None:
    tiny = presets.get("llama4-tiny")  # Hugging Face's Llama 4 has no selection bias: aux-loss balancing
    torch_cfg = replace(tiny, moe=replace(tiny.moe, bias_balancing=False, aux_loss_weight=0.01))
    mb_cfg = replace(torch_cfg, moe=replace(torch_cfg.moe, backend="megablocks"))
    reference = build_model(torch_cfg, seed=3)
    old_checkpoint = reference.state_dict()  # a torch-backend checkpoint, contiguous [E, D, F]
    model = build_model(mb_cfg, state_dict=old_checkpoint)
    experts = [m for m in model.modules() if isinstance(m, MegaBlocksExperts)]
    assert experts and all(_hidden_major(m.w1) and _hidden_major(m.w3) for m in experts)
    ours = model.state_dict()
    assert ours.keys() == old_checkpoint.keys()
    assert all(torch.equal(ours[k], v) for k, v in old_checkpoint.items())

    buffer = io.BytesIO()  # saved from the megablocks model, loaded by the reference backend
    torch.save(ours, buffer)
    buffer.seek(0)
    back = build_model(torch_cfg, state_dict=torch.load(buffer))
    assert all(m.w1.is_contiguous() for m in back.modules() if isinstance(m, TorchExperts))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in old_checkpoint.items())

    hf = state_dict_to_hf(ours, mb_cfg)
    hf_reference = state_dict_to_hf(old_checkpoint, torch_cfg)
    assert hf.keys() == hf_reference.keys() and all(torch.equal(hf[k], v) for k, v in hf_reference.items())
    again = build_model(mb_cfg, state_dict=state_dict_from_hf(hf, mb_cfg))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in old_checkpoint.items())

"""Expert backends against the "torch" reference, and the registry's fail-fast errors."""

import pytest
import torch

from llamoe.moe.config import ConfigError, MoEConfig
from llamoe.moe.experts import BACKENDS, build_experts
from llamoe.moe.experts.grouped_mm import GroupedMMExperts
from llamoe.moe.experts.torch_loop import TorchExperts
from llamoe.moe.layer import MoE


def paired(backend: str, num_experts: int = 5, dim: int = 16, hidden: int = 24, device: str = "cpu"):
    ref = TorchExperts(num_experts, dim, hidden)
    ref.init_weights(0.2, 0.2)
    other = BACKENDS[backend](num_experts, dim, hidden)
    other.load_state_dict(ref.state_dict())
    return ref.to(device), other.to(device)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, atol: float, rel: float, what: str) -> None:
    """max |actual - expected| <= atol + rel * max |expected| (rel covers bf16 rounding)."""
    err = (actual.float() - expected).abs().max().item()
    bound = atol + rel * expected.abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def compare(ref, other, x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype, atol: float, rel: float = 0.0):
    x_ref = x.clone().requires_grad_(True)
    x_other = x.to(dtype).clone().requires_grad_(True)
    g = torch.randn_like(x)
    out_ref = ref(x_ref, counts)
    out = other.to(dtype)(x_other, counts)
    assert_near(out, out_ref, atol, rel, "output")
    (out_ref * g).sum().backward()
    (out.float() * g).sum().backward()
    assert_near(x_other.grad, x_ref.grad, atol, rel, "input grad")
    for name in ("w1", "w3", "w2"):
        assert_near(getattr(other, name).grad, getattr(ref, name).grad, atol, rel, name)


def test_grouped_mm_matches_torch_on_cpu_fp32_with_empty_experts() -> None:
    ref, other = paired("grouped_mm")
    counts = torch.tensor([4, 0, 7, 0, 3])
    compare(ref, other, torch.randn(14, 16), counts, torch.float32, atol=1e-5)


def test_grouped_mm_matches_torch_on_cpu_bf16() -> None:
    ref, other = paired("grouped_mm", num_experts=4, dim=64, hidden=128)  # bf16 rows: multiples of 8
    counts = torch.tensor([50, 0, 3, 77])
    compare(ref, other, torch.randn(130, 64), counts, torch.bfloat16, atol=0.0, rel=0.02)


def test_grouped_mm_in_moe_layer_matches_torch_backend() -> None:
    def cfg(backend: str) -> MoEConfig:
        return MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=8, backend=backend)

    ref, fast = MoE(16, cfg("torch")), MoE(16, cfg("grouped_mm"))
    ref.init_weights(0.2, 0.1)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(fast(x).out, ref(x).out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("score_on", ["input", "output"])
def test_grouped_mm_under_capacity_matches_torch_backend_forward_and_backward(score_on: str) -> None:
    """Dropped slots sit past the grouped GEMMs' last group, whose rows _grouped_mm leaves unwritten:
    the layer must zero them in the output and in the gradients (a NaN there would poison both)."""

    def cfg(backend: str) -> MoEConfig:
        return MoEConfig(
            num_experts=4, top_k=2, expert_hidden_dim=8, backend=backend, capacity_factor=0.5, score_on=score_on
        )

    ref, fast = MoE(16, cfg("torch")), MoE(16, cfg("grouped_mm"))
    ref.init_weights(0.2, 0.1)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 16)
    x_ref, x_fast = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out_fast = ref(x_ref), fast(x_fast)
    assert out_fast.stats["dropped_frac"] > 0.4
    torch.testing.assert_close(out_fast.out, out_ref.out, rtol=0, atol=1e-5)
    out_ref.out.square().sum().backward()
    out_fast.out.square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=0, atol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)


def test_local_slice_keeps_backend_and_weights() -> None:
    ref, other = paired("grouped_mm", num_experts=6)
    part = other.local_slice(2, 3)
    assert isinstance(part, GroupedMMExperts) and part.num_experts == 3
    assert torch.equal(part.w2, ref.w2[2:5])


def test_unknown_backend_names_the_key() -> None:
    with pytest.raises(ConfigError, match="^moe.backend"):
        build_experts("triton", 4, 8, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a GPU")
def test_megablocks_without_cuda_fails_fast() -> None:
    with pytest.raises(ConfigError, match="^moe.backend.*moe.backend=torch"):
        build_experts("megablocks", 4, 8, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "megablocks"])
def test_cuda_backend_matches_torch_in_bf16(backend: str) -> None:
    if backend == "megablocks":
        BACKENDS[backend].check_available(256)
    ref, other = paired(backend, num_experts=8, dim=128, hidden=256, device="cuda")
    counts = torch.tensor([300, 0, 17, 129, 0, 64, 1, 200], device="cuda")
    x = torch.randn(int(counts.sum()), 128, device="cuda")
    compare(ref, other, x, counts, torch.bfloat16, atol=0.0, rel=0.02)


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_a_rank_with_no_tokens_stays_in_the_autograd_graph(backend: str) -> None:
    """Under EP a rank may receive no tokens; its expert output must still depend on its input, or the
    backward all-to-all never runs on that rank and the others wait for it forever."""
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing from this torch build")
    experts = BACKENDS[backend](4, 16, 24)
    experts.init_weights(0.2, 0.2)
    x = torch.zeros(0, 16, requires_grad=True)
    out = experts(x, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 16) and out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)

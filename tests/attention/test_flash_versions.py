"""flash-attn version selection (attention/flash.py) and each installed version against SDPA.

On CPU the selection and the wrapper are tested with fake modules in sys.modules: they check
which version is picked, the error when none fits, the layout handed to flash_attn_func and how
each return convention is unwrapped, never numerics. The `gpu` tests run every installed version
against SDPA in bf16, forward and backward, each skipping with its reason where it cannot run.
"""

import sys
from dataclasses import replace
from types import ModuleType
from typing import Any, Callable, Optional

import pytest
import torch

from llamoe.attention import flash
from llamoe.attention.backends import FlashBackend, get_backend
from llamoe.config_error import ConfigError
from llamoe.models import AttentionConfig, presets
from llamoe.models.build import build_model


def _fake_flash_attn_func(name: str, calls: list[str], returns_lse: bool) -> Callable[..., Any]:
    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> Any:
        assert causal and q.dim() == 4 and q.dtype == torch.bfloat16  # [B, L, heads, Dh] in bf16
        calls.append(name)
        out = q * 2  # a marker, not attention: the test follows the tensor through the wrapper
        return (out, torch.zeros(q.shape[:3])) if returns_lse else out

    return flash_attn_func


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """Install fake flash-attn versions by name ("FA4", "FA3", "FA2"); the others import as missing.
    Returns the list the fakes append their name to when called."""
    calls: list[str] = []

    def install(*names: str, returns_lse: Optional[set[str]] = None) -> list[str]:
        for version in flash.VERSIONS:
            module: Optional[ModuleType] = None
            if version.name in names:
                module = ModuleType(version.module)
                with_lse = version.name in (returns_lse if returns_lse is not None else {"FA4"})
                module.flash_attn_func = _fake_flash_attn_func(version.name, calls, with_lse)  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, version.module, module)  # None: import raises ImportError
        return calls

    return install


@pytest.mark.parametrize(
    "installed, capability, chosen",
    [
        (("FA4", "FA3", "FA2"), (10, 0), "FA4"),  # Blackwell: FA4
        (("FA4", "FA3", "FA2"), (9, 0), "FA4"),  # Hopper: the newest that runs there
        (("FA3", "FA2"), (9, 0), "FA3"),
        (("FA3", "FA2"), (10, 0), "FA2"),  # FA3 is Hopper-only
        (("FA4", "FA3", "FA2"), (8, 0), "FA2"),  # Ampere: FA2 only
        (("FA2",), (12, 0), "FA2"),
    ],
)
def test_select_takes_the_newest_installed_version_the_gpu_supports(
    fake_flash: Callable[..., list[str]], installed: tuple[str, ...], capability: tuple[int, int], chosen: str
) -> None:
    fake_flash(*installed)
    assert [v.name for v, _ in flash.installed()] == [v.name for v in flash.VERSIONS if v.name in installed]
    version, _ = flash.select(capability)
    assert version.name == chosen


def test_select_names_the_key_what_is_installed_and_what_each_version_needs(
    fake_flash: Callable[..., list[str]],
) -> None:
    fake_flash("FA3")
    with pytest.raises(ConfigError) as err:
        flash.select((8, 6))
    message = str(err.value)
    assert message.startswith("attention.backend: 'flash' found FA3 (flash_attn_interface) installed")
    assert "(sm86)" in message and "FA4 needs sm90 or sm100; FA3 needs sm90; FA2 needs sm80 or newer" in message
    assert "attention.backend=sdpa" in message
    fake_flash()
    with pytest.raises(ConfigError, match="found no flash-attn version installed"):
        flash.select((9, 0))


@pytest.mark.parametrize("version", ["FA4", "FA3", "FA2"])
@pytest.mark.parametrize("returns_lse", [False, True])
def test_wrapper_hands_flash_its_layout_and_unwraps_either_return(
    fake_flash: Callable[..., list[str]], version: str, returns_lse: bool
) -> None:
    calls = fake_flash(version, returns_lse={version} if returns_lse else set())
    (_, fn), *_ = flash.installed()
    q = torch.randn(2, 4, 6, 8)  # [B, H, Lq, Dh] fp32: computed in bf16, returned in fp32
    k = v = torch.randn(2, 2, 9, 8)
    out = flash.flash_causal(fn, q, k, v)
    assert calls == [version] and out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, (q.bfloat16() * 2).float())


def test_backend_picks_per_compute_capability_and_fails_off_cuda(
    fake_flash: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_flash("FA3", "FA2")
    capability = {"cuda:0": (9, 0), "cuda:1": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[str(device)])
    backend = FlashBackend()
    assert backend.version(torch.device("cuda:0")).name == "FA3"
    assert backend.version(torch.device("cuda:1")).name == "FA2"
    with pytest.raises(ConfigError, match=r"runs on CUDA only and the model is on cpu \(.*installed: FA3, FA2\)"):
        backend.check(torch.device("cpu"))


def test_building_a_flash_model_off_cuda_is_a_config_error_naming_the_key(
    fake_flash: Callable[..., list[str]],
) -> None:
    fake_flash("FA2")
    cfg = replace(presets.get("llama3.1-tiny"), attention=AttentionConfig(backend="flash"))
    with pytest.raises(ConfigError, match=r"^attention\.backend: 'flash' runs on CUDA only.*installed: FA2"):
        build_model(cfg, device="cpu")


# ---------------------------------------------------------------------- on a GPU
_CASES = [(200, 200), (72, 300), (1, 41)]  # square causal, prefill behind a cache, decode step


def _usable(version: flash.FlashVersion) -> Callable[..., Any]:
    """The version's flash_attn_func, or a skip saying why it cannot run here."""
    fn = flash._load(version)
    if fn is None:
        pytest.skip(f"{version.name} is not installed ({version.module} does not import)")
    capability = torch.cuda.get_device_capability()
    if not version.supports(capability):
        pytest.skip(f"{version.name} needs {version.needs()}; this GPU is sm{capability[0]}{capability[1]}")
    return fn


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return get_backend("sdpa", "cuda").causal(q, k, v)


def _outputs_and_grads(attend: Callable[..., torch.Tensor], dtype: torch.dtype, lq: int, lk: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    q = torch.randn(2, 8, lq, 128, device="cuda")
    k, v = torch.randn(2, 2, lk, 128, device="cuda"), torch.randn(2, 2, lk, 128, device="cuda")  # GQA 4:1
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    (out.float() * torch.linspace(-1, 1, out.size(-1), device="cuda")).sum().backward()
    return [out.detach().float(), *(t.grad.float() for t in (q, k, v))]  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _CASES)
@pytest.mark.parametrize("version", flash.VERSIONS, ids=lambda v: v.name)
def test_each_installed_flash_version_matches_sdpa_forward_and_backward_in_bf16(
    version: flash.FlashVersion, case: tuple[int, int]
) -> None:
    """Output and q/k/v gradients: the bf16 flash error against the fp32 SDPA reference is at most
    twice SDPA's own bf16 error plus 1e-3 (the rule of tests/attention/test_backends.py)."""
    fn = _usable(version)
    reference = _outputs_and_grads(_sdpa_causal, torch.float32, *case)
    sdpa_bf16 = _outputs_and_grads(_sdpa_causal, torch.bfloat16, *case)
    got = _outputs_and_grads(lambda q, k, v: flash.flash_causal(fn, q, k, v), torch.bfloat16, *case)
    for name, want, low, ours in zip(("out", "dq", "dk", "dv"), reference, sdpa_bf16, got):
        bound = 2 * (low - want).abs().max() + 1e-3
        assert (ours - want).abs().max() <= bound, name


@pytest.mark.gpu
def test_flash_backend_uses_the_newest_version_for_this_gpu() -> None:
    usable = [v for v, _ in flash.installed() if v.supports(torch.cuda.get_device_capability())]
    if not usable:
        pytest.skip("no installed flash-attn version runs on this GPU")
    assert FlashBackend().version(torch.device("cuda")) == usable[0]

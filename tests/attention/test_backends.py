"""Every attention backend against the SDPA reference, wherever it can run.

Tolerances: fp32 max abs diff 2e-5 (same math, different summation order). bf16 (and flash, which
computes fp32 inputs in bf16): the backend's max abs error against the fp32 reference is at most
twice SDPA's own bf16 error plus 1e-3, so a backend may round like SDPA but not worse.
"""

import copy

import pytest
import torch

from llamoe.attention.backends import FlexBackend, backend_names, flex_block_mask, get_backend
from llamoe.config_error import ConfigError

# (queries, keys, first query position, first key position, chunk or None for global causal)
_CASES = [
    (200, 200, 0, 0, None),  # training: square causal
    (200, 200, 0, 0, 64),  # training: chunked, L not a multiple of C
    (72, 300, 228, 0, None),  # prefill block behind a full cache
    (72, 222, 228, 78, 64),  # prefill block behind a ring cache, unaligned start
    (1, 41, 40, 0, None),  # decode step, global
    (1, 9, 72, 64, 32),  # decode step, chunked
    (300, 300, 128, 128, 128),  # chunk = flex block size
    (600, 640, 552, 512, 512),  # ring cache, unaligned start: partial and fully visible blocks
]


def _inputs(lq: int, lk: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 4, lq, 32, device=device, dtype=dtype)
    k = torch.randn(2, 2, lk, 32, device=device, dtype=dtype)  # GQA: 2 query heads per kv head
    v = torch.randn(2, 2, lk, 32, device=device, dtype=dtype)
    return q, k, v


def _run(backend, q, k, v, q_start: int, k_start: int, chunk) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if chunk is None:
        return backend.causal(q, k, v)
    return backend.chunked(q, k, v, q_start=q_start, k_start=k_start, chunk_size=chunk)


def _assert_matches_reference(name: str, device: str, dtype: torch.dtype, case: tuple) -> None:  # type: ignore[type-arg]
    lq, lk, q_start, k_start, chunk = case
    q, k, v = _inputs(lq, lk, torch.float32, device)
    sdpa, backend = get_backend("sdpa", device), get_backend(name, device)
    reference = _run(sdpa, q, k, v, q_start, k_start, chunk)
    got = _run(backend, *(t.to(dtype) for t in (q, k, v)), q_start, k_start, chunk)
    assert got.dtype == dtype
    if dtype == torch.float32 and name != "flash":
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=0)
        return
    rounding = dtype if dtype != torch.float32 else torch.bfloat16  # flash computes fp32 inputs in bf16
    sdpa_low = _run(sdpa, *(t.to(rounding) for t in (q, k, v)), q_start, k_start, chunk)
    sdpa_err = (sdpa_low.float() - reference).abs().max()
    assert (got.float() - reference).abs().max() <= 2 * sdpa_err + 1e-3


@pytest.mark.parametrize("case", _CASES)
def test_flex_block_mask_equals_dense_create_block_mask(case: tuple) -> None:  # type: ignore[type-arg]
    from torch.nn.attention.flex_attention import create_block_mask

    lq, lk, q_start, k_start, chunk = case
    ours = flex_block_mask(lq, lk, q_start, k_start, chunk, torch.device("cpu"))
    dense = create_block_mask(ours.mask_mod, 1, 1, lq, lk, device="cpu")  # evaluates every (q, k) pair
    assert torch.equal(ours.to_dense(), dense.to_dense())
    for num, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, num), getattr(dense, num))
        for row, n in enumerate(getattr(ours, num)[0, 0].tolist()):
            assert getattr(ours, index)[0, 0, row, :n].tolist() == getattr(dense, index)[0, 0, row, :n].tolist()


def test_flex_block_mask_skips_blocks_outside_the_chunk() -> None:
    # 1024 positions in chunks of 128 (= the block size): each query block sees only its diagonal block
    # (causally masked), so the work is 8 blocks, against 8 diagonal + 28 full blocks for global causal.
    mask = flex_block_mask(1024, 1024, 0, 0, 128, torch.device("cpu"))
    assert mask.kv_num_blocks.tolist() == [[[1] * 8]] and mask.full_kv_num_blocks.sum() == 0
    causal = flex_block_mask(1024, 1024, 0, 0, None, torch.device("cpu"))
    assert causal.kv_num_blocks.tolist() == [[[1] * 8]] and causal.full_kv_num_blocks.sum() == 28


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", _CASES)
def test_flex_masks_match_sdpa_uncompiled(case: tuple) -> None:  # type: ignore[type-arg]
    """flex's eager reference runs the same mask_mod on CPU in a second; the fused kernel is tested below."""
    lq, lk, q_start, k_start, chunk = case
    q, k, v = _inputs(lq, lk)
    want = _run(get_backend("sdpa"), q, k, v, q_start, k_start, chunk)
    got = _run(FlexBackend(compile=False), q, k, v, q_start, k_start, chunk)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_flex_compiled_on_cpu_matches_sdpa() -> None:
    """torch.compile'd flex on CPU (~30-80 s on a cold inductor cache), on the case with every kind of block."""
    case = _CASES[-1]
    mask = flex_block_mask(*case, torch.device("cpu"))
    assert mask.kv_num_blocks.sum() > 0 and mask.full_kv_num_blocks.sum() > 0
    _assert_matches_reference("flex", "cpu", torch.float32, case)


def test_flash_fails_fast_naming_the_setting_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"attention\.backend: 'flash' runs on CUDA only.*attention\.backend=sdpa"):
        get_backend("flash", "cpu")


def test_unknown_backend_lists_the_valid_ones() -> None:
    assert backend_names() == ["flash", "flex", "sdpa"]
    with pytest.raises(ValueError, match="attention.backend='xformers'.*sdpa"):
        get_backend("xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _CASES)
def test_flex_on_cuda_matches_sdpa(case: tuple, dtype: torch.dtype) -> None:  # type: ignore[type-arg]
    _assert_matches_reference("flex", "cuda", dtype, case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _CASES)
def test_flash_on_cuda_matches_sdpa(case: tuple, dtype: torch.dtype) -> None:  # type: ignore[type-arg]
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    _assert_matches_reference("flash", "cuda", dtype, case)


@pytest.mark.gpu
def test_flex_gradients_on_cuda_match_sdpa() -> None:
    lq, lk, q_start, k_start, chunk = _CASES[1]
    grads = []
    for name in ("sdpa", "flex"):
        torch.manual_seed(0)
        q, k, v = (t.requires_grad_() for t in _inputs(lq, lk, device="cuda"))
        out = _run(get_backend(name, "cuda"), q, k, v, q_start, k_start, chunk)
        (out * torch.linspace(-1, 1, out.size(-1), device="cuda")).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flex", "flash"])
def test_model_on_cuda_gives_sdpa_logits_with_every_backend(name: str) -> None:
    """A dense iRoPE model (chunk 64, NoPE every 2nd layer, temperature on): full forward and
    prefill + decode through the cache with `name` against the SDPA model. fp32 for flex; flash
    runs in bf16, so its bound is set by the SDPA model run in bf16 (as above)."""
    if name == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from llamoe.models import AttentionConfig, ModelConfig, Transformer

    cfg = ModelConfig(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        ffn_hidden_dim=256,
        attention=AttentionConfig(
            nope_layer_interval=2, chunk_size=64, qk_norm=True, temperature_tuning=True, floor_scale=64.0
        ),
    )
    model = Transformer(cfg).cuda().eval()
    tokens = torch.randint(0, 97, (2, 300), device="cuda")

    def logits(backend: str, dtype: torch.dtype) -> torch.Tensor:
        m = copy.deepcopy(model).to(dtype)  # a copy: casting in place would round the fp32 weights
        m.set_attention(backend=backend)
        with torch.no_grad():
            full = m(tokens).logits.float()
            cache = m.make_cache(2, 300)
            blocks = [m(tokens[:, :250], cache=cache).logits]
            blocks += [m(tokens[:, i : i + 1], start_pos=i, cache=cache).logits for i in range(250, 300)]
        return torch.stack((full, torch.cat(blocks, 1).float()))

    reference = logits("sdpa", torch.float32)
    if name == "flex":
        torch.testing.assert_close(logits("flex", torch.float32), reference, atol=1e-4, rtol=0)
    else:
        sdpa_err = (logits("sdpa", torch.bfloat16) - reference).abs().max()
        assert (logits("flash", torch.float32) - reference).abs().max() <= 2 * sdpa_err + 1e-3

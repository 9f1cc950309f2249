"""SDPA prefill behind a cache: is_causal or a lower-right causal bias instead of a boolean mask.

The new path must equal the explicit boolean-mask computation it replaced (fp32, GQA) and must
actually hand SDPA the bias object: a recorder wraps `F.scaled_dot_product_attention` in
attention/backends.py, records the `attn_mask` and `is_causal` of each call and still computes
with the real function.
"""

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from llamoe.attention import backends
from llamoe.attention.chunked import chunked_causal_mask


def _qkv(lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(2, 8, lq, 16, generator=g)
    k = torch.randn(2, 2, lk, 16, generator=g)  # GQA: 4 query heads per kv head
    v = torch.randn(2, 2, lk, 16, generator=g)
    return q, k, v


def _boolean_mask_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The old path: one bottom-right aligned boolean mask [Lq, Lk] (query i sees keys j <= i + Lk - Lq)."""
    lq, lk = q.size(2), k.size(2)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every SDPA call attention/backends.py makes; the real SDPA still computes the result."""
    calls: list[dict[str, Any]] = []

    def recording_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append({"lq": args[0].size(2), "lk": args[1].size(2), **kwargs})
        return F.scaled_dot_product_attention(*args, **kwargs)

    class RecordingFunctional:  # torch.nn.functional, but for SDPA
        scaled_dot_product_attention = staticmethod(recording_sdpa)

        def __getattr__(self, name: str) -> Callable[..., Any]:
            return getattr(F, name)

    monkeypatch.setattr(backends, "F", RecordingFunctional())
    return calls


@pytest.mark.parametrize("lq, lk", [(64, 64), (24, 100), (2, 37)])
def test_sdpa_prefill_equals_the_boolean_mask_path(lq: int, lk: int, sdpa_calls: list[dict[str, Any]]) -> None:
    q, k, v = _qkv(lq, lk)
    got = backends.sdpa_attention(q, k, v)
    torch.testing.assert_close(got, _boolean_mask_reference(q, k, v), atol=1e-6, rtol=0)
    (call,) = sdpa_calls
    assert call["enable_gqa"] is True
    if lq == lk:
        assert call["is_causal"] is True and call.get("attn_mask") is None
    else:
        assert isinstance(call["attn_mask"], CausalBias) and not call.get("is_causal", False)
        assert (call["attn_mask"].seq_len_q, call["attn_mask"].seq_len_kv) == (lq, lk)


def test_sdpa_prefill_slices_stay_lower_right_within_the_mask_budget(sdpa_calls: list[dict[str, Any]]) -> None:
    """On CPU SDPA materialises the bias, so the queries go in slices of <= budget mask elements."""
    q, k, v = _qkv(24, 100)
    got = backends.sdpa_attention(q, k, v, max_mask_elements=5 * 100)  # 5 query rows at a time
    torch.testing.assert_close(got, _boolean_mask_reference(q, k, v), atol=1e-6, rtol=0)
    assert [(c["lq"], c["lk"]) for c in sdpa_calls] == [(5, 81), (5, 86), (5, 91), (5, 96), (4, 100)]
    assert all(isinstance(c["attn_mask"], CausalBias) for c in sdpa_calls)
    assert all(c["lq"] * c["lk"] <= 500 for c in sdpa_calls)


def test_chunked_prefill_behind_a_ring_cache_uses_the_bias(sdpa_calls: list[dict[str, Any]]) -> None:
    """A chunked layer's first (partial) chunk behind its cache is a lower-right causal problem too."""
    q, k, v = _qkv(40, 50)  # queries at 74..113, keys at 64..113, chunks of 32: the first chunk is 74..95
    got = backends.get_backend("sdpa").chunked(q, k, v, q_start=74, k_start=64, chunk_size=32)
    mask = chunked_causal_mask(torch.arange(74, 114), torch.arange(64, 114), 32)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert isinstance(sdpa_calls[0]["attn_mask"], CausalBias)

import itertools

import pytest
import torch
import torch.nn.functional as F

from llamoe.attention.backends import sdpa_attention
from llamoe.attention.chunked import chunk_start, chunked_attention, chunked_causal_mask


def _masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with an explicit [Lq, Lk] boolean mask (GQA by repeating kv heads)."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_brute_force_mask_is_the_reference_definition() -> None:
    c = 5
    pos = torch.arange(23)
    mask = chunked_causal_mask(pos + 3, pos, c)
    for i in range(23):
        for j in range(23):
            assert bool(mask[i, j]) == (j <= i + 3 and j // c == (i + 3) // c)
    assert torch.equal(chunked_causal_mask(pos, pos, None), torch.ones(23, 23, dtype=torch.bool).tril())


# (chunk, first query position, queries, how far back the keys start: "chunk" = at the query's chunk
# start as the ring cache returns them, "zero" = position 0 as a full cache would, "none" = no cache)
_CASES = [
    (c, q_start, lq, keys)
    for c, q_start, lq, keys in itertools.product(
        (1, 3, 8, 16, 64), (0, 5, 16, 37), (1, 7, 16, 45), ("chunk", "zero", "none")
    )
    if not (keys != "none" and q_start == 0)
]


@pytest.mark.parametrize("chunk,q_start,lq,keys", _CASES)
def test_chunked_attention_matches_brute_force_mask(chunk: int, q_start: int, lq: int, keys: str) -> None:
    k_start = {"chunk": chunk_start(q_start, chunk), "zero": 0, "none": q_start}[keys]
    lk = q_start + lq - k_start
    q = torch.randn(2, 4, lq, 8)
    k, v = torch.randn(2, 2, lk, 8), torch.randn(2, 2, lk, 8)  # GQA: 2 query heads per kv head
    got = chunked_attention(q, k, v, q_start=q_start, k_start=k_start, chunk_size=chunk, attend=sdpa_attention)
    mask = chunked_causal_mask(torch.arange(q_start, q_start + lq), torch.arange(k_start, k_start + lk), chunk)
    torch.testing.assert_close(got, _masked_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_chunked_attention_rejects_keys_that_do_not_end_with_the_queries() -> None:
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="keys must cover"):
        chunked_attention(q, k, k, q_start=10, k_start=0, chunk_size=8, attend=sdpa_attention)


@pytest.mark.parametrize("lq,lk,budget", [(5, 5, 1), (1, 40, 1), (12, 40, 1), (12, 40, 90), (33, 100, 10**6)])
def test_sdpa_is_bottom_right_causal_for_any_mask_budget(lq: int, lk: int, budget: int) -> None:
    """Query slicing (a small budget forces many slices) never changes the result."""
    q, k, v = torch.randn(1, 4, lq, 16), torch.randn(1, 1, lk, 16), torch.randn(1, 1, lk, 16)
    got = sdpa_attention(q, k, v, max_mask_elements=budget)
    mask = chunked_causal_mask(torch.arange(lk - lq, lk), torch.arange(lk), None)
    torch.testing.assert_close(got, _masked_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_earlier_chunks_never_reach_later_queries() -> None:
    """Each query only reaches keys of its own chunk: perturbing an earlier chunk changes nothing later."""
    c, length = 16, 80
    q, k, v = torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
    base = chunked_attention(q, k, v, q_start=0, k_start=0, chunk_size=c, attend=sdpa_attention)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :48] += 5.0
    v2[:, :, :48] -= 3.0
    moved = chunked_attention(q, k2, v2, q_start=0, k_start=0, chunk_size=c, attend=sdpa_attention)
    assert torch.equal(moved[:, :, 48:], base[:, :, 48:])
    assert not torch.allclose(moved[:, :, :48], base[:, :, :48])


def test_square_sdpa_path_equals_reference() -> None:
    q, k, v = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(sdpa_attention(q, k, v), want, atol=1e-6, rtol=0)

import pytest
import torch

from llamoe.attention.cache import LayerKVCache
from llamoe.models import AttentionConfig, ModelConfig, Transformer

CHUNK, FLOOR = 8, 8.0


def _irope_model(**attention: object) -> Transformer:
    """Dense 4-layer iRoPE model: layers 1 and 3 NoPE/global, 0 and 2 RoPE/chunked (C=8), GQA 4:1."""
    settings = dict(
        nope_layer_interval=2,
        chunk_size=CHUNK,
        qk_norm=True,
        temperature_tuning=True,
        floor_scale=FLOOR,
        attn_scale=0.5,
    )
    settings.update(attention)
    cfg = ModelConfig(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=97,
        ffn_hidden_dim=96,
        max_seq_len=4096,
        attention=AttentionConfig(**settings),  # type: ignore[arg-type]
    )
    return Transformer(cfg).eval()


def test_token_by_token_decode_equals_full_forward_across_chunks_and_temperature_steps() -> None:
    """43 positions: 5 chunk boundaries (8, 16, ..., 40) and temperature steps at p = 7, 15, 23, 31, 39."""
    model = _irope_model()
    tokens = torch.randint(0, 97, (2, 43))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.make_cache(2, 43)
        steps = [model(tokens[:, i : i + 1], start_pos=i, cache=cache).logits for i in range(43)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill_block", [101, 37, 8])
def test_long_prefill_then_decode_equals_full_forward(prefill_block: int) -> None:
    """A 101-token prompt (13 chunks) prefilled in blocks, then 12 decode steps."""
    model = _irope_model()
    tokens = torch.randint(0, 97, (1, 113))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.make_cache(1, 113)
        pieces = [
            model(tokens[:, s : min(s + prefill_block, 101)], start_pos=s, cache=cache).logits
            for s in range(0, 101, prefill_block)
        ]
        pieces += [model(tokens[:, i : i + 1], start_pos=i, cache=cache).logits for i in range(101, 113)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_chunked_layer_never_holds_or_attends_more_than_a_chunk() -> None:
    cache = LayerKVCache(1, 2, 4, max_seq_len=1000, chunk_size=CHUNK, dtype=torch.float32)
    assert cache.k.shape == (1, 2, CHUNK, 4) and cache.v.shape == (1, 2, CHUNK, 4)
    for pos in range(50):
        k = torch.full((1, 2, 1, 4), float(pos))
        keys, values, first = cache.update(k, -k, pos)
        assert first == pos - pos % CHUNK and keys.size(2) == pos % CHUNK + 1 <= CHUNK
        # the keys handed to attention are exactly the current chunk's, in position order
        assert keys[0, 0, :, 0].tolist() == [float(p) for p in range(first, pos + 1)]
        assert torch.equal(values, -keys)
    assert cache.k.shape[2] == CHUNK


def test_cache_bytes_are_exact() -> None:
    model = _irope_model()
    kv_heads, head_dim = model.cfg.kv_heads, model.cfg.head_size
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = model.make_cache(3, 1000, dtype=dtype)
        per_position = 2 * 3 * kv_heads * head_dim * size  # k and v, batch 3
        assert cache.nbytes() == per_position * (2 * CHUNK + 2 * 1000)
        assert cache.nbytes() == sum(t.numel() * t.element_size() for c in cache.layers for t in (c.k, c.v))
    short = model.make_cache(1, 5)  # a chunked layer never allocates more than max_seq_len
    assert [c.k.size(2) for c in short.layers] == [5, 5, 5, 5]


def test_cache_bytes_at_one_million_positions_without_allocating() -> None:
    with torch.device("meta"):
        model = _irope_model()
        everything_global = _irope_model(chunk_size=None)
    n = 1 << 20
    per_position = 2 * model.cfg.kv_heads * model.cfg.head_size * 2  # k and v, bf16
    cache = model.make_cache(1, n, dtype=torch.bfloat16)
    assert all(c.k.is_meta for c in cache.layers)
    assert cache.nbytes() == per_position * (2 * CHUNK + 2 * n)
    assert everything_global.make_cache(1, n, dtype=torch.bfloat16).nbytes() == per_position * 4 * n


def test_cache_rejects_gaps_overflow_and_returning_to_an_evicted_chunk() -> None:
    ring = LayerKVCache(1, 1, 4, max_seq_len=64, chunk_size=CHUNK, dtype=torch.float32)
    full = LayerKVCache(1, 1, 4, max_seq_len=64, chunk_size=None, dtype=torch.float32)
    block = torch.randn(1, 1, 20, 4)
    for cache in (ring, full):
        cache.update(block, block, 0)
        with pytest.raises(ValueError, match="gap"):
            cache.update(block[:, :, :1], block[:, :, :1], 21)
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.update(block, block, 60)
    with pytest.raises(ValueError, match="newest chunk"):  # position 11 needs keys 8..10, overwritten by 16..19
        ring.update(block[:, :, :1], block[:, :, :1], 11)
    full.update(block[:, :, :1], block[:, :, :1], 11)  # a full cache can rewind

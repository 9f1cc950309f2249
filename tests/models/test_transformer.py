from dataclasses import replace

import pytest
import torch

from llamoe.models import AttentionConfig, Transformer, presets
from llamoe.models.generate import generate, sample_next


def _dense_irope() -> Transformer:
    attention = AttentionConfig(
        nope_layer_interval=2, chunk_size=8, qk_norm=True, temperature_tuning=True, floor_scale=6, attn_scale=0.3
    )
    cfg = replace(presets.get("llama3.1-tiny"), dim=64, n_heads=4, n_kv_heads=2, n_layers=4, attention=attention)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("irope", [False, True])
def test_token_by_token_decode_equals_full_forward(irope: bool) -> None:
    if irope:
        model = _dense_irope()
    else:
        cfg = replace(presets.get("llama3.1-tiny"), dim=64, n_heads=4, n_kv_heads=1)
        model = Transformer(cfg).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 29))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.make_cache(2, 29)
        steps = [model(tokens[:, i : i + 1], start_pos=i, cache=cache).logits for i in range(29)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_prefill_then_uneven_blocks_equal_full_forward() -> None:
    model = _dense_irope()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.make_cache(1, 40)
        pieces, pos = [], 0
        for size in (11, 1, 9, 3, 16):
            pieces.append(model(tokens[:, pos : pos + size], start_pos=pos, cache=cache).logits)
            pos += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_chunked_layer_cache_is_bounded() -> None:
    model = _dense_irope()
    cache = model.make_cache(1, 1000)
    kinds = [layer.attention.kind for layer in model.layers]
    for layer_cache, kind in zip(cache.layers, kinds):
        assert layer_cache.k.size(2) == (8 if kind.chunk_size else 1000)
    per_slot = 2 * model.cfg.kv_heads * model.cfg.head_size * 4  # k and v, fp32
    assert cache.nbytes() == per_slot * (2 * 8 + 2 * 1000)


def test_forward_output_contract() -> None:
    model = Transformer(presets.get("llama3.1-tiny"))
    out = model(torch.randint(0, 320, (2, 7)))
    assert out.logits.shape == (2, 7, 320)
    assert out.aux_loss.shape == () and float(out.aux_loss) == 0.0
    assert out.router_stats == {}


def test_generate_greedy_matches_argmax_of_full_forward() -> None:
    model = _dense_irope()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 13))
    new = generate(model, prompt, 6, prefill_chunk=5)
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(new, seq[:, 13:])


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next(logits)) == 0


def test_loss_decreases_when_training_tiny_model() -> None:
    model = Transformer(presets.get("llama3.1-tiny"))
    data = torch.randint(0, 320, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(data[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

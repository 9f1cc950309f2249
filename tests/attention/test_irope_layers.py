import pytest
import torch

from llamoe.attention.attention import Attention
from llamoe.attention.irope import layer_attention_kind
from llamoe.attention.rope import rope_angles
from llamoe.models import AttentionConfig, ConfigError, ModelConfig, Transformer, presets

FLOOR = 6.0


def _cfg(**attention: object) -> ModelConfig:
    settings = dict(
        nope_layer_interval=4, chunk_size=8, qk_norm=True, temperature_tuning=True, floor_scale=FLOOR, attn_scale=0.5
    )
    settings.update(attention)
    return ModelConfig(
        dim=64,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        ffn_hidden_dim=96,
        attention=AttentionConfig(**settings),  # type: ignore[arg-type]
    )


def test_llama4_schedule_nope_every_fourth_layer() -> None:
    kinds = [layer_attention_kind(_cfg().attention, i) for i in range(8)]
    assert [k.uses_rope for k in kinds] == [True, True, True, False] * 2  # layers 3 and 7 are NoPE
    assert [k.chunk_size for k in kinds] == [8, 8, 8, None] * 2  # RoPE layers chunked, NoPE global
    assert [k.qk_norm for k in kinds] == [True, True, True, False] * 2  # QK-norm on RoPE layers only


@pytest.mark.parametrize("interval,rope,chunked", [(None, [True] * 8, [8] * 8), (1, [False] * 8, [None] * 8)])
def test_schedule_none_is_rope_everywhere_and_one_is_nope_everywhere(
    interval: int | None, rope: list[bool], chunked: list[int | None]
) -> None:
    cfg = _cfg(nope_layer_interval=interval)
    kinds = [layer_attention_kind(cfg.attention, i) for i in range(8)]
    assert [k.uses_rope for k in kinds] == rope
    assert [k.chunk_size for k in kinds] == chunked
    assert [k.qk_norm for k in kinds] == rope


def _sharp_model(cfg: ModelConfig) -> Transformer:
    """Attention weights large enough that attention is far from uniform, so temperature visibly matters."""
    model = Transformer(cfg).eval()
    for layer in model.layers:
        layer.attention.init_weights(0.3, 0.3)
    return model


def _layer_outputs(model: Transformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention on the same input x [B, L, D], so layers are compared in isolation."""
    rope = rope_angles(model.rope_freqs, torch.arange(x.size(1)))
    with torch.no_grad():
        return [layer.attention(x, rope) for layer in model.layers]


def test_temperature_changes_only_nope_layers_and_only_from_floor_scale() -> None:
    model = _sharp_model(_cfg())
    x = torch.randn(2, 20, 64)
    on = _layer_outputs(model, x)
    model.set_attention(temperature_tuning=False)
    off = _layer_outputs(model, x)
    first_scaled = int(FLOOR) - 1  # s(p) > 1 from p + 1 = floor_scale
    for layer, a, b in zip(model.layers, on, off):
        if layer.attention.kind.uses_rope:
            assert torch.equal(a, b)
        else:
            assert torch.equal(a[:, :first_scaled], b[:, :first_scaled])
            assert (a[:, first_scaled:] - b[:, first_scaled:]).abs().amax(dim=(0, 2)).min() > 1e-2


def test_temperature_toggle_changes_logits_only_at_scaled_positions_and_round_trips() -> None:
    model = _sharp_model(_cfg())
    tokens = torch.randint(0, 97, (2, 20))
    first_scaled = int(FLOOR) - 1
    with torch.no_grad():
        on = model(tokens).logits
        model.set_attention(temperature_tuning=False)
        off = model(tokens).logits
        fresh = Transformer(_cfg(temperature_tuning=False)).eval()
        fresh.load_state_dict(model.state_dict())
        untrained_off = fresh(tokens).logits
        model.set_attention(temperature_tuning=True)
        on_again = model(tokens).logits
        model.set_attention(attn_scale=0.0)  # re-parameterised: s(p) = 1 everywhere
        zero_scale = model(tokens).logits
    assert torch.equal(on[:, :first_scaled], off[:, :first_scaled])
    assert (on[:, first_scaled:] - off[:, first_scaled:]).abs().amax(dim=(0, 2)).min() > 1e-3
    assert torch.equal(off, untrained_off)  # the switch is the same as a model configured without it
    assert torch.equal(on, on_again)
    assert torch.equal(zero_scale, off)


def test_qk_norm_makes_rope_layers_invariant_to_query_key_scale() -> None:
    """Weightless RMS norm of q and k: scaling wq, wk changes nothing on RoPE layers, but does on NoPE layers."""
    cfg = _cfg(nope_layer_interval=2, temperature_tuning=False)
    x = torch.randn(1, 12, 64)
    rope = rope_angles(Transformer(cfg).rope_freqs, torch.arange(12))
    for layer_id, uses_rope in ((0, True), (1, False)):
        attn = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.norm_eps, cfg.attention, layer_id)
        attn.init_weights(0.3, 0.3)
        with torch.no_grad():
            before = attn(x, rope)
            attn.wq.weight.mul_(4.0)  # a power of two: only eps separates the results
            attn.wk.weight.mul_(4.0)
            after = attn(x, rope)
        if uses_rope:
            torch.testing.assert_close(after, before, atol=5e-5, rtol=0)  # outputs are O(1)
        else:
            assert (after - before).abs().max() > 1e-2


def test_qk_norm_switch_changes_rope_layers() -> None:
    x = torch.randn(1, 12, 64)
    outs = []
    for qk in (True, False):
        torch.manual_seed(1)
        model = Transformer(_cfg(qk_norm=qk)).eval()
        outs.append(_layer_outputs(model, x))
    for layer_id, (a, b) in enumerate(zip(*outs)):
        if layer_id % 4 == 3:  # NoPE layers never normalise q, k
            assert torch.equal(a, b)
        else:
            assert not torch.allclose(a, b, atol=1e-3)


def test_setting_an_unavailable_backend_fails_before_changing_anything() -> None:
    model = Transformer(_cfg())
    with pytest.raises(ConfigError, match="attention.backend: 'flash' runs on CUDA only"):
        model.set_attention(backend="flash", temperature_tuning=False)  # no CUDA here
    assert model.attention_settings.backend == "sdpa" and model.attention_settings.temperature_tuning


def test_invalid_set_attention_changes_nothing() -> None:
    model = Transformer(presets.get("llama4-tiny"))
    before = model.attention_settings
    with pytest.raises(ConfigError, match="attention.floor_scale"):
        model.set_attention(temperature_tuning=False, floor_scale=-1.0)
    assert all(layer.attention.settings is before for layer in model.layers)

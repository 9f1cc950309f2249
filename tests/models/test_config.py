import dataclasses

import pytest
import torch

from llamoe.models import ConfigError, ModelConfig, Transformer, presets
from llamoe.models.config import model_config_from_dict

EXPECTED = {
    # preset: (total params, active params) from shared/REFERENCE.md
    "llama3.1-8b": (8_030_261_248, 8_030_261_248),
    "llama3.1-70b": (70_553_706_496, 70_553_706_496),
    "llama3.1-405b": (405_853_388_800, 405_853_388_800),
    "llama3.2-1b": (1_235_814_400, 1_235_814_400),  # tied embeddings (Meta Llama 3.2 model card)
    "llama3.2-3b": (3_212_749_824, 3_212_749_824),
    "llama4-scout": (107_769_861_120, 17_172_894_720),
    "llama4-maverick": (400_711_848_960, 17_184_691_200),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_param_counts(name: str) -> None:
    cfg = presets.get(name)
    total, active = EXPECTED[name]
    assert cfg.num_params() == total
    assert cfg.num_active_params() == active


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.1-70b", "llama3.1-405b"])
def test_llama31_ffn_hidden(name: str) -> None:
    hidden = {"llama3.1-8b": 14336, "llama3.1-70b": 28672, "llama3.1-405b": 53248}[name]
    assert presets.get(name).ffn_hidden == hidden


@pytest.mark.parametrize("name", presets.names())
def test_meta_model_matches_analytic_count(name: str) -> None:
    cfg = presets.get(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tied_embeddings_counted_once() -> None:
    cfg = dataclasses.replace(presets.get("llama3.1-tiny"), tie_embeddings=True)
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert model.output.weight is model.tok_embeddings.weight


def test_tiny_presets_match_active_params() -> None:
    dense, moe = presets.get("llama3.1-tiny"), presets.get("llama4-tiny")
    assert 1e6 < dense.num_params() < 10e6
    diff = moe.num_active_params() - dense.num_active_params()
    router = moe.dim * moe.moe.num_experts * sum(moe.is_moe(i) for i in range(moe.n_layers))
    assert diff == router  # everything but the routers is matched exactly
    assert moe.num_params() > 2 * dense.num_params()


def test_tiny_moe_presets_balance_and_full_size_llama4_keeps_meta_settings() -> None:
    """Unbalanced, the tiny MoE's routers collapse within 40 steps (benchmarks/RESULTS.md); Meta
    publishes no balancing for Llama 4, so the full-size presets add none."""
    tiny = presets.get("llama4-tiny").moe
    assert tiny is not None and tiny.bias_balancing and tiny.bias_update_rate == 3e-3 and tiny.aux_loss_weight == 0
    for name in presets.names():
        moe = presets.get(name).moe
        if name.endswith("-tiny") and moe is not None:
            assert moe.bias_balancing or moe.aux_loss_weight > 0, name
    for name in ("llama4-scout", "llama4-maverick"):
        moe = presets.get(name).moe
        assert moe is not None and not moe.bias_balancing and moe.aux_loss_weight == moe.z_loss_weight == 0, name


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="llama3.1-tiny"):
        presets.get("llama3-tiny")


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"dim": 100, "n_heads": 8}, "dim"),
        ({"n_heads": 8, "n_kv_heads": 3}, "n_kv_heads"),
        ({"rope": {"scaling": "yarn"}}, "rope.scaling"),
        ({"attention": {"backend": "cudnn"}}, "attention.backend"),
        ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k"),
        ({"moe": {"score_func": "relu"}}, "moe.score_func"),
    ],
)
def test_validation_names_the_key(fields: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        model_config_from_dict(fields)
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_unknown_field_rejected() -> None:
    with pytest.raises(Exception, match="n_layer"):
        model_config_from_dict({"n_layer": 3})


def test_layer_schedule_follows_llama4_convention() -> None:
    cfg = presets.get("llama4-maverick")
    assert [i for i in range(cfg.n_layers) if not cfg.uses_rope(i)] == list(range(3, 48, 4))
    assert [i for i in range(cfg.n_layers) if cfg.is_moe(i)] == list(range(1, 48, 2))
    assert all(cfg.is_chunked(i) == cfg.uses_rope(i) for i in range(cfg.n_layers))
    scout = presets.get("llama4-scout")
    assert all(scout.is_moe(i) for i in range(scout.n_layers))


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, multiple_of=16)
    matmul = cfg.num_params() - 100 * 64 - 5 * 64  # drop embedding and the five norms
    attn = 2 * 4 * 4 * 16 * (128 + 1) / 2  # layers · 4 · H · Dh · mean keys
    assert cfg.flops_per_token(128, training=False) == pytest.approx(2 * matmul + attn)
    assert cfg.flops_per_token(128) == pytest.approx(3 * (2 * matmul + attn))
    chunked = model_config_from_dict({**{"dim": 64, "n_layers": 2, "n_heads": 4}, "attention": {"chunk_size": 8}})
    assert chunked.attended_keys(0, 16) == pytest.approx(4.5)
    assert chunked.attended_keys(0, 10_000) < 5

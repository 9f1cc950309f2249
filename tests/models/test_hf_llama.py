"""Parity and exact round trips between llamoe and transformers' LlamaForCausalLM (fp32, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamoe.models import AttentionConfig, ConfigError, ModelConfig, RopeConfig, Transformer, presets
from llamoe.models.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    load_hf,
    save_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf,
)

SEQ = 100  # past the llama3 original_max_position of 32 used below
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# (hidden, heads, kv heads, head_dim, rope, tied): GQA ratios 1, 2, 4; head_dim != hidden/heads; tied and untied.
SHAPES = {
    "mha-default-rope": (64, 4, 4, None, {"rope_type": "default", "rope_theta": 10000.0}, False),
    "gqa2-headdim24-llama3-tied": (64, 4, 2, 24, LLAMA3_ROPE, True),
    "gqa4-headdim10-llama3": (48, 8, 2, 10, LLAMA3_ROPE, False),
    "gqa2-llama3-tied": (32, 4, 2, None, dict(LLAMA3_ROPE, rope_theta=500000.0), True),
}


def _hf_model(shape: str, **overrides: Any) -> LlamaForCausalLM:
    hidden, heads, kv, head_dim, rope, tied = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope),
        tie_word_embeddings=tied,
        **overrides,
    )
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model)
    return model


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, norm gains around 1, so every tensor's mapping shows in the logits."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, 0.15)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _max_diff(hf: LlamaForCausalLM, ours: Transformer, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens).logits).abs().max().item()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_from_hf_logits_match(shape: str) -> None:
    hf = _hf_model(shape)
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 101, (2, SEQ))
    assert _max_diff(hf, ours, tokens) < 1e-4  # observed <= 6e-6 (logits up to ~1.5)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_round_trips_are_bit_exact(shape: str) -> None:
    hf = _hf_model(shape)
    _assert_same_state(to_hf(from_hf(hf)).state_dict(), hf.state_dict())
    ours = from_hf(hf)
    _assert_same_state(from_hf(to_hf(ours)).state_dict(), ours.state_dict())


@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_of_native_model_matches(tied: bool) -> None:
    cfg = ModelConfig(
        dim=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        head_dim=12,
        vocab_size=90,
        ffn_hidden_dim=64,
        max_seq_len=256,
        tie_embeddings=tied,
        rope=RopeConfig(theta=10000.0, scaling="llama3", original_max_position=32),
    )
    ours = Transformer(cfg).eval()
    _randomize(ours)
    hf = to_hf(ours)
    assert isinstance(hf, LlamaForCausalLM) and not hf.training
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    assert _max_diff(hf, ours, torch.randint(0, 90, (2, SEQ))) < 1e-4


def test_llama3_scaling_is_exercised() -> None:
    """Dropping the scaling visibly changes logits past original_max_position, so the parity above tests it."""
    hf = _hf_model("gqa4-headdim10-llama3")
    ours = from_hf(hf).eval()
    ours_unscaled = Transformer(dataclasses.replace(ours.cfg, rope=RopeConfig(theta=10000.0))).eval()
    ours_unscaled.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 101, (1, SEQ))
    with torch.no_grad():
        gap = (ours(tokens).logits - ours_unscaled(tokens).logits)[:, 40:].abs().max().item()
    assert gap > 1e-2


def test_config_round_trip_and_llama31_8b_fields() -> None:
    cfg = presets.get("llama3.1-8b")
    hf_cfg = config_to_hf(cfg)
    assert isinstance(hf_cfg, LlamaConfig)
    assert (hf_cfg.hidden_size, hf_cfg.intermediate_size, hf_cfg.num_key_value_heads) == (4096, 14336, 8)
    assert hf_cfg.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    back = config_from_hf(hf_cfg)
    assert back.num_params() == cfg.num_params() == 8_030_261_248
    assert (back.ffn_hidden, back.rope, back.kv_heads, back.head_size) == (14336, cfg.rope, 8, 128)


def test_hub_prefix_and_stale_rotary_keys_are_tolerated() -> None:
    hf = _hf_model("gqa2-headdim24-llama3-tied")
    cfg = config_from_hf(hf.config)
    sd = {f"language_model.{k}": v for k, v in hf.state_dict().items()}
    sd["vision_model.patch_embedding.weight"] = torch.zeros(3)
    sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(3)
    _assert_same_state(state_dict_from_hf(sd, cfg), from_hf(hf).state_dict())


def test_state_dict_key_mismatch_is_reported() -> None:
    hf = _hf_model("mha-default-rope")
    cfg = config_from_hf(hf.config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(KeyError, match="q_proj.bias"):
        state_dict_from_hf(sd, cfg)
    with pytest.raises(KeyError, match="layers.0.attention.wq.weight"):
        ours = state_dict_from_hf(hf.state_dict(), cfg)
        del ours["layers.0.attention.wq.weight"]
        state_dict_to_hf(ours, cfg)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.rope_type"),
    ],
)
def test_unsupported_hf_config_names_the_field(override: dict[str, Any], field: str) -> None:
    hidden, heads, kv, head_dim, rope, tied = SHAPES["mha-default-rope"]
    kwargs: dict[str, Any] = dict(hidden_size=hidden, num_attention_heads=heads, rope_parameters=dict(rope))
    kwargs.update(override)
    with pytest.raises(ConfigError, match=field) as err:
        config_from_hf(LlamaConfig(**kwargs))
    assert err.value.key == field


def test_llama_export_refuses_llama4_features() -> None:
    cfg = dataclasses.replace(presets.get("llama3.1-tiny"), attention=AttentionConfig(nope_layer_interval=4))
    with pytest.raises(ConfigError, match="attention.nope_layer_interval"):
        config_to_hf(cfg, architecture="llama")


@pytest.mark.parametrize("shape", ["gqa2-headdim24-llama3-tied", "gqa4-headdim10-llama3"])
def test_save_and_load_local_directories(shape: str, tmp_path: Path) -> None:
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path / "from_transformers")
    ours = load_hf(str(tmp_path / "from_transformers")).eval()
    _assert_same_state(ours.state_dict(), from_hf(hf).state_dict())

    save_hf(ours, str(tmp_path / "from_llamoe"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "from_llamoe").eval()
    _assert_same_state(reloaded.state_dict(), hf.state_dict())
    assert _max_diff(reloaded, ours, torch.randint(0, 101, (1, SEQ))) < 1e-4

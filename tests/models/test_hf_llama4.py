"""Parity and exact round trips between llamoe and transformers' Llama4ForCausalLM (text, fp32, CPU).

What HF Llama 4 (transformers 5.23) does, checked against shared/REFERENCE.md:
- Chunked mask: key j visible to query i iff j <= i and j // C == i // C, with
  absolute positions; it agrees with ours (sequences below span 12 chunks of 8).
  Only with left padding does HF shift chunk boundaries by the padding length;
  llamoe has no padding mask.
- QK-norm: weightless x * rsqrt(mean(x^2) + rms_norm_eps) after RoPE, on RoPE
  layers only: the same as ours (eps = norm_eps).
- Temperature tuning: 1 + attn_scale * log1p(floor((p+1)/floor_scale)) at absolute
  position p on NoPE layers: the same formula. `floor_scale` is an int in HF's config.
- Divergence: HF always builds the chunked mask and raises without
  `attention_chunk_size`, even when no layer is chunked. `to_hf` writes max_seq_len
  there for such models (`test_model_without_chunking`).
- Divergence: HF's `router_jitter_noise` and `router_aux_loss_coef` are config
  fields that its model never reads; the adapter ignores them as well.
- MoE: HF runs every expert on every token, with score sigmoid(-inf) = 0 for the
  experts not picked, whose bias-free SwiGLU then gives exactly 0; we run only the
  picked ones. Same sum: expert_e(x * sigmoid(logit_e)) over the top-k, no renormalising.
- At fp32 the router (HF: model dtype, ours: fp32) and the softmax (HF eager:
  model dtype) agree; they would differ at bf16, which these tests do not claim.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import Llama4Config, Llama4ForCausalLM, Llama4TextConfig, LlamaForCausalLM

from llamoe.models import ConfigError, MoEConfig, Transformer, presets
from llamoe.models.hf import config_from_hf, config_to_hf, from_hf, load_hf, save_hf, to_hf

VOCAB, SEQ = 97, 100  # 100 tokens: 12+ chunks of 8, past floor_scale 16 six times


def _text_config(
    layers: int = 4, nope_every: int | None = 2, chunk: int | None = 8, **overrides: Any
) -> dict[str, Any]:
    no_rope = [int(nope_every is None or (i + 1) % nope_every != 0) for i in range(layers)]
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        no_rope_layers=no_rope,
        attention_chunk_size=chunk if chunk is not None else 256,
        layer_types=["chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope],
        moe_layers=[],
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=16,
        attn_scale=0.5,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


DENSE = {
    "nope2-qknorm": _text_config(),
    "nope4-no-qknorm-gqa4": _text_config(num_attention_heads=8, head_dim=8, use_qk_norm=False, nope_every=4),
    "no-temperature-tied": _text_config(attn_temperature_tuning=False, tie_word_embeddings=True),
    "scout-rope-headdim24": _text_config(
        head_dim=24,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def _hf_model(config: dict[str, Any]) -> Llama4ForCausalLM:
    model = Llama4ForCausalLM(Llama4TextConfig(**config)).eval()
    _randomize(model)
    return model


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, norm gains around 1, so every tensor's mapping shows in the logits."""
    for p in model.parameters():
        if p.dim() == 1:
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, 0.15)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _max_diff(hf: torch.nn.Module, ours: Transformer, tokens: torch.Tensor) -> float:
    return (_logits(hf, tokens) - _logits(ours, tokens)).abs().max().item()


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_irope_logits_and_round_trips(name: str) -> None:
    hf = _hf_model(DENSE[name])
    ours = from_hf(hf).eval()
    assert _max_diff(hf, ours, torch.randint(0, VOCAB, (2, SEQ))) < 1e-4  # observed <= 8e-6, logits up to ~5.5
    _assert_same_state(to_hf(ours).state_dict(), hf.state_dict())
    _assert_same_state(from_hf(to_hf(ours)).state_dict(), ours.state_dict())


def test_every_irope_feature_is_exercised() -> None:
    """Turning any one feature off visibly changes logits, so the parity above really tests each of them."""
    hf = _hf_model(DENSE["nope2-qknorm"])
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    reference = _logits(hf, tokens)
    att = ours.cfg.attention
    for change in (
        {"chunk_size": None},
        {"qk_norm": False},
        {"temperature_tuning": False},
        {"nope_layer_interval": None},
    ):
        variant = Transformer(dataclasses.replace(ours.cfg, attention=dataclasses.replace(att, **change))).eval()
        variant.load_state_dict(ours.state_dict())
        assert (_logits(variant, tokens) - reference).abs().max().item() > 1e-2, change


def test_model_without_chunking() -> None:
    """NoPE + global RoPE layers: HF needs a chunk size anyway; ours has none and the round trip keeps it so."""
    ours = from_hf(_hf_model(_text_config(chunk=None)))
    assert ours.cfg.attention.chunk_size is None and ours.cfg.attention.nope_layer_interval == 2
    hf = to_hf(ours.eval())
    assert set(hf.config.layer_types) == {"full_attention"}
    assert _max_diff(hf, ours, torch.randint(0, VOCAB, (1, SEQ))) < 1e-4
    assert from_hf(hf).cfg == ours.cfg


@pytest.mark.parametrize(
    ("name", "total"),
    [
        ("llama4-scout", 107_769_861_120),
        ("llama4-maverick", 400_711_848_960),
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-405b", 405_853_388_800),
    ],
)
def test_presets_map_to_hf_with_reference_counts(name: str, total: int) -> None:
    """HF's own model, built from our exported config on the meta device, has REFERENCE.md's parameter count."""
    cfg = presets.get(name)
    hf_cfg = config_to_hf(cfg)
    with torch.device("meta"):
        hf = (Llama4ForCausalLM if name.startswith("llama4") else LlamaForCausalLM)(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_params() == total
    back = config_from_hf(hf_cfg)
    assert (back.num_params(), back.num_active_params()) == (cfg.num_params(), cfg.num_active_params())
    assert (back.rope, back.moe, back.attention) == (cfg.rope, cfg.moe, cfg.attention)


def test_scout_and_maverick_hf_fields() -> None:
    scout, maverick = config_to_hf(presets.get("llama4-scout")), config_to_hf(presets.get("llama4-maverick"))
    assert scout.moe_layers == list(range(48)) and maverick.moe_layers == list(range(1, 48, 2))
    assert scout.no_rope_layers[:8] == [1, 1, 1, 0, 1, 1, 1, 0]
    assert scout.layer_types[:4] == ["chunked_attention"] * 3 + ["full_attention"]
    assert (scout.use_qk_norm, maverick.use_qk_norm) == (True, False)
    assert (scout.intermediate_size, scout.intermediate_size_mlp, scout.num_local_experts) == (8192, 16384, 16)
    assert (scout.attention_chunk_size, scout.floor_scale, scout.attn_scale) == (8192, 8192, 0.1)
    assert scout.rope_parameters["rope_type"] == "llama3" and scout.rope_parameters["factor"] == 16.0
    assert maverick.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_hub_multimodal_checkpoint_loads_its_text_model(tmp_path: Path) -> None:
    """A hub-style Llama4ForConditionalGeneration directory: `language_model.` keys next to vision ones."""
    text = DENSE["nope2-qknorm"]
    hf = _hf_model(text)
    tensors = {f"language_model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    tensors["vision_model.patch_embedding.linear.weight"] = torch.zeros(4, 4)
    tensors["multi_modal_projector.linear_1.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model-00001-of-00001.safetensors", {"format": "pt"})
    index = {"weight_map": {key: "model-00001-of-00001.safetensors" for key in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    Llama4Config(text_config=text, vision_config={"num_hidden_layers": 1}).to_json_file(tmp_path / "config.json")

    ours = load_hf(str(tmp_path)).eval()
    _assert_same_state(ours.state_dict(), from_hf(hf).state_dict())
    assert _max_diff(hf, ours, torch.randint(0, VOCAB, (1, 40))) < 1e-4


def test_save_hf_loads_in_transformers(tmp_path: Path) -> None:
    hf = _hf_model(DENSE["no-temperature-tied"])
    save_hf(from_hf(hf), str(tmp_path))
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path)
    _assert_same_state(reloaded.state_dict(), hf.state_dict())


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"moe_layers": [0, 2, 3]}, "moe_layers"),
        ({"no_rope_layers": [1, 0, 0, 1]}, "no_rope_layers"),
        ({"layer_types": ["chunked_attention"] * 4}, "layer_types"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.rope_type"),
    ],
)
def test_unsupported_hf_config_names_the_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        config_from_hf(Llama4TextConfig(**_text_config(**override)))
    assert err.value.key == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"score_func": "softmax"}, "moe.score_func"),
        ({"score_on": "output"}, "moe.score_on"),
        ({"renormalize": True, "top_k": 2}, "moe.renormalize"),  # top-1 renormalised is refused by MoEConfig
        ({"num_shared_experts": 0}, "moe.num_shared_experts"),
        ({"shared_expert_hidden_dim": 4096}, "moe.shared_expert_hidden_dim"),
        ({"capacity_factor": 1.25}, "moe.capacity_factor"),
        ({"bias_balancing": True}, "moe.bias_balancing"),
    ],
)
def test_routing_hf_cannot_express_is_refused(change: dict[str, Any], field: str) -> None:
    cfg = presets.get("llama4-scout")
    assert isinstance(cfg.moe, MoEConfig)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change))
    with pytest.raises(ConfigError, match=field):
        config_to_hf(cfg)


def test_fractional_floor_scale_is_refused() -> None:
    cfg = presets.get("llama4-tiny")
    assert cfg.moe is not None
    cfg = dataclasses.replace(
        cfg,
        moe=dataclasses.replace(cfg.moe, bias_balancing=False),  # HF has no selection bias; this test is about
        attention=dataclasses.replace(cfg.attention, floor_scale=16.5),  # floor_scale
    )
    with pytest.raises(ConfigError, match="attention.floor_scale"):
        config_to_hf(cfg)


MOE = {
    # interleave step 1: every layer MoE; QK-norm on; top-1 (Scout-like)
    "step1-top1-qknorm": _text_config(moe_layers=[0, 1, 2, 3], interleave_moe_layer_step=1, num_local_experts=4),
    # interleave step 2: layers 1, 3 MoE; QK-norm off (Maverick-like); tied head
    "step2-top1-tied": _text_config(
        moe_layers=[1, 3], interleave_moe_layer_step=2, num_local_experts=8, use_qk_norm=False, tie_word_embeddings=True
    ),
    # top-2: HF sums expert(x * sigmoid(logit)) over both picks, without renormalising
    "step2-top2-gqa4": _text_config(
        moe_layers=[1, 3], num_local_experts=4, num_experts_per_tok=2, num_attention_heads=8, head_dim=8, nope_every=4
    ),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_logits_and_round_trips(name: str) -> None:
    hf = _hf_model(MOE[name])
    ours = from_hf(hf).eval()
    moe = ours.cfg.moe
    assert moe is not None and moe.interleave_step == MOE[name].get("interleave_moe_layer_step", 2)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    assert _max_diff(hf, ours, tokens) < 1e-4  # observed <= 1e-5
    _assert_same_state(to_hf(ours).state_dict(), hf.state_dict())
    _assert_same_state(from_hf(to_hf(ours)).state_dict(), ours.state_dict())


def test_moe_experts_are_fused_gate_then_up() -> None:
    """HF gate_up_proj [E, D, 2F] holds w1 (gate) in its first F columns and w3 (up) in the last F."""
    hf = _hf_model(MOE["step2-top1-tied"])
    ours = from_hf(hf)
    fused = hf.model.layers[1].feed_forward.experts.gate_up_proj
    experts = ours.layers[1].feed_forward.experts
    assert torch.equal(fused[..., :32], experts.w1) and torch.equal(fused[..., 32:], experts.w3)
    assert torch.equal(hf.model.layers[1].feed_forward.experts.down_proj, experts.w2)


def test_native_moe_model_exports() -> None:
    """From our side: a llamoe MoE + iRoPE model exports to HF with the same logits."""
    cfg = presets.get("llama4-tiny")
    assert cfg.moe is not None
    cfg = dataclasses.replace(
        cfg,
        dim=64,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        attention=dataclasses.replace(cfg.attention, chunk_size=8, floor_scale=16.0, attn_scale=0.5),
        # the tiny preset's selection bias has no HF counterpart
        moe=dataclasses.replace(cfg.moe, expert_hidden_dim=32, bias_balancing=False),
    )
    ours = Transformer(cfg).eval()
    _randomize(ours)
    hf = to_hf(ours)
    assert isinstance(hf, Llama4ForCausalLM) and hf.config.moe_layers == [1, 3]
    assert _max_diff(hf, ours, torch.randint(0, VOCAB, (2, SEQ))) < 1e-4

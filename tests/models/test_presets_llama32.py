"""Llama 3.2 1B / 3B presets: the published HF configs, RoPE scaling factor 32, tied embeddings, exact round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from llamoe.models import Transformer, presets
from llamoe.models.hf import config_from_hf, config_to_hf, from_hf, to_hf

# Fields of meta-llama/Llama-3.2-{1B,3B}/config.json (Hugging Face hub, September 2024)
HF_FIELDS = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128),
}  # fmt: skip
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("name", sorted(HF_FIELDS))
def test_the_hf_config_is_the_published_one_and_comes_back_equal(name: str) -> None:
    cfg = presets.get(name)
    hf = config_to_hf(cfg)
    assert {k: getattr(hf, k) for k in HF_FIELDS[name]} == HF_FIELDS[name]
    assert (hf.vocab_size, hf.tie_word_embeddings, hf.rms_norm_eps, hf.max_position_embeddings) == (
        128256,
        True,
        1e-5,
        131072,
    )
    assert hf.rope_parameters == ROPE
    back = config_from_hf(hf)  # HF writes the FFN width itself, not Meta's multiplier
    assert (back.num_params(), back.ffn_hidden, back.rope, back.tie_embeddings, back.head_size) == (
        cfg.num_params(),
        cfg.ffn_hidden,
        cfg.rope,
        True,
        cfg.head_size,
    )


@pytest.mark.parametrize("name", sorted(HF_FIELDS))
def test_weights_round_trip_exactly_at_reduced_width(name: str) -> None:
    """The preset's layout (tied head, factor-32 llama3 scaling, its head_dim) at a CPU-sized width: HF logits match
    and the state dict comes back bit for bit."""
    cfg = presets.get(name)
    small = dataclasses.replace(
        cfg, dim=cfg.head_size * 2, n_heads=2, n_kv_heads=1, n_layers=2, vocab_size=512, multiple_of=32
    )
    torch.manual_seed(0)
    ours = Transformer(small).eval()
    hf = to_hf(ours).eval()
    assert isinstance(hf, LlamaForCausalLM) and hf.lm_head.weight is hf.model.embed_tokens.weight
    tokens = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens).logits).abs().max().item() < 1e-4
    back = from_hf(hf)
    assert (back.cfg.ffn_hidden, back.cfg.rope, back.cfg.tie_embeddings) == (small.ffn_hidden, cfg.rope, True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

"""Named model configurations, looked up by exact name.

Full-size presets reproduce the published architectures (see shared/REFERENCE.md);
the tiny ones train on two CPU cores and are sized for matched-active-parameter
dense vs MoE comparisons.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from llamoe.models.config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig


def _llama31(dim: int, n_layers: int, n_heads: int, multiplier: float, multiple_of: int) -> ModelConfig:
    """Llama 3.1 family (Meta, "The Llama 3 Herd of Models", 2024; llama-models llama3_1 configs)."""
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=1e-5,
        max_seq_len=131072,
        rope=RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    )


def _llama32(dim: int, n_layers: int, n_heads: int, multiplier: float) -> ModelConfig:
    """Llama 3.2 lightweight text models (Meta Llama 3.2 model card, September 2024; llama-models llama3_2 1B/3B
    params.json): Llama 3.1 blocks with the embedding tied to the output head, FFN multiple_of 256 and
    "llama3" RoPE scaling with factor 32 (low 1, high 4, original 8192)."""
    return replace(
        _llama31(dim, n_layers, n_heads, multiplier, 256),
        tie_embeddings=True,
        rope=RopeConfig(theta=500000.0, scaling="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0),
    )


def _irope(chunk_size: int, qk_norm: bool) -> AttentionConfig:
    """Llama 4 attention: NoPE every 4th layer, chunked RoPE layers, temperature tuning with
    floor_scale equal to the chunk size and attn_scale 0.1."""
    return AttentionConfig(
        nope_layer_interval=4,
        chunk_size=chunk_size,
        qk_norm=qk_norm,
        temperature_tuning=True,
        floor_scale=float(chunk_size),
        attn_scale=0.1,
    )


def _llama4(num_experts: int, interleave_step: int, qk_norm: bool, rope: RopeConfig, max_seq_len: int) -> ModelConfig:
    """Llama 4 text model (Meta Llama 4 model card and llama-models llama4 configs, April 2025).

    Load balancing keeps MoEConfig's defaults: no aux loss, no z-loss, no selection bias, no
    jitter, dropless. That is what Meta's published reference code computes, and it is inference
    code. Meta has not published how Llama 4 balanced its experts in training: whether it used a
    Switch-style aux loss (and its weight), a router z-loss, aux-loss-free bias balancing (and its
    update rate), router jitter, or a capacity factor with token dropping is unknown. Hugging Face's
    Llama4TextConfig carries router_aux_loss_coef=0.001 and router_jitter_noise=0.0, but its model
    code computes no aux loss; they are library defaults, not Meta's settings. Set these switches
    explicitly when training a full-size preset.
    """
    return ModelConfig(
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=202048,
        ffn_hidden_dim=16384,
        norm_eps=1e-5,
        max_seq_len=max_seq_len,
        rope=rope,
        attention=_irope(8192, qk_norm),
        moe=MoEConfig(
            num_experts=num_experts,
            top_k=1,
            interleave_step=interleave_step,
            expert_hidden_dim=8192,
            num_shared_experts=1,
            score_func="sigmoid",
            score_on="input",
        ),
    )


def _llama31_tiny() -> ModelConfig:
    """CPU-sized dense baseline (~3.2M params) with a byte-level vocab."""
    return ModelConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=320,
        multiple_of=64,
        max_seq_len=65536,
        rope=RopeConfig(theta=10000.0),
    )


def _llama4_tiny() -> ModelConfig:
    """CPU-sized Llama 4: llama3.1-tiny with iRoPE (chunk 64, NoPE every 4th layer, QK-norm,
    temperature tuning) and MoE on every 2nd layer with 8 routed experts, top-1, and a shared
    expert; routed + shared hidden = llama3.1-tiny's FFN hidden, so active parameters match
    llama3.1-tiny up to the router.

    Unlike the full-size presets it balances its experts: without balancing its routers collapse
    within 40 steps. DeepSeek-V3 aux-loss-free bias balancing at rate 3e-3 was picked over a Switch
    aux loss of 0.01 and over rates 1e-3 and 1e-2 on 150-step quickstart runs (benchmarks/RESULTS.md,
    "Load balancing of llama4-tiny"). Hugging Face's Llama 4 has no selection bias, so a run that
    must convert to HF trains with model.moe.bias_balancing=false model.moe.aux_loss_weight=0.01.
    """
    dense = _llama31_tiny()
    return replace(
        dense,
        attention=_irope(64, qk_norm=True),
        moe=MoEConfig(
            num_experts=8,
            top_k=1,
            interleave_step=2,
            expert_hidden_dim=dense.ffn_hidden // 2,
            num_shared_experts=1,
            bias_balancing=True,
            bias_update_rate=3e-3,
        ),
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "llama3.1-8b": lambda: _llama31(4096, 32, 32, 1.3, 1024),
    "llama3.1-70b": lambda: _llama31(8192, 80, 64, 1.3, 4096),
    "llama3.1-405b": lambda: _llama31(16384, 126, 128, 1.2, 4096),
    "llama3.1-tiny": _llama31_tiny,
    "llama3.2-1b": lambda: _llama32(2048, 16, 32, 1.5),
    "llama3.2-3b": lambda: _llama32(3072, 28, 24, 1.0),
    "llama4-scout": lambda: _llama4(
        16,
        1,
        True,
        RopeConfig(theta=500000.0, scaling="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0),
        10485760,
    ),
    "llama4-maverick": lambda: _llama4(128, 2, False, RopeConfig(theta=500000.0), 1048576),
    "llama4-tiny": _llama4_tiny,
}


def names() -> list[str]:
    """All preset names."""
    return list(_PRESETS)


def get(name: str) -> ModelConfig:
    """A fresh instance of the named preset; unknown names fail with the list of valid ones."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(names())}")
    return _PRESETS[name]()

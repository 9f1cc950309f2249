"""Model configuration: the package configs composed into one frozen dataclass that knows its own sizes.

`llamoe.attention.config` owns `RopeConfig` and `AttentionConfig`, `llamoe.moe.config` owns `MoEConfig`; they are
re-exported here. Field names follow Meta's reference code (`dim`, `n_layers`, `n_heads`, ...).
`ModelConfig` is frozen and validates itself on creation, so every change is a
`dataclasses.replace()` that validates again. It derives the per-layer schedule (RoPE/NoPE,
chunked/global, dense/MoE) and reports exact parameter, active parameter and FLOP counts without
building the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from llamoe.attention.config import AttentionConfig, RopeConfig
from llamoe.config_error import ConfigError
from llamoe.moe.config import MoEConfig


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: dense Llama 3.1 or Llama 4 style MoE + iRoPE."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    ffn_hidden_dim: Optional[int] = None
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    init_std: float = 0.02
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: Optional[MoEConfig] = None

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Dense SwiGLU hidden size: explicit, or Meta's 2/3·4·dim rule with multiplier and rounding."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    # ----------------------------------------------------------------- layer schedule
    def uses_rope(self, layer_id: int) -> bool:
        """iRoPE (Llama 4): layer i is NoPE iff (i+1) % nope_layer_interval == 0."""
        return self.attention.uses_rope(layer_id)

    def is_chunked(self, layer_id: int) -> bool:
        """RoPE layers use chunked causal attention when chunk_size is set; NoPE layers are global."""
        return self.attention.is_chunked(layer_id)

    def is_moe(self, layer_id: int) -> bool:
        """Llama 4 interleaving: layer i is MoE iff (i+1) % interleave_step == 0."""
        return self.moe is not None and self.moe.is_moe(layer_id)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field and how to fix it.

        The rope, attention and moe sections validated their own fields when they were created.
        """

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(key, msg)

        for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            need(getattr(self, key) > 0, key, f"must be a positive integer, got {getattr(self, key)}")
        need(self.n_kv_heads is None or self.n_kv_heads > 0, "n_kv_heads", "must be positive or null")
        need(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads",
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads} (GQA groups)",
        )
        if self.head_dim is None:
            need(
                self.dim % self.n_heads == 0,
                "dim",
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; change one or set head_dim",
            )
        need(self.head_size % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_size}")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.ffn_hidden > 0, "ffn_hidden_dim", "the dense FFN hidden size must be positive")
        need(self.init_std > 0, "init_std", "must be > 0")

        for key, cls in (("rope", RopeConfig), ("attention", AttentionConfig), ("moe", MoEConfig)):
            value = getattr(self, key)
            need(
                isinstance(value, cls) or (key == "moe" and value is None),
                key,
                f"must be a {cls.__name__} (validated on creation), got {type(value).__name__}",
            )

    # ----------------------------------------------------------------- counts
    def _attention_params(self) -> int:
        q = self.n_heads * self.head_size
        kv = self.kv_heads * self.head_size
        return self.dim * (q + 2 * kv) + q * self.dim

    def _layer_params(self, layer_id: int, active: bool) -> int:
        n = self._attention_params() + 2 * self.dim  # + attention_norm, ffn_norm
        if not self.is_moe(layer_id):
            return n + 3 * self.dim * self.ffn_hidden
        moe = self.moe
        assert moe is not None
        experts = moe.top_k if active else moe.num_experts
        n += self.dim * moe.num_experts  # router
        n += experts * 3 * self.dim * moe.expert_hidden_dim
        n += 3 * self.dim * moe.shared_expert_hidden
        return n

    def _outer_params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.dim  # embedding + head + final norm

    def num_params(self) -> int:
        """Exact parameter count of `Transformer(self)`."""
        return self._outer_params() + sum(self._layer_params(i, active=False) for i in range(self.n_layers))

    def num_expert_params(self) -> int:
        """Routed-expert parameters over all MoE layers: what expert parallelism shards (the rest is replicated)."""
        if self.moe is None:
            return 0
        moe_layers = sum(self.is_moe(i) for i in range(self.n_layers))
        return moe_layers * self.moe.num_experts * 3 * self.dim * self.moe.expert_hidden_dim

    def num_active_params(self) -> int:
        """Parameters touched per token: top_k routed experts per MoE layer, everything else in full."""
        return self._outer_params() + sum(self._layer_params(i, active=True) for i in range(self.n_layers))

    def attended_keys(self, layer_id: int, seq_len: int) -> float:
        """Mean number of keys a query attends to in a causal sequence of `seq_len` tokens."""
        if not self.is_chunked(layer_id):
            return (seq_len + 1) / 2
        c = self.attention.chunk_size
        assert c is not None
        full, rem = divmod(seq_len, c)
        total = full * c * (c + 1) / 2 + rem * (rem + 1) / 2
        return total / seq_len

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token for a causal sequence of `seq_len` tokens.

        Forward = 2 × active matmul parameters (attention projections, dense FFN or
        router + top_k experts + shared expert, output head; embedding lookups and
        norms excluded) + attention scores and values: 4 × n_heads × head_dim × mean
        attended keys per layer, where chunked layers attend to at most chunk_size
        keys and causal masking halves the global term. Training = 3 × forward.
        """
        matmul = self.num_active_params() - self.vocab_size * self.dim - (2 * self.n_layers + 1) * self.dim
        if self.tie_embeddings:
            matmul += self.vocab_size * self.dim  # the tied head is still a matmul
        attn = sum(4 * self.n_heads * self.head_size * self.attended_keys(i, seq_len) for i in range(self.n_layers))
        fwd = 2 * matmul + attn
        return 3 * fwd if training else fwd


def model_config_from_dict(data: dict[str, Any] | Any) -> ModelConfig:
    """Build and validate a ModelConfig from a plain mapping (unknown keys are rejected)."""
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, data)
    cfg = OmegaConf.to_object(merged)  # constructs every dataclass, so each validates itself
    assert isinstance(cfg, ModelConfig)
    return cfg


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain-dict form of a ModelConfig, suitable for YAML and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


__all__ = [
    "AttentionConfig",
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "RopeConfig",
    "model_config_from_dict",
    "model_config_to_dict",
]

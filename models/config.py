"""Model configuration: typed OmegaConf dataclasses that know their own sizes.

Field names follow Meta's reference code (`dim`, `n_layers`, `n_heads`, ...).
`ModelConfig` validates itself on creation, derives the per-layer schedule
(RoPE/NoPE, chunked/global, dense/MoE) and reports exact parameter, active
parameter and FLOP counts without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the fix."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class RopeConfig:
    """Rotary position embedding. `scaling="llama3"` is Llama 3.1's frequency scaling."""

    theta: float = 500000.0
    scaling: Optional[str] = None  # None | "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class AttentionConfig:
    """Attention layout switches (Llama 4 iRoPE, QK-norm, temperature tuning).

    - nope_layer_interval: layer i is NoPE (no rotary, global causal attention)
      iff (i+1) % interval == 0. None: RoPE everywhere; 1: NoPE everywhere.
    - chunk_size: RoPE layers attend only within their absolute chunk of this
      many positions. None: RoPE layers are global too.
    - qk_norm: weightless RMS norm on q and k after RoPE, on RoPE layers.
    - temperature_tuning: scale NoPE-layer queries by
      1 + attn_scale * ln(1 + floor((p+1)/floor_scale)); eval-time switchable.
    - backend: "sdpa" (reference), "flex" or "flash".
    """

    nope_layer_interval: Optional[int] = None
    chunk_size: Optional[int] = None
    qk_norm: bool = False
    temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    backend: str = "sdpa"


@dataclass
class MoEConfig:
    """Routed + shared experts (Llama 4 defaults), with the usual ablation switches.

    - interleave_step: layer i is MoE iff (i+1) % step == 0.
    - score_func: "sigmoid" (Llama 4) | "softmax".
    - score_on: "input" (Llama 4: expert_e(x * s_e)) | "output" (s_e * expert_e(x)).
    - renormalize: divide the top-k scores by their sum.
    - jitter: multiplicative uniform noise on router input in training (Switch).
    - aux_loss_weight / z_loss_weight: Switch load-balancing loss, router z-loss.
    - bias_balancing: DeepSeek-V3 aux-loss-free balancing, bias updated by
      bias_update_rate after every optimizer step, used for selection only.
    - capacity_factor: None is dropless; otherwise each expert takes at most
      ceil(capacity_factor * tokens * top_k / num_experts) tokens.
    - backend: expert computation, "torch" | "grouped_mm" | "megablocks".
    """

    num_experts: int = 16
    top_k: int = 1
    interleave_step: int = 1
    expert_hidden_dim: int = 8192
    num_shared_experts: int = 1
    shared_expert_hidden_dim: Optional[int] = None
    score_func: str = "sigmoid"
    score_on: str = "input"
    renormalize: bool = False
    jitter: float = 0.0
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None
    backend: str = "torch"


@dataclass
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

    @property
    def shared_expert_hidden(self) -> int:
        """Hidden size of the shared expert(s), merged into one SwiGLU (n shared × hidden)."""
        moe = self.moe
        if moe is None or moe.num_shared_experts == 0:
            return 0
        per = moe.shared_expert_hidden_dim or moe.expert_hidden_dim
        return moe.num_shared_experts * per

    # ----------------------------------------------------------------- layer schedule
    def uses_rope(self, layer_id: int) -> bool:
        """iRoPE (Llama 4): layer i is NoPE iff (i+1) % nope_layer_interval == 0."""
        k = self.attention.nope_layer_interval
        return k is None or (layer_id + 1) % k != 0

    def is_chunked(self, layer_id: int) -> bool:
        """RoPE layers use chunked causal attention when chunk_size is set; NoPE layers are global."""
        return self.attention.chunk_size is not None and self.uses_rope(layer_id)

    def is_moe(self, layer_id: int) -> bool:
        """Llama 4 interleaving: layer i is MoE iff (i+1) % interleave_step == 0."""
        return self.moe is not None and (layer_id + 1) % self.moe.interleave_step == 0

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field and how to fix it."""

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

        rope = self.rope
        need(rope.theta > 0, "rope.theta", "must be > 0")
        need(rope.scaling in (None, "llama3"), "rope.scaling", f"must be null or 'llama3', got {rope.scaling!r}")
        if rope.scaling == "llama3":
            need(rope.factor >= 1, "rope.factor", "must be >= 1")
            need(
                rope.high_freq_factor >= rope.low_freq_factor > 0,
                "rope.high_freq_factor",
                "need high_freq_factor >= low_freq_factor > 0",
            )
            need(rope.original_max_position > 0, "rope.original_max_position", "must be > 0")

        att = self.attention
        need(
            att.nope_layer_interval is None or att.nope_layer_interval >= 1,
            "attention.nope_layer_interval",
            "must be null (RoPE everywhere) or >= 1",
        )
        need(att.chunk_size is None or att.chunk_size >= 1, "attention.chunk_size", "must be null or >= 1")
        need(att.floor_scale > 0, "attention.floor_scale", "must be > 0")
        need(att.attn_scale >= 0, "attention.attn_scale", "must be >= 0")
        need(
            att.backend in ("sdpa", "flex", "flash"),
            "attention.backend",
            f"must be one of sdpa|flex|flash, got {att.backend!r}",
        )

        moe = self.moe
        if moe is not None:
            need(moe.num_experts >= 1, "moe.num_experts", "must be >= 1")
            need(
                1 <= moe.top_k <= moe.num_experts,
                "moe.top_k",
                f"must be in [1, num_experts={moe.num_experts}], got {moe.top_k}",
            )
            need(moe.interleave_step >= 1, "moe.interleave_step", "must be >= 1")
            need(moe.expert_hidden_dim > 0, "moe.expert_hidden_dim", "must be > 0")
            need(moe.num_shared_experts >= 0, "moe.num_shared_experts", "must be >= 0")
            need(
                moe.score_func in ("sigmoid", "softmax"),
                "moe.score_func",
                f"must be sigmoid|softmax, got {moe.score_func!r}",
            )
            need(moe.score_on in ("input", "output"), "moe.score_on", f"must be input|output, got {moe.score_on!r}")
            need(moe.jitter >= 0, "moe.jitter", "must be >= 0")
            need(moe.aux_loss_weight >= 0, "moe.aux_loss_weight", "must be >= 0")
            need(moe.z_loss_weight >= 0, "moe.z_loss_weight", "must be >= 0")
            need(
                moe.capacity_factor is None or moe.capacity_factor > 0,
                "moe.capacity_factor",
                "must be null (dropless) or > 0",
            )
            need(
                moe.backend in ("torch", "grouped_mm", "megablocks"),
                "moe.backend",
                f"must be torch|grouped_mm|megablocks, got {moe.backend!r}",
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
        n += 3 * self.dim * self.shared_expert_hidden
        return n

    def _outer_params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.dim  # embedding + head + final norm

    def num_params(self) -> int:
        """Exact parameter count of `Transformer(self)`."""
        return self._outer_params() + sum(self._layer_params(i, active=False) for i in range(self.n_layers))

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
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    cfg.validate()
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

"""The Llama decoder: pre-norm blocks of attention and a dense SwiGLU FFN or an MoE layer.

Follows Meta's reference layout (tok_embeddings, layers.{i}.attention / feed_forward,
attention_norm, ffn_norm, norm, output). Llama 4 features are per-layer flags
decided in each block's constructor from its layer id (`ModelConfig.uses_rope`,
`is_chunked`, `is_moe`).

Shapes: B batch, L sequence, D model dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from llamoe.attention.attention import Attention
from llamoe.attention.backends import get_backend
from llamoe.attention.cache import KVCache, LayerKVCache
from llamoe.attention.config import AttentionConfig
from llamoe.attention.rope import rope_angles, rope_frequencies
from llamoe.models.checkpointing import checkpointed_layers, run_block
from llamoe.models.config import ModelConfig
from llamoe.models.layers import FeedForward, RMSNorm
from llamoe.moe.layer import MoE


class OutputHead:
    """The output projection as a forward ran it: the same module under the same autocast state,
    so logits computed later (`ModelOutput.logits`, a chunked loss) equal those of the forward."""

    def __init__(self, output: nn.Linear, device: torch.device) -> None:
        self.output = output
        self.vocab_size = output.out_features  # not the weight's shape, which ZeRO-3 partitions
        self.device_type = device.type
        on = self.device_type in ("cpu", "cuda") and torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type) if on else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        if self.autocast_dtype is None:
            return self.output(h)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.output(h)


class ModelOutput:
    """What a forward returns.

    logits [B, L, V]: given, or computed by `head` from `hidden` when first read (then kept). A
    loss that applies the head in chunks (models/loss.py) never reads it, so [B, L, V] never exists.
    hidden [B, L, D]: the final norm's output, the head's input (None when built from logits).
    aux_loss: weighted MoE auxiliary losses (0 for dense); router_stats: layer id -> stats.
    """

    def __init__(
        self,
        *,
        aux_loss: torch.Tensor,
        logits: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        head: Optional[OutputHead] = None,
        router_stats: Optional[dict[int, dict[str, torch.Tensor]]] = None,
    ) -> None:
        if logits is None and (hidden is None or head is None):
            raise ValueError("ModelOutput needs logits, or hidden states and the head that maps them")
        self._logits = logits
        self.hidden = hidden
        self.head = head
        self.aux_loss = aux_loss
        self.router_stats = router_stats if router_stats is not None else {}

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            assert self.head is not None and self.hidden is not None
            self._logits = self.head(self.hidden)
        return self._logits


class Block(nn.Module):
    """x + attention(norm(x)), then + ffn(norm(·)) where ffn is a dense SwiGLU or an MoE layer."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = cfg.is_moe(layer_id)  # Llama 4 interleaves MoE and dense FFN layers
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(
            cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.norm_eps, cfg.attention, layer_id
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: Union[MoE, FeedForward]
        if cfg.moe is not None and self.is_moe:
            self.feed_forward = MoE(cfg.dim, cfg.moe)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start_pos: int,
        cache: Optional[LayerKVCache],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[dict[str, torch.Tensor]]]:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, cache)
        if self.is_moe:
            moe = self.feed_forward(self.ffn_norm(h))
            return h + moe.out, moe.aux_loss, moe.stats
        return h + self.feed_forward(self.ffn_norm(h)), None, None

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(init_std, out_std)
        self.feed_forward.init_weights(init_std, out_std)


class Transformer(nn.Module):
    """Dense Llama 3.1 or Llama 4 style MoE + iRoPE decoder, chosen entirely by its ModelConfig.

    `cfg` is the frozen config the model was built from; nothing the model does changes it, so
    two models built from one config never affect each other. Eval-time attention knobs live in
    the layers (`attention_settings`, changed by `set_attention`); which blocks recompute their
    activations in training is `activation_checkpointing` (changed by `set_activation_checkpointing`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_table: Optional[torch.Tensor] = None  # see rope_freqs
        self.activation_checkpointing = "none"
        self._checkpointed = checkpointed_layers("none", cfg.n_layers)  # per block, see models/checkpointing.py
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @property
    def rope_freqs(self) -> torch.Tensor:
        """The RoPE frequencies [Dh/2], fp32, on the model's device.

        Not a buffer: computed on first use on each device, so no move or cast (`.to(bfloat16)`,
        `to_empty`) ever touches it; a bf16 copy would round every frequency and rotate far
        positions by wrong angles.
        """
        device = self.tok_embeddings.weight.device
        if self._rope_table is None or self._rope_table.device != device:
            self._rope_table = rope_frequencies(self.cfg.head_size, self.cfg.rope, device=device)
        return self._rope_table

    @torch.no_grad()
    def init_weights(self) -> None:
        """Llama-style init: inputs N(0, init_std) truncated at 3σ; residual-stream outputs (wo, w2)
        scaled by 1/sqrt(2·n_layers) (GPT-2); untied head N(0, 1/sqrt(dim)); norms 1.
        Call after `to_empty(device=...)` when the model was built on the meta device (models/build.py)."""
        cfg = self.cfg
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        if not cfg.tie_embeddings:
            head_std = cfg.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=head_std, a=-3 * head_std, b=3 * head_std)

    def forward(self, tokens: torch.Tensor, *, start_pos: int = 0, cache: Optional[KVCache] = None) -> ModelOutput:
        """tokens [B, L] at absolute positions start_pos..; with a cache, keys/values are stored and reused."""
        length = tokens.size(1)
        positions = torch.arange(start_pos, start_pos + length, device=tokens.device)
        rope = rope_angles(self.rope_freqs, positions)
        h = self.tok_embeddings(tokens)  # [B, L, D]
        aux_loss = torch.zeros((), device=h.device, dtype=torch.float32)
        router_stats: dict[int, dict[str, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            h, layer_aux, stats = run_block(
                layer, self._checkpointed[i], h, rope, start_pos, cache[i] if cache is not None else None
            )
            if stats is not None:
                aux_loss = aux_loss + layer_aux
                router_stats[i] = stats
        head = OutputHead(self.output, h.device)  # logits [B, L, V] only when read
        return ModelOutput(hidden=self.norm(h), head=head, aux_loss=aux_loss, router_stats=router_stats)

    def set_activation_checkpointing(self, policy: str) -> None:
        """Recompute the activations of the blocks `policy` names (none | full | selective) in the
        backward instead of keeping them; see models/checkpointing.py. Results do not change."""
        self._checkpointed = checkpointed_layers(policy, self.cfg.n_layers)
        self.activation_checkpointing = policy

    def make_cache(self, batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Empty KV cache: full length for global layers, a chunk_size ring for chunked layers."""
        param = self.tok_embeddings.weight
        return KVCache(
            [
                LayerKVCache(
                    batch_size,
                    self.cfg.kv_heads,
                    self.cfg.head_size,
                    max_seq_len,
                    layer.attention.kind.chunk_size,
                    dtype or param.dtype,
                    param.device,
                )
                for layer in self.layers
            ]
        )

    @property
    def attention_settings(self) -> AttentionConfig:
        """The attention settings the layers use now: `cfg.attention` unless `set_attention` changed them."""
        return self.layers[0].attention.settings

    def set_attention(
        self,
        *,
        temperature_tuning: Optional[bool] = None,
        floor_scale: Optional[float] = None,
        attn_scale: Optional[float] = None,
        backend: Optional[str] = None,
    ) -> None:
        """Change eval-time attention settings (temperature tuning, backend) on every layer without retraining.

        The new settings are validated before any layer changes; `cfg` (what the model was trained
        with) stays as it is.
        """
        if backend is not None:  # fail now, before changing anything, not at the next forward
            get_backend(backend, self.tok_embeddings.weight.device)
        changes = {
            name: value
            for name, value in (
                ("temperature_tuning", temperature_tuning),
                ("floor_scale", floor_scale),
                ("attn_scale", attn_scale),
                ("backend", backend),
            )
            if value is not None
        }
        settings = replace(self.attention_settings, **changes)  # validates
        for layer in self.layers:
            layer.attention.settings = settings

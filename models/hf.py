"""Hugging Face interop: one state-dict adapter for `LlamaForCausalLM` and `Llama4ForCausalLM` (text).

Two formats, chosen by `hf_architecture(cfg)` or an explicit `architecture=`:
- "llama" (`LlamaForCausalLM`): dense Llama 3.x. HF rotates q/k in "rotate-half"
  form, pairing channel i with i + Dh/2, while we (like Meta) pair 2i with 2i+1,
  so q/k rows are permuted within each head on the way in and out.
- "llama4" (`Llama4ForCausalLM`): MoE + iRoPE. HF Llama 4 rotates adjacent pairs
  like we do, so no permutation. Routed experts are fused: `gate_up_proj`
  [E, D, 2F] = cat(w1, w3) and `down_proj` [E, F, D] = w2.

Every conversion is an exact relabelling (permutations, concatenations and
splits), so `to_hf(from_hf(m))` reproduces m's state dict bit for bit. HF
settings llamoe does not model fail with a `ConfigError` naming the HF field.
Known HF quirks handled here (see tests/models/test_hf_llama4.py):
- HF Llama 4 builds its chunked mask even when no layer is chunked and then
  needs `attention_chunk_size`; for a model without chunked layers we write
  `max_seq_len` there, and read it back only when some layer is chunked.
- HF Llama 4 has no router jitter, aux loss or expert capacity: its
  `router_jitter_noise` / `router_aux_loss_coef` fields are ignored by its code and
  by this adapter, and llamoe's training-only MoE knobs (aux/z-loss weights,
  jitter, expert backend) do not travel to HF.

`save_hf` / `load_hf` work on local directories only (config.json + safetensors, which `load_hf`
reads one tensor at a time into a meta-built model; no HF model); nothing is downloaded.

Shapes: D model dim, H query heads, K kv heads, Dh head dim, E experts, F expert hidden.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Llama4Config,
    Llama4TextConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from llamoe.models.build import build_model
from llamoe.models.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig
from llamoe.models.safetensors_dir import SafetensorsDir
from llamoe.models.transformer import Transformer

LLAMA = "llama"
LLAMA4 = "llama4"
ARCHITECTURES = (LLAMA, LLAMA4)

StateDict = dict[str, torch.Tensor]

_HUB_PREFIX = "language_model."  # Llama 4 hub checkpoints wrap the text model in a multimodal one


# ----------------------------------------------------------------------------- format choice
def hf_architecture(cfg: ModelConfig) -> str:
    """ "llama" for a plain dense RoPE model, "llama4" when it needs MoE, NoPE layers, chunking or QK-norm."""
    att = cfg.attention
    plain = cfg.moe is None and att.nope_layer_interval is None and att.chunk_size is None and not att.qk_norm
    return LLAMA if plain else LLAMA4


def _check_architecture(cfg: ModelConfig, architecture: Optional[str]) -> str:
    arch = architecture or hf_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    if arch == LLAMA:
        att = cfg.attention
        for key, bad in (
            ("moe", cfg.moe is not None),
            ("attention.nope_layer_interval", att.nope_layer_interval is not None),
            ("attention.chunk_size", att.chunk_size is not None),
            ("attention.qk_norm", att.qk_norm),
        ):
            if bad:
                raise ConfigError(key, "LlamaForCausalLM cannot express this; export with architecture='llama4'")
    return arch


# ----------------------------------------------------------------------------- config
def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    if rope.scaling is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {
        "rope_type": "llama3",
        "rope_theta": rope.theta,
        "factor": rope.factor,
        "low_freq_factor": rope.low_freq_factor,
        "high_freq_factor": rope.high_freq_factor,
        "original_max_position_embeddings": rope.original_max_position,
    }


def _rope_from_hf(params: Optional[Mapping[str, Any]], default_theta: float) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise ConfigError("rope_parameters.partial_rotary_factor", f"only 1.0 (full rotary) works, not {partial}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            scaling="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError("rope_parameters.rope_type", f"only 'default' and 'llama3' are supported, got {rope_type!r}")


def _interval_from_flags(flags: list[bool], field: str) -> Optional[int]:
    """The k with flags[i] == ((i+1) % k == 0) for every layer, None when no layer is flagged."""
    if not any(flags):
        return None
    k = flags.index(True) + 1
    if any(flag != ((i + 1) % k == 0) for i, flag in enumerate(flags)):
        marked = [i for i, flag in enumerate(flags) if flag]
        raise ConfigError(field, f"layers {marked} are not every {k}th layer; llamoe supports only (i+1) % k == 0")
    return k


def _require(hf: PreTrainedConfig, field: str, expected: Any, why: str) -> None:
    value = getattr(hf, field, expected)
    if value != expected:
        raise ConfigError(field, f"{value!r} is not supported ({why}); expected {expected!r}")


def _int_field(value: float, key: str, hf_field: str) -> int:
    if value != int(value):
        raise ConfigError(key, f"HF {hf_field} is an integer; got {value}")
    return int(value)


def config_to_hf(cfg: ModelConfig, architecture: Optional[str] = None) -> PreTrainedConfig:
    """The HF config (`LlamaConfig` or `Llama4TextConfig`) of a llamoe ModelConfig."""
    arch = _check_architecture(cfg, architecture)
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_to_hf(cfg.rope),
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if arch == LLAMA:
        if cfg.dim % cfg.n_heads != 0:
            raise ConfigError("dim", "HF LlamaConfig needs hidden_size % num_attention_heads == 0, even with head_dim")
        return LlamaConfig(**common, intermediate_size=cfg.ffn_hidden, mlp_bias=False)

    att, moe = cfg.attention, cfg.moe
    moe_fields: dict[str, Any] = {"moe_layers": [], "intermediate_size": cfg.ffn_hidden}
    if moe is not None:
        for key, ok, why in (
            ("moe.score_func", moe.score_func == "sigmoid", "HF Llama 4 scores with a sigmoid"),
            ("moe.score_on", moe.score_on == "input", "HF Llama 4 scales the expert input"),
            ("moe.renormalize", not moe.renormalize, "HF Llama 4 does not renormalise"),
            ("moe.num_shared_experts", moe.num_shared_experts == 1, "HF Llama 4 has exactly one shared expert"),
            (
                "moe.shared_expert_hidden_dim",
                moe.shared_expert_hidden_dim in (None, moe.expert_hidden_dim),
                "HF Llama 4's shared expert has the routed experts' hidden size",
            ),
            ("moe.capacity_factor", moe.capacity_factor is None, "HF Llama 4 is dropless"),
            ("moe.bias_balancing", not moe.bias_balancing, "HF Llama 4 has no selection bias"),
        ):
            if not ok:
                raise ConfigError(key, f"Llama4ForCausalLM cannot express this: {why}")
        moe_fields = {
            "moe_layers": [i for i in range(cfg.n_layers) if cfg.is_moe(i)],
            "interleave_moe_layer_step": moe.interleave_step,
            "intermediate_size": moe.expert_hidden_dim,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
        }
    chunked = [cfg.is_chunked(i) for i in range(cfg.n_layers)]
    return Llama4TextConfig(
        **common,
        **moe_fields,
        intermediate_size_mlp=cfg.ffn_hidden,
        no_rope_layers=[int(cfg.uses_rope(i)) for i in range(cfg.n_layers)],
        # HF builds a chunked mask even when no layer uses it, so it needs some chunk size.
        attention_chunk_size=att.chunk_size if att.chunk_size is not None else cfg.max_seq_len,
        layer_types=["chunked_attention" if c else "full_attention" for c in chunked],
        use_qk_norm=att.qk_norm,
        attn_temperature_tuning=att.temperature_tuning,
        floor_scale=_int_field(att.floor_scale, "attention.floor_scale", "floor_scale"),
        attn_scale=att.attn_scale,
    )


def _common_from_hf(hf: PreTrainedConfig) -> dict[str, Any]:
    _require(hf, "hidden_act", "silu", "llamoe FFNs are SwiGLU")
    _require(hf, "attention_bias", False, "llamoe attention has no biases")
    _require(hf, "attention_dropout", 0.0, "llamoe attention has no dropout")
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    return dict(
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=hf.num_key_value_heads or n_heads,
        head_dim=None if head_dim * n_heads == hf.hidden_size else head_dim,
        vocab_size=hf.vocab_size,
        norm_eps=hf.rms_norm_eps,
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
        rope=_rope_from_hf(hf.rope_parameters, getattr(hf, "default_theta", 10000.0)),
    )


def _llama4_from_hf(hf: Llama4TextConfig, common: dict[str, Any]) -> ModelConfig:
    n = hf.num_hidden_layers
    nope = _interval_from_flags([not flag for flag in hf.no_rope_layers[:n]], "no_rope_layers")
    layer_types = list(hf.layer_types[:n])
    chunk_size = hf.attention_chunk_size if "chunked_attention" in layer_types else None
    expected = [
        "chunked_attention" if chunk_size is not None and hf.no_rope_layers[i] else "full_attention" for i in range(n)
    ]
    if layer_types != expected:
        raise ConfigError("layer_types", f"{layer_types} is not supported; llamoe chunks exactly the RoPE layers")
    moe_flags = [i in set(hf.moe_layers) for i in range(n)]
    step = _interval_from_flags(moe_flags, "moe_layers")
    moe = None
    if step is not None:
        moe = MoEConfig(
            num_experts=hf.num_local_experts,
            top_k=hf.num_experts_per_tok,
            interleave_step=step,
            expert_hidden_dim=hf.intermediate_size,
            num_shared_experts=1,
            score_func="sigmoid",
            score_on="input",
            renormalize=False,
        )
    return ModelConfig(
        **common,
        ffn_hidden_dim=hf.intermediate_size_mlp,
        attention=AttentionConfig(
            nope_layer_interval=nope,
            chunk_size=chunk_size,
            qk_norm=bool(hf.use_qk_norm),
            temperature_tuning=bool(hf.attn_temperature_tuning),
            floor_scale=float(hf.floor_scale),
            attn_scale=float(hf.attn_scale),
        ),
        moe=moe,
    )


def config_from_hf(hf_config: PreTrainedConfig) -> ModelConfig:
    """The llamoe ModelConfig of a `LlamaConfig`, `Llama4TextConfig` or (its text part) `Llama4Config`."""
    if isinstance(hf_config, Llama4Config):
        hf_config = hf_config.text_config
    if isinstance(hf_config, LlamaConfig):
        _require(hf_config, "mlp_bias", False, "llamoe FFNs have no biases")
        return ModelConfig(**_common_from_hf(hf_config), ffn_hidden_dim=hf_config.intermediate_size)
    if isinstance(hf_config, Llama4TextConfig):
        return _llama4_from_hf(hf_config, _common_from_hf(hf_config))
    model_type = getattr(hf_config, "model_type", type(hf_config).__name__)
    raise ConfigError("model_type", f"{model_type!r} is not a Llama or Llama 4 config")


# ----------------------------------------------------------------------------- state dict
def _rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k weight [H·Dh, D]: per head, rows (2i, 2i+1) (adjacent pairs) -> rows (i, Dh/2 + i) (rotate-half)."""
    d = w.size(-1)
    return w.view(n_heads, -1, 2, d).transpose(1, 2).reshape(-1, d)  # [H, Dh/2, 2, D] -> [H, 2, Dh/2, D]


def _adjacent_pair_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `_rotate_half_rows`."""
    d = w.size(-1)
    return w.view(n_heads, 2, -1, d).transpose(1, 2).reshape(-1, d)  # [H, 2, Dh/2, D] -> [H, Dh/2, 2, D]


def _fuse_gate_up(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.cat((w1, w3), dim=-1)  # [E, D, F] x2 -> [E, D, 2F], gate first


@dataclass(frozen=True)
class _Rule:
    """One HF tensor and the llamoe tensor(s) it is made of."""

    ours: tuple[str, ...]
    hf: str
    to_hf: Callable[..., torch.Tensor] = lambda t: t
    from_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = lambda t: (t,)


def _rules(cfg: ModelConfig, arch: str) -> list[_Rule]:
    """The full llamoe <-> HF key mapping of one model."""
    h, k = cfg.n_heads, cfg.kv_heads
    rules = [
        _Rule(("tok_embeddings.weight",), "model.embed_tokens.weight"),
        _Rule(("norm.weight",), "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(_Rule(("output.weight",), "lm_head.weight"))
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for name, proj in (("wv", "v_proj"), ("wo", "o_proj")):
            rules.append(_Rule((f"{ours}attention.{name}.weight",), f"{hf}self_attn.{proj}.weight"))
        for name, proj, heads in (("wq", "q_proj", h), ("wk", "k_proj", k)):
            if arch == LLAMA:
                rule = _Rule(
                    (f"{ours}attention.{name}.weight",),
                    f"{hf}self_attn.{proj}.weight",
                    lambda t, n=heads: _rotate_half_rows(t, n),
                    lambda t, n=heads: (_adjacent_pair_rows(t, n),),
                )
            else:
                rule = _Rule((f"{ours}attention.{name}.weight",), f"{hf}self_attn.{proj}.weight")
            rules.append(rule)
        rules.append(_Rule((f"{ours}attention_norm.weight",), f"{hf}input_layernorm.weight"))
        rules.append(_Rule((f"{ours}ffn_norm.weight",), f"{hf}post_attention_layernorm.weight"))
        ffn = f"{hf}mlp." if arch == LLAMA else f"{hf}feed_forward."
        if cfg.is_moe(i):
            moe = f"{ours}feed_forward."
            rules.append(_Rule((f"{moe}router.gate.weight",), f"{ffn}router.weight"))
            rules.append(
                _Rule(
                    (f"{moe}experts.w1", f"{moe}experts.w3"),
                    f"{ffn}experts.gate_up_proj",
                    _fuse_gate_up,
                    lambda t: tuple(t.chunk(2, dim=-1)),
                )
            )
            rules.append(_Rule((f"{moe}experts.w2",), f"{ffn}experts.down_proj"))
            for name, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                rules.append(_Rule((f"{moe}shared_expert.{name}.weight",), f"{ffn}shared_expert.{proj}.weight"))
        else:
            for name, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                rules.append(_Rule((f"{ours}feed_forward.{name}.weight",), f"{ffn}{proj}.weight"))
    return rules


def _check_keys(have: set[str], want: set[str], what: str) -> None:
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise KeyError(f"{what} state dict does not match the config: missing {missing[:5]}, unexpected {extra[:5]}")


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, architecture: Optional[str] = None) -> StateDict:
    """llamoe state dict -> HF `LlamaForCausalLM` / `Llama4ForCausalLM` state dict (tied heads included as lm_head)."""
    arch = _check_architecture(cfg, architecture)
    rules = _rules(cfg, arch)
    tied = {"output.weight"} if cfg.tie_embeddings else set()
    _check_keys(set(sd) - tied, {key for rule in rules for key in rule.ours}, "llamoe")
    out = {rule.hf: rule.to_hf(*(sd[key] for key in rule.ours)).contiguous() for rule in rules}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _detect_architecture(keys: set[str]) -> str:
    if any(".mlp." in key for key in keys):
        return LLAMA
    if any(".feed_forward." in key for key in keys):
        return LLAMA4
    raise KeyError("not a Llama or Llama 4 state dict: no 'mlp' or 'feed_forward' layer keys found")


class HFStateDict(Mapping[str, torch.Tensor]):
    """An HF Llama / Llama 4 state dict seen with llamoe keys; each tensor is converted when it is read.

    Keeps only the text model of a hub Llama 4 checkpoint (`language_model.` keys), ignores stale rotary
    buffers and checks the keys against `cfg` at once (KeyError). Values are read one HF tensor at a time,
    so a load from a lazy source (models/safetensors_dir.py) holds only the tensor being copied.
    """

    def __init__(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
        prefix = _HUB_PREFIX if any(key.startswith(_HUB_PREFIX) for key in sd) else ""
        keys = {k[len(prefix) :] for k in sd if k.startswith(prefix) and not k.endswith("rotary_emb.inv_freq")}
        rules = _rules(cfg, _detect_architecture(keys))
        _check_keys(keys - ({"lm_head.weight"} if cfg.tie_embeddings else set()), {r.hf for r in rules}, "Hugging Face")
        self._source, self._prefix = sd, prefix
        self._rules = {key: (rule, i) for rule in rules for i, key in enumerate(rule.ours)}
        if cfg.tie_embeddings:
            self._rules["output.weight"] = self._rules["tok_embeddings.weight"]

    def __getitem__(self, key: str) -> torch.Tensor:
        rule, i = self._rules[key]
        return rule.from_hf(self._source[self._prefix + rule.hf])[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """HF Llama / Llama 4 state dict (optionally `language_model.`-prefixed) -> llamoe state dict."""
    return dict(HFStateDict(sd, cfg))


# ----------------------------------------------------------------------------- models
def from_hf(hf_model: PreTrainedModel) -> Transformer:
    """A llamoe Transformer with the weights of an HF `LlamaForCausalLM` or `Llama4ForCausalLM`
    (same dtype and device, independent storage, same train/eval mode)."""
    cfg = config_from_hf(hf_model.config)
    param = next(hf_model.parameters())
    sd = state_dict_from_hf(hf_model.state_dict(), cfg)
    return build_model(cfg, device=param.device, dtype=param.dtype, state_dict=sd).train(hf_model.training)


def to_hf(model: Transformer, architecture: Optional[str] = None) -> PreTrainedModel:
    """An HF `LlamaForCausalLM` or `Llama4ForCausalLM` (chosen by `hf_architecture` unless given) with
    the weights of a llamoe Transformer (same dtype and device, same train/eval mode)."""
    cfg = model.cfg
    hf_cfg = config_to_hf(cfg, architecture)
    param = model.tok_embeddings.weight
    with no_init_weights():  # every weight is overwritten below
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=param.dtype)
    hf_model.tie_weights()  # skipped with the init above; a no-op unless tie_word_embeddings
    hf_model.to(param.device)
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), cfg, architecture))
    return hf_model.train(model.training)


# ----------------------------------------------------------------------------- local directories
_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "llama4_text": Llama4TextConfig,
    "llama4": Llama4Config,
}


def save_hf(model: Transformer, directory: str, architecture: Optional[str] = None) -> None:
    """Write `config.json` and `model.safetensors` that `transformers` loads with `from_pretrained(directory)`."""
    cfg = model.cfg
    hf_cfg = config_to_hf(cfg, architecture)
    hf_cfg.architectures = ["LlamaForCausalLM" if isinstance(hf_cfg, LlamaConfig) else "Llama4ForCausalLM"]
    hf_cfg.dtype = model.tok_embeddings.weight.dtype
    sd = state_dict_to_hf(model.state_dict(), cfg, architecture)
    if cfg.tie_embeddings:
        del sd["lm_head.weight"]  # HF re-ties it on load; safetensors cannot store shared tensors
    os.makedirs(directory, exist_ok=True)
    hf_cfg.to_json_file(os.path.join(directory, "config.json"))
    save_file({key: t.cpu() for key, t in sd.items()}, os.path.join(directory, "model.safetensors"), {"format": "pt"})


def read_hf_config(directory: str) -> ModelConfig:
    """The ModelConfig of a local HF Llama / Llama 4 directory's `config.json` (ConfigError naming the field)."""
    with open(os.path.join(directory, "config.json")) as f:
        data = json.load(f)
    model_type = data.get("model_type")
    if model_type not in _CONFIG_CLASSES:
        expected = ", ".join(sorted(_CONFIG_CLASSES))
        raise ConfigError("model_type", f"{model_type!r} in {directory}/config.json is not one of {expected}")
    return config_from_hf(_CONFIG_CLASSES[model_type].from_dict(data))


def load_hf(directory: str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    """A Transformer from a local HF Llama / Llama 4 directory (config.json + safetensors, sharded or not),
    built on the meta device and filled one tensor at a time in `dtype` (default: the stored dtype)."""
    cfg = read_hf_config(directory)
    sd = HFStateDict(SafetensorsDir(directory), cfg)
    return build_model(cfg, device=device, dtype=dtype or sd["tok_embeddings.weight"].dtype, state_dict=sd)


__all__ = [
    "ARCHITECTURES",
    "HFStateDict",
    "LLAMA",
    "LLAMA4",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_architecture",
    "load_hf",
    "read_hf_config",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf",
]

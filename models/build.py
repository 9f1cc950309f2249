"""The one build path: meta device -> shard -> to_empty -> init_weights or load.

1. `Transformer(cfg)` on the meta device: shapes only, no memory, so even the 405B and
   Maverick presets are cheap to build and inspect.
2. With expert parallelism (ep_size > 1), every MoE layer keeps only this rank's slice of
   the routed experts (`MoE.set_expert_parallel`), still on the meta device.
3. `to_empty(device)` allocates what is left, in `dtype`: a rank allocates only its own experts.
4. Either `init_weights` from `seed`, or a copy from a state dict of the whole model, of
   which only this rank's experts are read. The copy goes one tensor at a time (read, cut to
   this rank's experts, cast and moved into place), so a lazy state dict (a memory-mapped
   model.pt, or `models/hf.py`'s view of safetensors files) never has a second copy of the
   whole model in host memory.

The init does not depend on the sharding: each routed expert draws from a generator seeded
by its global index (`moe/experts/base.py`), so rank r of an expert-parallel group holds
exactly slice r of the experts the unsharded model gets from the same seed. The RoPE table
is not a parameter or buffer; the model computes it in fp32 on first use
(`Transformer.rope_freqs`).

Shapes: E experts of an MoE layer, E_l = E / ep_size experts held by a rank.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from llamoe.attention.backends import get_backend
from llamoe.models.config import ModelConfig
from llamoe.models.transformer import Transformer
from llamoe.moe.experts.base import Experts
from llamoe.moe.layer import MoE

Device = Union[str, torch.device]


def build_model(
    cfg: ModelConfig,
    *,
    device: Device = "cpu",
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    ep_group: Any = None,
) -> Transformer:
    """A Transformer holding rank `ep_rank`'s share of the model on `device`, initialised from `seed`
    or loaded from `state_dict` (the whole model's: experts [E, ...] in global order).

    `dtype` casts parameters and buffers (default: fp32). `ep_group` is the expert-parallel
    process group the MoE layers exchange tokens over (None builds the shard without one, for
    inspection and tests). The load is strict: a missing, unexpected or misshapen key raises
    RuntimeError. `state_dict` may be any mapping; each value is read once (step 4 above).
    Returns the model in training mode. An attention backend that cannot run on `device` fails first,
    with ConfigError naming `attention.backend`.
    """
    get_backend(cfg.attention.backend, device)  # fail before building, naming attention.backend (flash off CUDA)
    with torch.device("meta"):
        model = Transformer(cfg)
    if ep_size > 1:
        for layer in model.modules():
            if isinstance(layer, MoE):
                layer.set_expert_parallel(ep_group, ep_rank, ep_size)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gave each module its own new parameter
        model.output.weight = model.tok_embeddings.weight
    if state_dict is None:
        _init(model, seed)
    else:
        _load(model, state_dict, ep_size)
    return model


def _init(model: Transformer, seed: int) -> None:
    """`model.init_weights()` with the global RNG seeded by `seed` and restored afterwards."""
    device = model.tok_embeddings.weight.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model.init_weights()


@torch.no_grad()
def _load(model: Transformer, state_dict: Mapping[str, torch.Tensor], ep_size: int) -> None:
    """Strict copy of `state_dict` into `model`, one tensor at a time: each routed-expert tensor of the
    whole model [E, ...] is cut to the experts `model` holds, [first_expert, first_expert + E_l), so a
    memory-mapped state dict is read only there (a mapping with `expert_rows(key, first, stop)`, such as a
    checkpoint's per-rank expert files, is asked for those rows only). Tied tensors (one parameter, two
    keys) are copied once."""
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(targets.keys() - state_dict.keys()), sorted(state_dict.keys() - targets.keys())
    if missing or unexpected:
        raise RuntimeError(
            f"state dict does not match the model: missing keys {missing[:5]}, unexpected {unexpected[:5]}"
        )
    experts = {
        f"{prefix}.{name}": module
        for prefix, module in model.named_modules()
        if isinstance(module, Experts)
        for name in ("w1", "w3", "w2")
    }
    # a state dict whose experts are stored per rank reads only the rows this model holds
    expert_rows = getattr(state_dict, "expert_rows", None)
    done: set[int] = set()
    for key, target in targets.items():
        if id(target) in done:
            continue
        module = experts.get(key)
        first, stop = (module.first_expert, module.first_expert + module.num_experts) if module else (0, 0)
        if module is not None and ep_size > 1 and expert_rows is not None:
            value = expert_rows(key, first, stop)
        else:
            value = state_dict[key]
            if module is not None and ep_size > 1 and value.size(0) == module.num_experts * ep_size:
                value = value[first:stop]
        if value.shape != target.shape:
            raise RuntimeError(
                f"size mismatch for {key}: the state dict has {tuple(value.shape)}, the model {tuple(target.shape)}"
            )
        target.copy_(value)
        done.add(id(target))


__all__ = ["build_model"]

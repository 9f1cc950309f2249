"""The one build path: meta device -> shard -> to_empty -> init_weights or load.

1. `Transformer(cfg)` on the meta device: shapes only, no memory, so even the 405B and
   Maverick presets are cheap to build and inspect.
2. With expert parallelism (ep_size > 1), every MoE layer keeps only this rank's slice of
   the routed experts (`MoE.set_expert_parallel`), still on the meta device.
3. `to_empty(device)` allocates what is left, in `dtype`: a rank allocates only its own experts.
4. Either `init_weights` from `seed`, or a copy from a state dict of the whole model, of
   which only this rank's experts are read.

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

from models.config import ModelConfig
from models.transformer import Transformer
from moe.experts.base import Experts
from moe.layer import MoE

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
    RuntimeError. Returns the model in training mode.
    """
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
        model.load_state_dict(_local_experts(model, state_dict, ep_size))
    return model


def _init(model: Transformer, seed: int) -> None:
    """`model.init_weights()` with the global RNG seeded by `seed` and restored afterwards."""
    device = model.tok_embeddings.weight.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model.init_weights()


def _local_experts(model: Transformer, state_dict: Mapping[str, torch.Tensor], ep_size: int) -> dict[str, torch.Tensor]:
    """`state_dict` with each routed-expert tensor of the whole model [E, ...] cut to the experts `model`
    holds, [first_expert, first_expert + E_l); a memory-mapped state dict is read only there."""
    local = dict(state_dict)
    if ep_size == 1:
        return local
    for prefix, module in model.named_modules():
        if isinstance(module, Experts):
            start, stop = module.first_expert, module.first_expert + module.num_experts
            for name in ("w1", "w3", "w2"):
                key = f"{prefix}.{name}"
                if key in local and local[key].size(0) == module.num_experts * ep_size:
                    local[key] = local[key][start:stop]
    return local


__all__ = ["build_model"]

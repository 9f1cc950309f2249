"""Every DeepSpeed private API llamoe uses, in one version-checked place.

llamoe's MoE layers are plain PyTorch, not `deepspeed.moe.layer.MoE`, so expert parallelism
needs what DeepSpeed offers only privately:

- the expert-parallel and expert-data-parallel process groups (`deepspeed.utils.groups`:
  `_create_expert_and_data_parallel`, `_get_expert_parallel_group_dict`,
  `_get_expert_parallel_group`, `_get_expert_parallel_rank`);
- the engine's MoE gradient path, which DeepSpeed switches on only for its own MoE modules:
  a `DeepSpeedEngine` subclass overriding `_configure_distributed_model` switches it on for
  marked expert parameters, and is built through the engine's constructor as
  `deepspeed.initialize` does.

It also keeps DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op
(`deepspeed.comm.torch.build_shm_op`) when a process group is joined: training never uses it (it
serves DeepSpeed inference's all-reduce only), the C++ build costs a minute per fresh machine, and a
worker killed while building leaves a lock file on which every later launch waits forever.

Private names change between releases without notice, so only the DeepSpeed releases this
project was tested with (`SUPPORTED`, the same range as pyproject.toml) are accepted; any other
version, or a missing private name, stops with the installed version, the range and the fix.
Nothing else in the project may touch a DeepSpeed private name (a test greps the tree).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from typing import Any, Callable

import torch
from torch import nn

from llamoe.experiments.errors import UserError

# The tested range; pyproject.toml pins the same one (tests/experiments/test_deepspeed_compat.py).
SUPPORTED = ">=0.17.6,<0.20"
_LOWEST = (0, 17, 6)  # inclusive
_BELOW = (0, 20, 0)  # exclusive

_GROUP_FUNCTIONS = (
    "_create_expert_and_data_parallel",
    "_get_expert_parallel_group_dict",
    "_get_expert_parallel_group",
    "_get_expert_parallel_rank",
)


class DeepSpeedVersionError(UserError):
    """The installed DeepSpeed is outside the tested range or lacks a private name llamoe relies on."""


def _advice(found: str) -> str:
    return (
        f"{found}; llamoe supports deepspeed{SUPPORTED} (it relies on DeepSpeed private APIs that change "
        f"between releases, see experiments/train/deepspeed_compat.py). Install a supported version: "
        f"pip install 'deepspeed{SUPPORTED}'"
    )


def check_version(version: str) -> None:
    """Raise DeepSpeedVersionError unless the DeepSpeed version string `version` lies in SUPPORTED."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None or not _LOWEST <= (int(match[1]), int(match[2]), int(match[3] or 0)) < _BELOW:
        raise DeepSpeedVersionError(_advice(f"deepspeed {version} is installed"))


def installed_version() -> str:
    """The installed DeepSpeed's version, read from its metadata (without importing it)."""
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        raise DeepSpeedVersionError(_advice("deepspeed is not installed")) from None


def check_installed() -> None:
    """Fail fast, before DeepSpeed is imported, if the installed release is outside SUPPORTED."""
    check_version(installed_version())


@functools.lru_cache(maxsize=None)
def check_private_api() -> None:
    """Check the installed version, then import DeepSpeed and check every private name used here exists."""
    check_installed()
    from deepspeed import DeepSpeedEngine
    from deepspeed.utils import groups

    missing = [f"deepspeed.utils.groups.{name}" for name in _GROUP_FUNCTIONS if not hasattr(groups, name)]
    if not hasattr(DeepSpeedEngine, "_configure_distributed_model"):
        missing.append("DeepSpeedEngine._configure_distributed_model")
    if missing:
        raise DeepSpeedVersionError(_advice(f"deepspeed {installed_version()} lacks {', '.join(missing)}"))


def expert_parallel_group(ep_size: int) -> tuple[str, Any, int]:
    """(name, process group, this rank's index in it) of the expert-parallel group of `ep_size` ranks.

    DeepSpeed names it "ep_size_<n>": ranks [0..n), [n..2n), ... hold one copy of all experts each.
    It is created, with its expert-data-parallel groups, on first use (collective: every rank calls).
    """
    check_private_api()
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name, groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


def init_distributed(backend: str) -> None:
    """Join the default process group through DeepSpeed (`backend`: gloo or nccl), without building its
    shared-memory comm op (see the module docstring)."""
    check_installed()
    import deepspeed

    # by module path: the attribute `deepspeed.comm.torch` is PyTorch itself (re-exported by a star import)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = _no_shm_op
    deepspeed.init_distributed(dist_backend=backend)


def _no_shm_op() -> None:
    return None


@functools.lru_cache(maxsize=None)
def _expert_parallel_engine_class() -> type:
    check_private_api()
    from deepspeed import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """DeepSpeed's engine with its MoE gradient path on, set before it builds its (ZeRO) optimizer.

        DeepSpeed sets `has_moe_layers` only when it finds its own `deepspeed.moe.layer.MoE` modules.
        """

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            self.has_moe_layers = True

    return ExpertParallelEngine


def build_engine(model: nn.Module, optimizer: Any, ds_config: dict[str, Any], *, expert_parallel: bool) -> Any:
    """A DeepSpeed engine around `model` and `optimizer`, built the way `deepspeed.initialize` builds one
    (in the process group already joined); `expert_parallel` switches on DeepSpeed's MoE gradient handling
    for parameters marked `allreduce=False` with a `group_name`."""
    check_private_api()
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.config import DeepSpeedConfig

    engine_class = _expert_parallel_engine_class() if expert_parallel else DeepSpeedEngine
    return engine_class(
        args=None, model=model, optimizer=optimizer, config=ds_config, config_class=DeepSpeedConfig(ds_config)
    )


# ---------------------------------------------------------------------- ZeRO-1/2 optimizer state, by parameter
# A ZeRO stage 1-2 optimizer's state_dict() (DeepSpeed's checkpoint format, not a Python API) holds, per
# parameter group g, this rank's contiguous slice of the group's flattened parameters: the AdamW moments
# of that slice ("base_optimizer_state"), and where each parameter's fragment lies in it
# ("param_slice_mappings": name -> (start, numel)). Consecutive ranks of the group's data-parallel group
# hold consecutive slices, so a parameter's fragments in rank order are its flattened whole.
MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_is_expert_group(state: dict[str, Any]) -> list[bool]:
    """Per parameter group of a ZeRO-1/2 state dict: whether it holds expert-parallel parameters (split over
    the expert-data-parallel group instead of the whole world)."""
    return [bool(g.get("moe")) for g in state["base_optimizer_state"]["param_groups"]]


def zero_fragments(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Per parameter group of a ZeRO-1/2 state dict: {"step", "fragments": {name: {moment: flat fragment}}}."""
    base = state["base_optimizer_state"]
    if not isinstance(base, dict) or any(any(p) for p in state.get("param_alignment_paddings", [])):
        raise DeepSpeedVersionError(_advice("a ZeRO optimizer state in a layout llamoe cannot reshard was found"))
    groups = []
    for g, mapping in enumerate(state["param_slice_mappings"]):
        flat = base["state"].get(g, {})
        fragments = {
            name: {m: flat[m].narrow(0, address.start, address.numel) for m in MOMENTS if m in flat}
            for name, address in mapping.items()
        }
        groups.append({"step": flat.get("step"), "fragments": fragments})
    return groups


def zero_state_with_moments(
    state: dict[str, Any],
    group_names: list[list[str]],
    group_rank: list[int],
    weights: Callable[[str], torch.Tensor],
    moments: Callable[[str], dict[str, torch.Tensor]],
    step: torch.Tensor,
) -> dict[str, Any]:
    """`state`, this rank's freshly built ZeRO-1/2 state dict (`optimizer.state_dict()`), with AdamW moments.

    `group_names[g]`: the names of group g's parameters in order; `group_rank[g]`: this rank's index in
    g's data-parallel group; `weights(name)` / `moments(name)`: a parameter's fp32 weights / {moment:
    tensor} as this rank holds it, flattened. Each fragment's weights are checked against the optimizer's
    own fp32 partition, so a wrong offset fails loudly instead of loading shifted moments.
    """
    state = dict(state)
    base: dict[str, Any] = {"state": {}, "param_groups": state["base_optimizer_state"]["param_groups"]}
    for g, mapping in enumerate(state["param_slice_mappings"]):
        partition = state["single_partition_of_fp32_groups"][g]
        starts, offset = {}, 0
        for name in group_names[g]:
            starts[name] = offset
            offset += weights(name).numel()
        first = group_rank[g] * partition.numel()  # this rank's slice of the group's flat parameters
        entry: dict[str, Any] = {m: torch.zeros_like(partition) for m in MOMENTS}
        for name, address in mapping.items():
            lo, n = first + address.start - starts[name], address.numel
            if not torch.equal(weights(name).narrow(0, lo, n).to(partition), partition.narrow(0, address.start, n)):
                raise RuntimeError(f"resharding ZeRO state: the fragment of {name} does not line up with its weights")
            for m, full in moments(name).items():
                entry[m].narrow(0, address.start, n).copy_(full.narrow(0, lo, n))
        entry["step"] = step.clone()
        base["state"][g] = entry
    state["base_optimizer_state"] = base
    return state


__all__ = [
    "MOMENTS",
    "SUPPORTED",
    "DeepSpeedVersionError",
    "build_engine",
    "check_installed",
    "check_private_api",
    "check_version",
    "expert_parallel_group",
    "init_distributed",
    "installed_version",
    "zero_fragments",
    "zero_is_expert_group",
    "zero_state_with_moments",
]

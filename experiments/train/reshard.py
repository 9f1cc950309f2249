"""Resume a checkpoint under another process layout: world size, `ep_size` and ZeRO stage 0-2 may change.

A checkpoint's model state is already layout-free (model.pt, with the routed experts of every rank in
experts<e>.pt). Its optimizer state is not: each rank file holds what that rank's optimizer owned, in
that layout's shape (a torch AdamW state at ZeRO 0, the rank's slice of each flattened parameter group
at ZeRO 1-2, only its own experts under expert parallelism). Resharding goes through one layout-free
form, as DeepSpeed's universal checkpoint and torch.distributed.checkpoint do, but at load time, with
no conversion step and no second copy on disk:

    saved rank files --full_moments--> {parameter name: exp_avg, exp_avg_sq at full size} + the step
                     --local_state---> this rank's optimizer state in the new layout

Each rank file names the parameters of every optimizer group (`group_names`), so the old layout is
read without rebuilding it. Every rank holds the full moments once while loading (twice the model's
fp32 size in host memory). The data position is global (experiments/data/batches.py), so any rank's
copy serves every new rank. Supported: ZeRO 0-2, any ep_size, any world size the config allows; a
ZeRO-3 checkpoint or run resumes only under its own layout.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from llamoe.experiments.errors import UserError
from llamoe.experiments.train import deepspeed_compat
from llamoe.moe.layer import MoE

MOMENTS = deepspeed_compat.MOMENTS
Moments = dict[str, dict[str, torch.Tensor]]  # parameter name -> {moment: full flattened tensor}


class ReshardError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed under this process layout; the message says why and what to do."""


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in the group's order (saved with every rank file)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def expert_names(model: nn.Module) -> set[str]:
    """Names of the routed-expert parameters, which expert parallelism splits by rows (dim 0)."""
    return {
        f"{prefix}.experts.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, MoE)
        for name, _ in module.experts.named_parameters()
    }


def check_supported(path: Path, old: dict[str, int], new: dict[str, int], rank0: Mapping[str, Any]) -> None:
    """Refuse (ReshardError) a change of layout this module cannot resume exactly."""
    saved = (
        f"--nproc {old['world_size']} distributed.ep_size={old['ep_size']} distributed.zero_stage={old['zero_stage']}"
    )
    if 3 in (old["zero_stage"], new["zero_stage"]):
        raise ReshardError(
            f"{path} was saved with {saved}, this run has --nproc {new['world_size']} distributed.ep_size="
            f"{new['ep_size']} distributed.zero_stage={new['zero_stage']}: a ZeRO-3 run resumes only under "
            "its own layout; resume with the one it was saved with"
        )
    if "param_names" not in rank0:
        raise ReshardError(
            f"{path} predates layout-free resume (its rank files name no parameters); resume with {saved}"
        )


def full_moments(
    layout: dict[str, int], read_rank: Callable[[int], Mapping[str, Any]], experts: set[str]
) -> tuple[Moments, torch.Tensor]:
    """(every parameter's AdamW moments at full size, flattened; the AdamW step) from the rank files of a
    checkpoint saved under `layout` (world_size, ep_size, zero_stage); `read_rank(r)` reads rank r's file.

    Expert parameters are [E_l, ...] slices held by ep ranks 0..ep_size-1 (later expert-parallel groups
    hold copies), joined in ep-rank order. At ZeRO 1-2 a dense group is split over all ranks and an
    expert group over the ranks with the same ep rank, each in rank order.
    """
    world, ep, zero = layout["world_size"], layout["ep_size"], layout["zero_stage"]
    pieces: dict[str, dict[str, dict[int, list[torch.Tensor]]]] = defaultdict(lambda: defaultdict(dict))
    step = None
    for rank in range(world) if zero > 0 else range(ep):
        state = read_rank(rank)
        optimizer, ep_rank = state["optimizer"], rank % ep
        if zero == 0:
            by_index = [name for names in state["param_names"] for name in names]
            for index, saved in optimizer["state"].items():
                name = by_index[index]
                if rank == 0 or name in experts:
                    for m in MOMENTS:
                        pieces[name][m][ep_rank] = [saved[m].flatten()]
                    step = saved["step"]
            continue
        for group in deepspeed_compat.zero_fragments(optimizer):
            step = group["step"] if group["step"] is not None else step
            for name, fragment in group["fragments"].items():
                for m, t in fragment.items():
                    pieces[name][m].setdefault(ep_rank if name in experts else 0, []).append(t)
    if step is None:
        raise ReshardError("the checkpoint's optimizer holds no state (it was saved before its first step)")
    full = {
        name: {m: torch.cat([torch.cat(by_rank[e]) for e in sorted(by_rank)]) for m, by_rank in moments.items()}
        for name, moments in pieces.items()
    }
    return full, torch.as_tensor(step, dtype=torch.float32)


def local_state(
    fresh: dict[str, Any],
    names: list[list[str]],
    model: nn.Module,
    full: Moments,
    step: torch.Tensor,
    world: Any,
    zero_stage: int,
) -> dict[str, Any]:
    """This rank's optimizer state in the new layout: `fresh` (its optimizer's state_dict before any step)
    with the moments filled in; `names` are its groups' parameter names (`group_names`)."""
    params = dict(model.named_parameters())
    experts = expert_names(model)
    missing = sorted(set(params) - set(full))
    if missing:
        raise ReshardError(f"the checkpoint's optimizer state lacks {', '.join(missing[:3])}; it cannot be resharded")

    def moments(name: str) -> dict[str, torch.Tensor]:
        """The parameter's moments as this rank holds it: the whole, or its own experts' rows under EP."""
        n = params[name].numel()
        first = world.ep_rank * n if name in experts and world.ep_size > 1 else 0
        return {m: full[name][m].narrow(0, first, n).float() for m in MOMENTS}

    if zero_stage == 0:
        state = {**fresh, "state": {}}
        flat = [name for group in names for name in group]
        for index, name in enumerate(flat):
            p = params[name]
            state["state"][index] = {
                "step": step.clone(),
                **{m: t.view_as(p).clone() for m, t in moments(name).items()},
            }
        return state
    expert_group = deepspeed_compat.zero_is_expert_group(fresh)
    group_rank = [world.rank // world.ep_size if is_expert else world.rank for is_expert in expert_group]
    return deepspeed_compat.zero_state_with_moments(
        fresh, names, group_rank, lambda name: params[name].detach().flatten().float(), moments, step
    )


__all__ = ["ReshardError", "check_supported", "expert_names", "full_moments", "group_names", "local_state"]

"""Multi-process training: the launcher, process groups, expert parallelism and the DeepSpeed engine.

The model is built as plain single-device PyTorch; everything distributed is applied
afterwards, here, in this order:

1. `launch(nproc, ["llamoe.experiments.cli", "train", ...])` (what `llamoe train --nproc N` does)
   starts nproc local processes through DeepSpeed's launcher (`deepspeed.launcher.runner`),
   which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for every worker.
   On several nodes run DeepSpeed's launcher yourself with a hostfile (see the README).
2. `init_world(cfg)` in each worker joins the process group through DeepSpeed
   (gloo on CPU, NCCL on GPU) and, for `distributed.ep_size` > 1, creates DeepSpeed's
   expert-parallel and expert-data-parallel groups (group name "ep_size_<n>": ranks
   [0..n), [n..2n), ... hold one copy of all experts each; ranks with the same position
   in those groups hold the same experts).
3. `llamoe.models.build.build_model(..., ep_rank, ep_size, ep_group)` materialises only each rank's
   slice of the routed experts (`llamoe.moe.layer.MoE.set_expert_parallel`: tokens then reach
   their experts by all-to-all in moe/dispatch.py), and `mark_expert_params(model, world)`
   marks those parameters the way DeepSpeed's MoE expects (`allreduce = False`,
   `group_name`), so their gradients are averaged over the expert-data-parallel group
   instead of the whole world.
4. `DeepSpeedStepper` wraps `deepspeed`'s engine (ZeRO stage 0-3) around the model and
   a torch AdamW whose parameter groups are split into dense and MoE groups by
   `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`.

ZeRO-3 (dense models only; experiments/config.py refuses it for MoE, whose expert groups DeepSpeed
supports up to ZeRO-2) partitions the parameters themselves when the engine is built: each rank
keeps a 1/N slice of every parameter larger than DeepSpeed's `stage3_param_persistence_threshold`
(1e5 elements by default; smaller ones stay whole), and the engine's hooks all-gather them around
each module's forward and backward. The model is still built whole on every rank first (the one
build path), so ZeRO-3 shrinks the training state, not the build. `full_state_dict(...,
partitioned=True)` gathers one module at a time into rank 0's CPU copy for model.pt. An
expert-parallel model is saved without any gather (`sharded_state`): rank 0 writes every tensor but
the routed experts, and each rank of the first expert-parallel group writes its own experts.

Two things DeepSpeed does not do for a model whose MoE layers are not DeepSpeed's own
`deepspeed.moe.layer.MoE`, and what is done instead:

- The engine switches its expert-parallel gradient path on only when it finds its own
  MoE modules; `deepspeed_compat.build_engine` switches it on when expert parameters are marked.
- DeepSpeed's stage-0 gradient clipping averages per-rank gradient norms, which is not
  the global norm once ranks hold different experts. At stage 0 the engine's clipping is
  off and `clip_grad_norm` below computes the exact global norm (replicated parameters
  once, expert parameters summed over the expert-parallel group); the single-process loop
  clips with the same function. At stages 1-2 DeepSpeed's ZeRO optimizer clips with its
  own global norm, which sums every partition once, expert groups included.

bf16 runs use torch.autocast with fp32 weights, gradients and optimizer states in both
the single-process and the DeepSpeed path (DeepSpeed's own bf16 mode is not enabled), so
the two paths compute the same thing.

Every DeepSpeed private API (the expert-parallel groups, the engine subclass) lives in
experiments/train/deepspeed_compat.py, which checks the installed DeepSpeed release against the tested range.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from llamoe.experiments.config import RunConfig
from llamoe.experiments.train import collectives, deepspeed_compat
from llamoe.experiments.train.reshard import group_names
from llamoe.experiments.train.runctl import Aborted, forward_signals
from llamoe.moe.layer import MoE


@dataclass
class World:
    """This process's place in the run: rank, device, and its expert-parallel group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    ep_group_name: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            collectives.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or average, op="mean") `tensor` over all ranks, in place, on the backend's device; returns it."""
        return collectives.all_reduce(tensor, op) if self.distributed else tensor


def _leave_process_groups() -> None:
    """At interpreter exit, destroy the process groups (the world's and the expert-parallel ones): left to
    the interpreter's teardown, gloo's threads can abort a process whose run finished ("terminate called
    without an active exception", exit -6). No barrier: the program's last collective is already done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def set_tf32(enabled: bool) -> str:
    """Let CUDA fp32 matmuls and convolutions use TF32 (`train.tf32`), or keep them full fp32; returns the log line.

    The CUDA-only switches, not `torch.set_float32_matmul_precision`, which also changes CPU (oneDNN) matmuls.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return f"TF32 matmuls {'on' if enabled else 'off (full fp32)'} (train.tf32={str(enabled).lower()})"


def init_world(cfg: RunConfig) -> World:
    """Join the process group the launcher set up (if any) and create the expert-parallel groups.
    On CUDA, applies `train.tf32` and says so (rank 0)."""
    size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank if size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
        line = set_tf32(cfg.train.tf32)
        if _env_int("RANK", 0) == 0:
            print(line, flush=True)
    else:
        device = torch.device("cpu")
    if size == 1:
        return World(device=device)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the launcher does not split the cores between the local ranks; oversubscribing them is slow
        local_size = _env_int("LOCAL_SIZE", _env_int("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed_compat.init_distributed(backend)
    atexit.register(_leave_process_groups)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)
    ep = cfg.distributed.ep_size
    if ep > 1:
        world.ep_size = ep
        world.ep_group_name, world.ep_group, world.ep_rank = deepspeed_compat.expert_parallel_group(ep)
    return world


# ---------------------------------------------------------------------- expert parallelism
def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(param: nn.Parameter) -> bool:
    """True for routed-expert parameters sharded by expert parallelism (DeepSpeed's MoE marking)."""
    return getattr(param, "allreduce", True) is False


def mark_expert_params(model: nn.Module, world: World) -> None:
    """Mark the routed experts of a model built for this rank (models/build.py) for DeepSpeed (call
    before the optimizer)."""
    if world.ep_size == 1:
        return
    for layer in moe_layers(model):
        for param in layer.experts.parameters():
            param.allreduce = False  # type: ignore[attr-defined]
            param.group_name = world.ep_group_name  # type: ignore[attr-defined]


def full_state_dict(model: nn.Module, world: World, partitioned: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a model without expert parallelism on rank 0, {} elsewhere (an expert-parallel one
    saves per rank: `sharded_state`). `partitioned`: the parameters are ZeRO-3 partitions, gathered one module at a
    time (collective; complete on rank 0, {} elsewhere: `_gather_partitioned`)."""
    assert world.ep_size == 1, "an expert-parallel model is saved per rank (sharded_state)"
    if partitioned:
        return _gather_partitioned(model, world)
    if not world.is_main:  # only rank 0 writes model.pt: no other rank makes a host copy
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def sharded_state(
    model: nn.Module, world: World
) -> tuple[Optional[dict[str, torch.Tensor]], Optional[tuple[int, dict]]]:
    """What this rank writes of an expert-parallel model's checkpoint, with no collective and no gather:
    (rank 0: every tensor but the routed experts, else None; the ranks of the first expert-parallel
    group, [0, ep_size): (ep_rank, its routed experts [E_l, ...]), else None: the other groups hold
    copies of the same experts)."""
    expert_keys = {name for name, param in model.named_parameters() if is_expert_param(param)}
    rest = (
        {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in expert_keys} if world.is_main else None
    )
    if world.rank >= world.ep_size:
        return rest, None
    mine = {name: param.detach().cpu() for name, param in model.named_parameters() if name in expert_keys}
    return rest, (world.ep_rank, mine)


def _gather_partitioned(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The full state dict of a ZeRO-3 model on rank 0 ({} elsewhere), gathered one module at a time so
    no rank holds more than one module's full parameters beyond rank 0's CPU copy. Tied parameters
    stay one tensor under both names, as in `model.state_dict()`."""
    import deepspeed

    copies: dict[int, torch.Tensor] = {}  # id(param) -> rank 0's CPU copy
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params):  # all-gathers on entry, frees the gathered copies on exit
            if world.is_main:
                for param in params:
                    if id(param) not in copies:
                        copies[id(param)] = param.detach().cpu().clone()
    if not world.is_main:
        return {}
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    keys = model.state_dict(keep_vars=True).keys()  # the names and order of an unpartitioned state dict
    return {k: copies[id(params[k])] if k in params else buffers[k].detach().cpu() for k in keys}


# ---------------------------------------------------------------------- gradient norm
def _by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squared L2 norms of `grads`, fp32 on `device`: one `torch._foreach_norm` per (device,
    dtype) group, accumulating in fp32 from the gradients' own dtype instead of copying each to fp32."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in _by_device_and_dtype(grads).values():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)  # one fp32 scalar per tensor
        total += torch.stack(norms).square().sum().to(device)
    return total


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float, world: World) -> torch.Tensor:
    """Clip gradients (already averaged over data-parallel ranks) to global L2 norm `max_norm`; return the norm.

    Replicated parameters count once; expert parameters differ between the ranks of an
    expert-parallel group, so their squared norms are summed over that group. max_norm 0
    only measures. Norms and the scaling run as foreach kernels grouped by device and dtype
    (as torch.nn.utils.clip_grad_norm_ does), with fp32 accumulation.
    """
    params = [p for p in params if p.grad is not None]
    dense = [p.grad.detach() for p in params if not is_expert_param(p)]
    expert = [p.grad.detach() for p in params if is_expert_param(p)]
    device = params[0].grad.device if params else world.device
    dense_sq, expert_sq = _squared_norm(dense, device), _squared_norm(expert, device)
    if world.ep_size > 1:
        collectives.all_reduce(expert_sq, group=world.ep_group)
    norm = (dense_sq + expert_sq).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for (grad_device, _), group in _by_device_and_dtype(dense + expert).items():
            torch._foreach_mul_(group, scale.to(grad_device))
    return norm


# ---------------------------------------------------------------------- DeepSpeed engine
def deepspeed_config(cfg: RunConfig, world: World) -> dict[str, Any]:
    """The ds_config this run uses: batch layout, ZeRO stage, fp32 (autocast handles bf16), clipping."""
    zero: dict[str, Any] = {"stage": cfg.distributed.zero_stage}
    if cfg.distributed.zero_stage > 0:
        # DeepSpeed's MoE support in ZeRO asserts reduce_scatter and contiguous gradients
        zero.update(reduce_scatter=True, contiguous_gradients=True, overlap_comm=world.device.type == "cuda")
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch(world.size),
        "gradient_accumulation_steps": cfg.grad_accum_steps(world.size),
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip if cfg.distributed.zero_stage > 0 else 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split optimizer parameter groups into dense and per-expert-group MoE groups, as DeepSpeed's ZeRO needs."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


class DeepSpeedStepper:
    """Forward, backward and optimizer step through a DeepSpeed engine (ZeRO 0-3, expert parallelism)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, world: World) -> None:
        """Build the engine in `init_world`'s process group; marked expert parameters (`mark_expert_params`)
        get DeepSpeed's MoE gradient handling (DeepSpeed detects only its own MoE modules)."""
        self.param_names = group_names(model, optimizer)  # before the engine flattens the groups
        self.engine = deepspeed_compat.build_engine(
            model,
            optimizer,
            deepspeed_config(cfg, world),
            expert_parallel=any(is_expert_param(p) for p in model.parameters()),
        )
        self.world = world
        self.zero_stage = cfg.distributed.zero_stage
        self.grad_clip = cfg.optim.grad_clip
        self.base_optimizer = optimizer  # its param_groups carry the learning rate

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, tokens: torch.Tensor) -> Any:
        return self.engine(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's mean loss; DeepSpeed divides by the accumulation steps.

        DeepSpeed counts micro batches in `engine.step()`, which must follow every backward: inside an
        accumulation window it only advances that count (the next backward then knows whether it ends the
        window and must reduce the gradients); the window's last backward is followed by `step()` below.
        """
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        """Clip, step the optimizer, clear gradients; return the global gradient norm before clipping.
        Called once per optimizer step, after the backward of its last micro batch."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedStepper.step() called inside a gradient accumulation window")
        if self.zero_stage == 0:
            norm = float(clip_grad_norm(self.engine.module.parameters(), self.grad_clip, self.world))
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed's ZeRO optimizer reported no gradient norm for this step")
        return float(norm)

    def set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state (its ZeRO partition at stages 1-3, with its fp32 parameter partition;
        its experts' moments under EP)."""
        return self.engine.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any], resharded: bool = False) -> None:
        """Load this rank's saved state; `resharded` (experiments/train/reshard.py): built for this layout from
        another one, whose fp32 partitions are then taken from the model's (fp32) weights."""
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(state)
            return
        # ZeRO reads the entry of this data-parallel rank; fp32 partitions come from the checkpoint (ZeRO-3
        # always restores them, and re-partitions the parameters it keeps whole from them)
        states: list[Any] = [None] * self.world.size
        states[self.world.rank] = state
        self.engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=not resharded)


# ---------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, program: list[str], module: bool = True, timeout: float | None = None) -> int:
    """Run `program` in `nproc` local worker processes through DeepSpeed's launcher; return its exit status.

    `program` is a module and its arguments (`["llamoe.experiments.cli", "train", ...]`), or with
    module=False a script path and its arguments. Workers run this interpreter, so they import the same llamoe.
    The launcher runs in its own session, so a terminal's Ctrl-C reaches this process only; SIGTERM
    and SIGINT are passed on once to every worker (experiments/train/runctl.py), so each saves and stops.
    With `timeout` (seconds), a launch still running then is killed whole and TimeoutError raised, so a
    hung collective fails a test instead of stalling it.
    """
    deepspeed_compat.check_installed()  # one clear error here rather than one per worker
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={nproc}",
        f"--master_port={_free_port()}",
        "--no_local_rank",
        "--log_level=warning",
        *(["--module"] if module else []),
        *program,
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        with forward_signals(proc.pid):
            return proc.wait(timeout)
    except Aborted:  # a second signal: the workers were told to abort too
        return proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(f"{nproc} workers of {' '.join(program)} still running after {timeout:.0f} s") from None


__all__ = [
    "DeepSpeedStepper",
    "World",
    "clip_grad_norm",
    "deepspeed_config",
    "full_state_dict",
    "init_world",
    "is_expert_param",
    "launch",
    "mark_expert_params",
    "moe_layers",
    "moe_param_groups",
    "set_tf32",
    "sharded_state",
]

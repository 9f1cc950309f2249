"""The one training loop, for a single process or DeepSpeed workers (`llamoe train`).

One optimizer step on each rank:
    batch [B_rank, L] of packed windows -> split into micro batches of train.micro_batch_size
    per micro batch: logits = model(tokens); loss = cross-entropy + MoE aux losses; backward
    clip the global gradient norm (optim.grad_clip), AdamW step, aux-loss-free bias update
The global batch train.batch_size (in sequences) is the same whatever the number of
processes and micro batch size, and so are the data it sees (see experiments/data/batches.py).

Optimizer (see OptimConfig): AdamW with decoupled weight decay on matrices only. Norm
gains are scale parameters that decay would pull towards zero, and embedding rows of rare
tokens get few gradient updates, so decay would mostly erase them; neither is decayed.
The learning rate is a pure function of the step (linear warmup, cosine decay) and of the
schedule's horizon, fixed when the run starts and kept in every checkpoint (`optim.schedule_horizon`):
a checkpoint restores the schedule, and an extended run (a larger train.max_steps) continues it.

Outputs in run_dir: config.yaml (resolved), metrics.jsonl (one JSON object per logged
step, see `train_metrics.TrainingLog`; written and read by experiments/train/metrics_log.py), checkpoints/
(experiments/train/checkpoint.py). Progress: a tqdm bar on an interactive terminal, plain log
lines otherwise. A non-finite loss or gradient norm stops the run with `TrainingDiverged`
before the optimizer applies it.

Stopping early (experiments/train/runctl.py): the process that trains holds the run directory's lock
(rank 0 under --nproc). SIGTERM or SIGINT, or `train.time_limit_s` running out, finishes the
current step, saves a checkpoint on every rank and raises `Stopped`; the exit status is 143
(SIGTERM), 130 (SIGINT) or 124 (time limit), and rerunning the same command resumes exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamoe.experiments.config import ConfigError, RunConfig
from llamoe.experiments.data.batches import MixedBatches, PackedBatches, ResumableBatches, ValidationBatches
from llamoe.experiments.data.corpus import Corpus, load_corpus
from llamoe.experiments.data.task_mix import task_sources
from llamoe.experiments.data.tasks import IGNORE_INDEX
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import UserError
from llamoe.experiments.train import checkpoint as ckpt_io
from llamoe.experiments.train import init_from, metrics_log, preflight, reshard, routing_health, runctl
from llamoe.experiments.train.distributed import (
    World,
    full_state_dict,
    init_world,
    mark_expert_params,
    sharded_state,
)
from llamoe.experiments.train.optim import LocalStepper, Stepper, build_optimizer, lr_at, schedule_horizon
from llamoe.experiments.train.train_metrics import RouterStats, TrainingLog, peak_memory_gib
from llamoe.models.build import build_model
from llamoe.models.compile import compile_blocks
from llamoe.models.loss import lm_cross_entropy
from llamoe.models.transformer import ModelOutput
from llamoe.moe.balance import BiasBalancer


class TrainingDiverged(UserError, RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


# ---------------------------------------------------------------------- data
def run_corpus(cfg: RunConfig, tokenizer: Tokenizer, split: str) -> Corpus:
    """One split of the run's corpus; with data.bos every document starts with the tokenizer's bos."""
    d = cfg.data
    if d.bos and tokenizer.bos_id is None:
        raise ConfigError("data.bos", f"the {cfg.tokenizer.kind} tokenizer defines no bos token; set data.bos=false")
    return load_corpus(d.source, tokenizer, split, d.cache_dir, val_fraction=d.val_fraction, bos=d.bos)


def train_batches(cfg: RunConfig, tokenizer: Tokenizer, world: World) -> ResumableBatches:
    """This rank's endless training batches of batch_size / world_size sequences: the corpus, mixed
    with synthetic task batches when data.tasks asks for them."""
    corpus = run_corpus(cfg, tokenizer, "train")
    t, per_rank = cfg.train, cfg.train.batch_size // world.size
    packed = PackedBatches(corpus, t.seq_len, per_rank, t.seed, world.rank, world.size)
    mix = cfg.data.tasks
    if not mix.weights():
        return packed
    sources: list[tuple[ResumableBatches, float]] = []
    if mix.corpus_weight > 1e-9:
        sources.append((packed, mix.corpus_weight))
    sources += task_sources(mix, tokenizer, t.seq_len, per_rank, t.seed, world.rank, world.size, corpus.tokens)
    return MixedBatches(sources, t.seed)


def val_batches(cfg: RunConfig, tokenizer: Tokenizer, world: World) -> ValidationBatches:
    """The fixed validation windows of this rank, in micro batches."""
    corpus = run_corpus(cfg, tokenizer, "val")
    return ValidationBatches(
        corpus, cfg.train.seq_len, cfg.micro_batch(world.size), cfg.train.val_batches, world.rank, world.size
    )


def lm_loss(out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the positions whose target is not IGNORE_INDEX
    (task batches train on their answers only), head and loss in chunks (models/loss.py)."""
    return lm_cross_entropy(out, targets, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def validation_loss(model: nn.Module, batches: ValidationBatches, world: World, autocast: Any) -> float:
    """Mean cross-entropy over the validation windows of all ranks."""
    model.eval()
    total = torch.zeros(2, device=world.device, dtype=torch.float64)  # [sum of row losses, rows]
    for inputs, targets in batches:
        inputs, targets = inputs.to(world.device), targets.to(world.device)
        with autocast:
            out = model(inputs)
        total[0] += lm_loss(out, targets).double() * inputs.shape[0]
        total[1] += inputs.shape[0]
    model.train()
    world.all_reduce(total)
    return float(total[0] / total[1])


# ---------------------------------------------------------------------- the loop
def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run `cfg` describes; return a summary.

    Summary keys: run_dir, steps, final_loss (last logged training loss), val_loss (at the
    last step), tokens, tokens_per_s (this invocation's mean), params, active_params,
    flops_per_token (training FLOPs per token at train.seq_len), wall_s.
    Run under DeepSpeed's launcher (WORLD_SIZE > 1) it trains data parallel, with ZeRO and
    expert parallelism as configured. Stopped early (signal, time limit) it saves and raises
    runctl.Stopped; a run directory another process trains in raises runctl.RunLocked. What the config needs
    of this machine (files, CUDA, init_from's source) is checked first (experiments/train/preflight.py).
    """
    t0 = time.perf_counter()
    preflight.check(cfg)
    world = init_world(cfg)
    owner = runctl.DirLock(cfg.run_dir) if world.is_main else nullcontext()
    with owner, runctl.StopSignals(announce=world.is_main) as signals:
        if world.is_main:
            ckpt_io.remove_stale(cfg.run_dir)
        return _train(cfg, world, runctl.StopControl(signals, cfg.train.time_limit_s, t0), t0)


def _train(cfg: RunConfig, world: World, control: runctl.StopControl, t0: float) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "params": cfg.model.num_params(),
        "active_params": cfg.model.num_active_params(),
        "flops_per_token": cfg.model.flops_per_token(cfg.train.seq_len),
    }

    resume_path = ckpt_io.latest_checkpoint(run_dir)
    horizon = schedule_horizon(cfg.optim, cfg.train.max_steps, None)
    if resume_path is not None:
        meta = ckpt_io.read_meta(resume_path)
        saved_cfg = ckpt_io.load_config(resume_path)
        ckpt_io.check_resumable(resume_path, saved_cfg, cfg)
        started_with = meta.get("lr_horizon", saved_cfg.optim.decay_steps or saved_cfg.train.max_steps)
        horizon = schedule_horizon(cfg.optim, cfg.train.max_steps, started_with)
        if world.is_main and horizon < cfg.train.max_steps and not cfg.optim.decay_steps:
            print(
                f"the learning-rate schedule keeps the horizon this run started with ({horizon} steps): steps past "
                f"it run at lr * min_lr_ratio = {lr_at(horizon, cfg.optim, horizon):.3g}; set optim.decay_steps to "
                "stretch the cosine instead (the learning rate then jumps to that schedule's value)",
                flush=True,
            )
        if meta["step"] >= cfg.train.max_steps:
            rows = metrics_log.read_metrics(run_dir)
            if world.is_main:
                step, max_steps = meta["step"], cfg.train.max_steps
                print(f"{resume_path} is at step {step} >= train.max_steps={max_steps}; nothing to do")
            vals = [r["val_loss"] for r in rows if "val_loss" in r]
            return {
                **summary,
                "steps": meta["step"],
                "final_loss": rows[-1]["loss"] if rows else None,
                "val_loss": vals[-1] if vals else None,
                "tokens": meta["tokens"],
                "tokens_per_s": None,
                "wall_s": time.perf_counter() - t0,
            }
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")

    tokenizer = cfg.tokenizer.build()
    batches = train_batches(cfg, tokenizer, world)
    validation = val_batches(cfg, tokenizer, world)

    torch.manual_seed(cfg.train.seed)
    state, saved_layout = None, None
    layout = {"world_size": world.size, "ep_size": world.ep_size, "zero_stage": cfg.distributed.zero_stage}
    if resume_path is not None:
        saved_layout = {key: int(meta.get(key, 0)) for key in layout}
        same = saved_layout == layout
        source = world.rank if same else min(world.rank, saved_layout["world_size"] - 1)  # data position: global
        state = ckpt_io.load_checkpoint(resume_path, source, lambda ok: runctl.all_ok(ok, world.distributed))
        if not same:
            reshard.check_supported(resume_path, saved_layout, layout, state.rank_state)
    model = build_model(  # this rank's experts only; a resume reads only those of the checkpoint
        cfg.model,
        device=world.device,
        seed=cfg.train.seed,
        state_dict=state.model if state is not None else None,
        ep_rank=world.ep_rank,
        ep_size=world.ep_size,
        ep_group=world.ep_group,
    )
    if state is None and cfg.init_from:  # weights only; optimizer, schedule and data start fresh
        loaded = init_from.load(model, cfg)  # experiments/train/init_from.py: copies, upcycles, prints what it did
        if world.is_main:
            print(loaded, flush=True)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)  # models/checkpointing.py
    if cfg.train.compile:
        compile_blocks(model)  # models/compile.py
    mark_expert_params(model, world)
    optimizer = build_optimizer(model, cfg, world)
    stepper: Stepper
    if world.distributed:
        from llamoe.experiments.train.distributed import DeepSpeedStepper

        stepper = DeepSpeedStepper(model, optimizer, cfg, world)
    else:
        stepper = LocalStepper(model, optimizer, cfg, world)

    start = 0
    if state is not None:
        moved = ""
        if saved_layout == layout:
            stepper.load_optimizer_state(state.rank_state["optimizer"])
        else:
            _load_resharded(stepper, state.path, saved_layout, world, cfg.distributed.zero_stage)
            moved = ", resharded from {world_size} process(es), ep_size {ep_size}, ZeRO {zero_stage}".format(
                **saved_layout
            )
        batches.load_state_dict(state.rank_state["data"])
        ckpt_io.set_rng_state(state.rank_state["rng"])
        start = state.step
        if world.is_main:
            print(f"resuming from {state.path} at step {start}{moved}", flush=True)
        del state

    metrics = TrainingLog(cfg, world, start)
    try:
        result = _loop(cfg, world, stepper, batches, validation, metrics, start, horizon, control)
    finally:
        metrics.close()
    if world.is_main and (health := routing_health.summarize(metrics_log.read_metrics(run_dir))):
        print(routing_health.describe(health), flush=True)
    return {**summary, **result, "wall_s": time.perf_counter() - t0}


def _load_resharded(stepper: Stepper, path: Path, saved: dict[str, int], world: World, zero_stage: int) -> None:
    """Load a checkpoint's optimizer state saved under another process layout (experiments/train/reshard.py)."""
    model = stepper.module
    full, step = reshard.full_moments(saved, lambda r: ckpt_io.read_rank_state(path, r), reshard.expert_names(model))
    fresh = stepper.optimizer_state()
    stepper.load_optimizer_state(
        reshard.local_state(fresh, stepper.param_names, model, full, step, world, zero_stage), resharded=True
    )


def _loop(
    cfg: RunConfig,
    world: World,
    stepper: Stepper,
    batches: ResumableBatches,
    validation: ValidationBatches,
    metrics: TrainingLog,
    start: int,
    horizon: int,
    control: runctl.StopControl,
) -> dict[str, Any]:
    t = cfg.train
    model = stepper.module
    model.train()
    micro = cfg.micro_batch(world.size)
    accum = cfg.grad_accum_steps(world.size)
    tokens_per_step = t.batch_size * t.seq_len
    bf16 = t.precision == "bf16"
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    router = RouterStats()
    balancer = BiasBalancer.of(model, world.all_reduce)
    config_yaml = cfg.to_yaml()  # saved with every checkpoint

    window_losses = torch.zeros(2, dtype=torch.float64)  # [cross-entropy, aux] summed over the window's steps
    window_steps, window_start = 0, time.perf_counter()
    run_start, val_loss, last_row = time.perf_counter(), None, None
    for step in range(start, t.max_steps):
        step_start = time.perf_counter()
        lr = lr_at(step, cfg.optim, horizon)
        stepper.set_lr(lr)
        inputs, targets = next(batches)
        losses = torch.zeros(2, device=world.device)  # [cross-entropy, aux] summed over micro batches
        for x, y in zip(inputs.split(micro), targets.split(micro)):
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            with autocast:
                out = stepper.forward(x)
            ce = lm_loss(out, y)
            stepper.backward(ce + out.aux_loss)
            losses += torch.stack([ce.detach(), out.aux_loss.detach().float()])
            router.add(out.router_stats)
        ce_loss, aux_loss = world.all_reduce(losses / accum, "mean").tolist()
        if not math.isfinite(ce_loss + aux_loss):
            raise TrainingDiverged(
                f"step {step + 1}: the loss is not finite (cross-entropy {ce_loss}, aux {aux_loss}) at lr {lr:.3g}; "
                "the optimizer step was not applied. Lower optim.lr or raise optim.warmup_steps, then resume "
                "from the last checkpoint (rerun the same command) or start a new run_dir"
            )
        grad_norm = stepper.step()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"step {step + 1}: the gradient norm is {grad_norm} (loss {ce_loss:.4f}); lower optim.lr or set "
                "optim.grad_clip, then rerun from the last checkpoint"
            )
        balancer.step()  # aux-loss-free bias update (moe/balance.py)

        done = step + 1
        window_losses += torch.tensor([ce_loss, aux_loss], dtype=torch.float64)
        window_steps += 1
        elapsed = time.perf_counter() - window_start
        metrics.step_done(ce_loss, window_steps * tokens_per_step / max(elapsed, 1e-9))
        last = done == t.max_steps
        validate_now = last or (t.val_every > 0 and done % t.val_every == 0)
        if validate_now or done % t.log_every == 0:
            row: dict[str, Any] = {
                "step": done,
                "loss": float(window_losses[0] / window_steps),
                "aux_loss": float(window_losses[1] / window_steps),
                "lr": lr,
                "tokens": done * tokens_per_step,
                "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                "grad_norm": grad_norm,
                "elapsed_s": time.perf_counter() - run_start,
                "peak_mem_gib": peak_memory_gib(world.device),
            }
            if validate_now:
                val_loss = validation_loss(model, validation, world, autocast)
                row["val_loss"] = val_loss
            row.update(router.reduce(world))
            metrics.write(row)
            last_row = row
            window_losses.zero_()
            window_steps, window_start = 0, time.perf_counter()
        save_now = last or (t.save_every > 0 and done % t.save_every == 0)
        if save_now:
            _save(cfg, config_yaml, world, stepper, batches, done, done * tokens_per_step, horizon, control)
        status = 0 if last else control.should_stop(time.perf_counter() - step_start, world.distributed)
        if status:
            if not save_now:
                _save(cfg, config_yaml, world, stepper, batches, done, done * tokens_per_step, horizon, control)
            raise control.stopped(status, done, t.max_steps, Path(cfg.run_dir) / ckpt_io.CHECKPOINTS / f"step_{done}")

    trained = t.max_steps - start
    return {
        "steps": t.max_steps,
        "final_loss": last_row["loss"] if last_row else None,
        "val_loss": val_loss,
        "tokens": t.max_steps * tokens_per_step,
        "tokens_per_s": trained * tokens_per_step / max(time.perf_counter() - run_start, 1e-9),
    }


def _save(
    cfg: RunConfig,
    config_yaml: str,
    world: World,
    stepper: Stepper,
    batches: ResumableBatches,
    step: int,
    tokens: int,
    horizon: int,
    control: runctl.StopControl,
) -> None:
    started = time.perf_counter()
    shard = None
    if world.ep_size > 1:  # each expert-parallel rank writes its own experts: nothing is gathered
        model_state, shard = sharded_state(stepper.module, world)
    else:
        model_state = full_state_dict(stepper.module, world, partitioned=cfg.distributed.zero_stage == 3)
    ckpt_io.save_checkpoint(
        cfg.run_dir,
        step,
        model_state=model_state if world.is_main else None,
        rank_state=_rank_state(cfg, world, stepper, batches),
        meta={
            "tokens": tokens,
            "lr_horizon": horizon,
            "world_size": world.size,
            "ep_size": world.ep_size,
            "expert_shards": world.ep_size if world.ep_size > 1 else 0,
            "zero_stage": cfg.distributed.zero_stage,
        },
        config_yaml=config_yaml,
        expert_shard=shard,
        rank=world.rank,
        barrier=world.barrier,
        all_ok=lambda ok: runctl.all_ok(ok, world.distributed),
        keep=cfg.train.keep_checkpoints,
    )
    control.saved(time.perf_counter() - started)


def _rank_state(cfg: RunConfig, world: World, stepper: Stepper, batches: ResumableBatches) -> dict[str, Any]:
    """What this rank writes to rank<r>.pt: the optimizer state only where it is unique (every rank at ZeRO
    >= 1; at ZeRO 0 the first expert-parallel group, which holds every expert once), a pointer elsewhere."""
    state: dict[str, Any] = {
        "data": batches.state_dict(),
        "rng": ckpt_io.rng_state(),
        "param_names": stepper.param_names,
    }
    if cfg.distributed.zero_stage > 0 or world.rank < world.ep_size:
        state["optimizer"] = stepper.optimizer_state()
    else:
        state["optimizer_from"] = world.rank % world.ep_size
    return state

"""What a training run logs: router-stat windows, peak memory, and the console + metrics.jsonl +
TensorBoard sink of rank 0 (the rows' format is TrainingLog's docstring; metrics_log.py reads and
writes the file, tensorboard_log.py mirrors it).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from llamoe.experiments.config import RunConfig
from llamoe.experiments.train import metrics_log
from llamoe.experiments.train.distributed import World
from llamoe.experiments.train.tensorboard_log import TensorBoardLog


class RouterStats:
    """Sums the per-layer router stats of a logging window (counts summed, everything else averaged)."""

    COUNTS = ("tokens_per_expert",)

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.n = 0

    def add(self, stats: dict[int, dict[str, torch.Tensor]]) -> None:
        if not stats:
            return
        self.n += 1
        for layer, layer_stats in stats.items():
            acc = self.sums.setdefault(layer, {})
            for name, value in layer_stats.items():
                value = value.detach().double()
                acc[name] = acc[name] + value if name in acc else value.clone()

    def reduce(self, world: World) -> dict[str, Any]:
        """Metrics fields: `router` {layer: {stat: value}} plus layer means/maxima; resets the window."""
        if not self.sums:
            return {}
        keys = [(layer, name) for layer in sorted(self.sums) for name in sorted(self.sums[layer])]
        flat = torch.cat([self.sums[layer][name].reshape(-1) for layer, name in keys])
        world.all_reduce(flat)  # every rank logs the same steps, so the stats line up
        router: dict[str, dict[str, Any]] = {}
        offset = 0
        for layer, name in keys:
            size = self.sums[layer][name].numel()
            value = flat[offset : offset + size]
            offset += size
            if name not in self.COUNTS:
                value = value / (self.n * world.size)
            as_list = size > 1 or name in self.COUNTS
            router.setdefault(str(layer), {})[name] = value.tolist() if as_list else float(value)
        self.sums, self.n = {}, 0
        out: dict[str, Any] = {}
        for name in ("load_imbalance", "dropped_frac", "router_entropy"):
            values = [s[name] for s in router.values() if name in s]
            if values:
                out[name] = sum(values) / len(values)
        if "load_imbalance" in out:
            out["load_imbalance_max"] = max(s["load_imbalance"] for s in router.values())
        out["router"] = router
        return out


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far, in GiB: torch's max allocated bytes on a CUDA device, the
    maximum resident set size (RSS) on CPU. Both are high-water marks over the process's life: a
    metrics row counts every earlier step and checkpoint save, not its own step's save (a step's row
    is logged before its save gathers the full model)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    per_kib = 1024 if sys.platform == "darwin" else 1  # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_kib / 2**20


class TrainingLog:
    """metrics.jsonl (rank 0) plus the console: a tqdm bar on a terminal, plain lines otherwise.

    Row fields: step, loss (mean cross-entropy over the steps since the previous row),
    aux_loss (same, weighted MoE aux losses), lr, tokens (seen so far, all ranks),
    tokens_per_s (since the previous row), grad_norm (of the last step, before clipping),
    elapsed_s, peak_mem_gib (rank 0's peak memory so far, taken before the row's validation:
    max RSS on CPU, max allocated on CUDA; see `peak_memory_gib`), val_loss (on validation
    steps), and for MoE models load_imbalance (max/mean expert load, mean over layers),
    load_imbalance_max, dropped_frac, router_entropy and `router`: {layer: {tokens_per_expert:
    [...], ...every router stat}}.
    """

    def __init__(self, cfg: RunConfig, world: World, start_step: int) -> None:
        self.enabled = world.is_main
        self.run_dir = cfg.run_dir
        self.max_steps = cfg.train.max_steps
        self.bar = None
        self.tb: TensorBoardLog | None = None
        if self.enabled:
            metrics_log.truncate(self.run_dir, start_step)
            if cfg.train.tensorboard:  # mirrors the rows; events after the checkpoint's step are purged
                self.tb = TensorBoardLog(self.run_dir, purge_step=start_step + 1)
            show = cfg.train.progress if cfg.train.progress is not None else sys.stderr.isatty()
            if show:
                from tqdm import tqdm

                self.bar = tqdm(total=self.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def step_done(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics_log.append(self.run_dir, row)
        if self.tb is not None:
            self.tb.write_row(row)
        if self.bar is None or "val_loss" in row:
            val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
            moe = f" | imbalance {row['load_imbalance']:.2f}" if "load_imbalance" in row else ""
            self.say(
                f"step {row['step']}/{self.max_steps} | loss {row['loss']:.4f}{val} | lr {row['lr']:.2e} | "
                f"grad {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s{moe}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

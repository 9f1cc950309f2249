"""peak_mem_gib in metrics.jsonl: plausible in one process, and lowered by expert parallelism by the
expert state it shards (issue 14's acceptance relation at test scale; the full-scale figures are in
benchmarks/RESULTS.md).

Expert state = routed-expert parameters x (4 bytes weight + 4 gradient + 8 Adam moments). EP=2 on 2
ranks keeps half the experts per rank, so rank 0's peak must fall by a good part of that state.
"""

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.models.transformer import Transformer
from llamoe.moe.experts.base import Experts

Args = Callable[..., list[str]]


def _vm_hwm_gib() -> float:
    """This process's peak RSS from /proc (an independent reading of what ru_maxrss reports)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise AssertionError("no VmHWM in /proc/self/status")


def _expert_params(overrides: list[str]) -> tuple[int, int]:
    """(routed-expert parameters, all parameters) of the model these overrides describe."""
    with torch.device("meta"):
        model = Transformer(load_run_config(None, overrides).model)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    return experts, sum(p.numel() for p in model.parameters())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_metrics_rows_carry_a_plausible_peak_memory(tmp_path: Path, run_args: Args, tiny_moe: list[str]) -> None:
    cfg = load_run_config(None, run_args(tmp_path / "run", *tiny_moe, "train.max_steps=3"))
    train(cfg)
    peaks = [r["peak_mem_gib"] for r in read_metrics(tmp_path / "run")]
    state_gib = cfg.model.num_params() * 16 / 2**30  # weights, gradients and both Adam moments were live
    assert len(peaks) == 3 and peaks == sorted(peaks)  # a high-water mark
    assert state_gib < peaks[0] <= peaks[-1] <= _vm_hwm_gib(), (peaks, state_gib)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_counts_the_training_state(tmp_path: Path, run_args: Args, tiny_moe: list[str]) -> None:
    cfg = load_run_config(None, run_args(tmp_path / "run", *tiny_moe, "train.max_steps=2", "train.device=cuda"))
    torch.cuda.reset_peak_memory_stats()
    train(cfg)
    peak = read_metrics(tmp_path / "run")[-1]["peak_mem_gib"]
    state_gib = cfg.model.num_params() * 16 / 2**30  # allocated by torch: nothing else counts on CUDA
    assert state_gib < peak < state_gib + 1.0, (peak, state_gib)


@pytest.mark.distributed
@pytest.mark.slow  # two launches: 37 s alone, 62 s beside other jobs on a loaded 2-core machine
def test_expert_parallelism_lowers_peak_memory_by_the_sharded_expert_state(
    tmp_path: Path, run_args: Args, tiny_moe: list[str]
) -> None:
    """Two fresh 2-process runs (ru_maxrss never goes down, so they cannot share a process)."""
    big_experts = [*tiny_moe, "model.moe.num_experts=8", "model.moe.expert_hidden_dim=4096", "train.max_steps=2"]
    experts, total = _expert_params(run_args(tmp_path / "x", *big_experts))
    assert experts > 0.8 * total  # the experts hold most of the parameters
    peaks = {}
    for ep in (2, 1):
        run = tmp_path / f"ep{ep}"
        assert cli_main(["/dev/null", *run_args(run, *big_experts, f"distributed.ep_size={ep}"), "--nproc", "2"]) == 0
        peaks[ep] = max(r["peak_mem_gib"] for r in read_metrics(run))  # rows precede the final save's gather
    expert_state_gib = experts * 16 / 2**30
    assert peaks[1] - peaks[2] >= 0.3 * expert_state_gib, (peaks, expert_state_gib)

"""Collectives on the backend's device: NCCL takes CUDA tensors only, so a stop flag or a save
agreement built on the CPU kills a GPU run after its first step. Gloo accepts anything, so the
check is made on every collective a CPU run issues (collective_check_worker.py)."""

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from llamoe.experiments.train import collectives
from llamoe.experiments.train.distributed import launch

WORKER = Path(__file__).resolve().parent / "collective_check_worker.py"
ALLOWED = {"experiments/train/collectives.py", "moe/dispatch.py", "deepspeed"}


@pytest.mark.distributed
@pytest.mark.slow
def test_every_training_collective_sits_on_the_backend_device(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_moe: list[str]
) -> None:
    """An expert-parallel run with accumulation, validation, router stats, bias balancing, a save and a
    resume: every collective llamoe issues goes through experiments/train/collectives.py (or is the MoE
    all-to-all), with its tensors on the device the backend takes."""
    args = run_args(tmp_path / "run", *tiny_moe, "distributed.ep_size=2", "train.micro_batch_size=2",
                    "model.moe.bias_balancing=true", "train.val_every=2", "train.save_every=2")  # fmt: skip
    plan = [[*args, "train.max_steps=2"], [*args, "train.max_steps=4"]]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "calls"
    out.mkdir()
    assert launch(2, [str(WORKER), str(tmp_path / "plan.json"), str(out)], module=False, timeout=600) == 0
    calls = [json.loads(line) for rank in (0, 1) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
    ours = [c for c in calls if c["by"] != "deepspeed"]
    assert {c["by"] for c in ours} <= ALLOWED, sorted({c["by"] for c in ours} - ALLOWED)
    assert [c for c in ours if c["devices"] not in ([], [c["required"]])] == []
    issued = {(c["by"], c["fn"]) for c in ours}  # the check saw the loop's collectives
    assert {("experiments/train/collectives.py", "all_reduce"), ("experiments/train/collectives.py", "barrier"),
            ("moe/dispatch.py", "all_to_all_single")} <= issued  # fmt: skip


def test_the_backend_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collectives.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.backend_device() == torch.device("cpu")


def test_collectives_without_a_process_group_return_their_input() -> None:
    assert not dist.is_initialized()
    t = torch.tensor([2.0, 3.0])
    assert collectives.all_reduce(t, "mean") is t and t.tolist() == [2.0, 3.0]
    assert collectives.agree_max(7) == 7 and collectives.all_true(False) is False

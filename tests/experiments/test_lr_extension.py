"""Extending a finished run (a larger train.max_steps in the same run_dir) continues its learning-rate
schedule: the horizon is fixed when the run starts and kept in the checkpoint, so the extra steps run at
the floor instead of a recomputed cosine that jumps back up (README: Training)."""

from pathlib import Path
from typing import Callable

import pytest

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.checkpoint import latest_checkpoint, read_meta
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.experiments.train.optim import lr_at


def test_an_extended_run_continues_its_schedule(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = run_args(tmp_path / "run", *tiny_dense, "optim.warmup_steps=2")
    assert cli_main(["/dev/null", *args, "train.max_steps=6"]) == 0
    assert cli_main(["/dev/null", *args, "train.max_steps=10"]) == 0
    assert "keeps the horizon this run started with (6 steps)" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    optim = load_run_config(None, args).optim
    floor = optim.lr * optim.min_lr_ratio
    assert lrs[:6] == [lr_at(s, optim, 6) for s in range(6)]
    assert lrs[6:] == pytest.approx([floor] * 4) and lrs[5] > floor  # the cosine ends at step 6
    assert read_meta(latest_checkpoint(tmp_path / "run"))["lr_horizon"] == 6  # a second extension keeps it too

    # an explicit decay_steps stretches the cosine instead: the learning rate follows that schedule
    assert cli_main(["/dev/null", *args, "train.max_steps=12", "optim.decay_steps=20"]) == 0
    tail = [r["lr"] for r in read_metrics(tmp_path / "run")][10:]
    assert tail == pytest.approx([lr_at(s, optim, 20) for s in (10, 11)]) and tail[0] > 2 * floor

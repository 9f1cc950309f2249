"""TensorBoard mirror of metrics.jsonl (train.tensorboard): the events read back equal the JSON log."""

import shutil
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard package (the `tb` extra) is not installed")

from llamoe.experiments.commands.eval import evaluate_run  # noqa: E402
from llamoe.experiments.config import load_run_config  # noqa: E402
from llamoe.experiments.train.loop import train  # noqa: E402
from llamoe.experiments.train.metrics_log import read_metrics  # noqa: E402
from llamoe.experiments.train.tensorboard_log import read_scalars  # noqa: E402


def test_events_equal_metrics_jsonl_across_a_resume_and_an_eval(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_moe: list[str]
) -> None:
    run_dir = tmp_path / "run"
    args = run_args(run_dir, *tiny_moe, "train.tensorboard=true", "train.val_every=2", "train.save_every=2")
    train(load_run_config(None, [*args, "train.max_steps=3"]))  # saves at 2 and at 3
    # as if the run died after logging step 3 but before saving it: resume from step 2
    shutil.rmtree(run_dir / "checkpoints" / "step_3")
    (run_dir / "checkpoints" / "latest").write_text("step_2\n")
    first_step3 = read_scalars(run_dir)["train/lr"][-1]
    train(load_run_config(None, [*args, "train.max_steps=4", "optim.lr=1e-3"]))  # steps 3-4 again, differently
    rows = read_metrics(run_dir)
    tb = read_scalars(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "load_imbalance"):
        assert [s for s, _ in tb[f"train/{key}"]] == [r["step"] for r in train_rows] == [1, 2, 3, 4], key
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx([r[key] for r in train_rows], rel=1e-6), key
    assert first_step3[0] == 3 and tb["train/lr"][2][1] != first_step3[1]  # the first step 3 was purged
    vals = [r for r in rows if "val_loss" in r]
    assert [s for s, _ in tb["train/val_loss"]] == [r["step"] for r in vals] == [2, 4]
    assert [v for _, v in tb["train/val_loss"]] == pytest.approx([r["val_loss"] for r in vals], rel=1e-6)
    layer = next(iter(train_rows[-1]["router"]))
    counts = train_rows[-1]["router"][layer]["tokens_per_expert"]
    share = tb[f"router/{layer}/expert_0_share"][-1]
    assert share == (4, pytest.approx(counts[0] / sum(counts), rel=1e-6))

    result, _ = evaluate_run(run_dir, [{"evals": ["ppl"], "lengths": [32], "sequences": 2, "plots": False}])
    assert read_scalars(run_dir)["eval/nll@32"] == [(4, pytest.approx(result["nll@32"], rel=1e-6))]

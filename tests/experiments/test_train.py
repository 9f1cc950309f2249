"""The training loop: schedule, parameter groups, a falling loss, metrics, accumulation, bf16, divergence."""

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import OptimConfig, load_run_config
from llamoe.experiments.train.loop import TrainingDiverged, train
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.experiments.train.optim import lr_at, param_groups
from llamoe.models import Transformer, presets

Args = Callable[..., list[str]]


def test_lr_schedule_warms_up_then_follows_the_cosine() -> None:
    o = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, o, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o, 20) == pytest.approx(1.0)
    assert lr_at(12, o, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(20, o, 20) == pytest.approx(0.1) and lr_at(50, o, 20) == pytest.approx(0.1)
    o = replace(o, decay_steps=36)  # a fixed horizon: the schedule no longer depends on max_steps
    assert lr_at(20, o, 20) == pytest.approx(0.1 + 0.9 * 0.5) == lr_at(20, o, 100)


def test_param_groups_exempt_norms_and_embeddings_from_decay() -> None:
    model = Transformer(presets.get("llama4-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(exempt) and decayed | exempt == set(names.values())
    assert "tok_embeddings.weight" in exempt and "norm.weight" in exempt and "layers.0.attention_norm.weight" in exempt
    assert {"output.weight", "layers.1.feed_forward.experts.w1", "layers.1.feed_forward.router.gate.weight"} <= decayed


def test_moe_training_loss_falls_and_metrics_are_complete(tmp_path: Path, run_args: Args, tiny_moe: list[str]) -> None:
    args = run_args(tmp_path / "run", *tiny_moe, "train.max_steps=30", "train.log_every=5", "train.val_every=15",
                    "optim.lr=3e-3", "model.moe.aux_loss_weight=0.01")  # fmt: skip
    cfg = load_run_config(None, args)
    summary = train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] == rows[-1]["val_loss"]
    assert "val_loss" in rows[2] and "val_loss" not in rows[1]
    for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm", "aux_loss", "load_imbalance",
                "load_imbalance_max", "dropped_frac", "router_entropy"):  # fmt: skip
        assert math.isfinite(rows[-1][key]), key
    assert rows[-1]["tokens"] == 30 * 8 * 32 and rows[-1]["aux_loss"] > 0
    # per-layer expert loads: every routed slot of the 5-step window is counted once (top-1)
    assert set(rows[-1]["router"]) == {"0", "1"}
    for layer in rows[-1]["router"].values():
        assert len(layer["tokens_per_expert"]) == 4 and sum(layer["tokens_per_expert"]) == 5 * 8 * 32
    assert summary["params"] == cfg.model.num_params() and summary["active_params"] < summary["params"]
    assert summary["flops_per_token"] == cfg.model.flops_per_token(32) and summary["tokens"] == 30 * 8 * 32
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "checkpoints" / "step_30").is_dir()


def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path, run_args: Args, tiny_moe: list[str]) -> None:
    losses = []
    for name, micro in (("full", "null"), ("accum", "2")):
        train(load_run_config(None, run_args(tmp_path / name, *tiny_moe, "train.max_steps=3",
                                             f"train.micro_batch_size={micro}")))  # fmt: skip
        losses.append([r["loss"] for r in read_metrics(tmp_path / name)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_autocast_and_progress_bar(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = run_args(tmp_path / "run", *tiny_dense, "train.max_steps=2", "train.precision=bf16", "train.progress=true")
    summary = train(load_run_config(None, args))
    assert math.isfinite(summary["final_loss"])
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2" in err  # the tqdm bar, when asked for


def test_plain_log_lines_without_a_terminal(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["/dev/null", *run_args(tmp_path / "run", *tiny_dense, "train.max_steps=2")]) == 0
    out = capsys.readouterr().out
    assert "step 1/2 | loss" in out and "step 2/2 | loss" in out and "tok/s" in out


def test_diverging_loss_stops_with_a_clear_message(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = run_args(tmp_path / "run", *tiny_dense, "train.max_steps=20", "optim.lr=1e8", "optim.warmup_steps=0",
                    "optim.grad_clip=0")  # fmt: skip
    with pytest.raises(TrainingDiverged, match="not finite|gradient norm"):
        train(load_run_config(None, args))
    assert cli_main(["/dev/null", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamoe train: step ") and ("not finite" in err or "gradient norm" in err)
    assert "Traceback" not in err
    assert len(read_metrics(tmp_path / "run")) < 20 and not (tmp_path / "run" / "checkpoints").exists()

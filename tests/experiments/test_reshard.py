"""Resharding on resume: a checkpoint written under one (processes, ep_size, ZeRO stage) resumes under
another, with its weights and AdamW moments exact (experiments/train/reshard.py).

Two bases are trained for 2 steps on 2 processes with EP 2 (ZeRO 1, and ZeRO 0), then resumed for 2
more steps unchanged (the reference) and under other layouts: 1 process; 2 processes with EP 1 at ZeRO
0 and ZeRO 2. Each resumed run must log the reference's losses and gradient norms, and its step-3
checkpoint must hold the reference's moments. The aux loss is off (it is computed per rank, so one
process legitimately differs); the aux-loss-free bias is on.
"""

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train import reshard
from llamoe.experiments.train.checkpoint import read_meta, read_rank_state
from llamoe.experiments.train.distributed import launch
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.models.build import build_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
BASES = {"z1ep2": ["distributed.zero_stage=1", "distributed.ep_size=2"], "z0ep2": ["distributed.ep_size=2"]}
TWO_PROCESS = {
    "same": None,
    "z0ep1": ["distributed.zero_stage=0", "distributed.ep_size=1"],
    "z2ep1": ["distributed.zero_stage=2", "distributed.ep_size=1"],
}


def _moments(step_dir: Path, experts: set[str]) -> dict:
    meta = read_meta(step_dir)
    layout = {k: meta[k] for k in ("world_size", "ep_size", "zero_stage")}
    full, step = reshard.full_moments(layout, lambda r: read_rank_state(step_dir, r), experts)
    return {"step": step, **full}


def test_a_checkpoint_resumes_under_other_layouts(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_moe: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    common = [*tiny_moe, "optim.decay_steps=4", "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01",
              "train.save_every=1", "train.keep_checkpoints=4"]  # fmt: skip
    args = {name: run_args(tmp_path / name, *common, *layout) for name, layout in BASES.items()}
    (tmp_path / "bases.json").write_text(json.dumps([[*a, "train.max_steps=2"] for a in args.values()]))
    assert launch(2, [str(WORKER), str(tmp_path / "bases.json")], module=False, timeout=600) == 0

    plan, in_process = [], []
    for base, layout in BASES.items():
        for name, change in [*TWO_PROCESS.items(), ("one", ["distributed.zero_stage=0", "distributed.ep_size=1"])]:
            run = tmp_path / f"{base}_{name}"
            shutil.copytree(tmp_path / base, run)
            resumed = [*run_args(run, *common, *layout, *(change or [])), "train.max_steps=4"]
            (in_process if name == "one" else plan).append(resumed)
    (tmp_path / "resumes.json").write_text(json.dumps(plan))
    assert launch(2, [str(WORKER), str(tmp_path / "resumes.json")], module=False, timeout=600) == 0
    for resumed in in_process:
        assert cli_main(["/dev/null", *resumed]) == 0
    out = capfd.readouterr().out
    assert out.count("resharded from 2 process(es), ep_size 2, ZeRO 1") == 3
    assert out.count("resharded from 2 process(es), ep_size 2, ZeRO 0") == 3

    # at ZeRO 0 without EP the optimizer state is written once, by rank 0; rank 1 points at it
    rank1 = read_rank_state(tmp_path / "z1ep2_z0ep1" / "checkpoints" / "step_4", 1)
    assert "optimizer" not in rank1 and rank1["optimizer_from"] == 0
    cfg = load_run_config(None, [*args["z1ep2"], "distributed.ep_size=1", "distributed.zero_stage=0"])
    experts = reshard.expert_names(build_model(cfg.model))
    for base in BASES:
        reference = read_metrics(tmp_path / f"{base}_same")
        assert [r["step"] for r in reference] == [1, 2, 3, 4]
        ref_moments = _moments(tmp_path / f"{base}_same" / "checkpoints" / "step_3", experts)
        for name in ("z0ep1", "z2ep1", "one"):
            rows = read_metrics(tmp_path / f"{base}_{name}")
            for key in ("loss", "grad_norm"):
                got, want = [r[key] for r in rows[2:]], [r[key] for r in reference[2:]]
                assert got == pytest.approx(want, rel=1e-5), (base, name, key)
            moments = _moments(tmp_path / f"{base}_{name}" / "checkpoints" / "step_3", experts)
            assert moments.keys() == ref_moments.keys()
            for key, want in ref_moments.items():
                if key == "step":
                    assert float(moments[key]) == float(want) == 3.0
                    continue
                for m, t in want.items():
                    torch.testing.assert_close(moments[key][m], t, rtol=1e-5, atol=1e-9, msg=f"{base} {name} {key} {m}")


def test_a_zero3_checkpoint_refuses_another_layout(tmp_path: Path) -> None:
    old = {"world_size": 2, "ep_size": 1, "zero_stage": 3}
    new = {"world_size": 1, "ep_size": 1, "zero_stage": 0}
    with pytest.raises(reshard.ReshardError, match="ZeRO-3 run resumes only under its own layout"):
        reshard.check_supported(tmp_path, old, new, {"param_names": []})
    with pytest.raises(reshard.ReshardError, match="predates layout-free resume"):
        reshard.check_supported(tmp_path, {**old, "zero_stage": 1}, new, {})

"""Multi-process training on CPU (gloo) through DeepSpeed's launcher: data parallelism, ZeRO, expert parallelism.

Every run sees the same global batch on 2 ranks, so every layout must reproduce the losses of
plain data parallelism (EP=1, ZeRO-0) step for step: ZeRO-1, EP=2, and EP=2 with ZeRO-2 resumed
from a checkpoint; for a dense model, ZeRO-3 and ZeRO-3 resumed. The MoE model uses the aux loss
and aux-loss-free bias balancing, so the routers' load counters must be reduced across ranks too.
(A single process is not the reference: the Switch aux loss is computed per rank, on that rank's
tokens, as in every data-parallel MoE.)
"""

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import pytest
import torch

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.checkpoint import load_checkpoint, load_model
from llamoe.experiments.train.distributed import World, launch
from llamoe.experiments.train.loop import val_batches, validation_loss
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.experiments.train.model_source import open_source

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


@pytest.fixture
def moe_args(run_args: Callable[..., list[str]], tiny_moe: list[str]) -> Callable[..., list[str]]:
    def build(run_dir: Path, *overrides: str) -> list[str]:
        return run_args(run_dir, *tiny_moe, "train.max_steps=4", "optim.decay_steps=4", "train.val_every=2",
                        "train.save_every=2", "model.moe.aux_loss_weight=0.01", "model.moe.bias_balancing=true",
                        "model.moe.bias_update_rate=0.01", *overrides)  # fmt: skip

    return build


def test_zero_and_expert_parallel_reproduce_data_parallel(
    tmp_path: Path, moe_args: Callable[..., list[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    runs = {
        "dp": [],
        "zero1": ["distributed.zero_stage=1"],
        "ep2": ["distributed.ep_size=2"],
        "ep2_zero2": ["distributed.ep_size=2", "distributed.zero_stage=2"],
    }
    plan = [moe_args(tmp_path / name, *extra) for name, extra in runs.items()]
    resumed = moe_args(tmp_path / "ep2_zero2_resumed", *runs["ep2_zero2"])
    plan += [[*resumed, "train.max_steps=2"], resumed]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert launch(2, [str(WORKER), str(tmp_path / "plan.json")], module=False, timeout=600) == 0
    out = capfd.readouterr().out
    assert f"resuming from {tmp_path / 'ep2_zero2_resumed' / 'checkpoints' / 'step_2'} at step 2" in out

    reference = read_metrics(tmp_path / "dp")
    assert len(reference) == 4 and reference[-1]["loss"] < reference[0]["loss"]
    for name in ["zero1", "ep2", "ep2_zero2", "ep2_zero2_resumed"]:
        rows = read_metrics(tmp_path / name)
        for key in ("loss", "grad_norm", "aux_loss"):
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=1e-4), (name, key)
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        assert vals == pytest.approx([r["val_loss"] for r in reference if "val_loss" in r], rel=1e-4), name

    # expert parallelism really sharded the experts: each rank kept 2 of the 4, with its own moments
    ckpt = tmp_path / "ep2" / "checkpoints" / "step_4"
    states = [load_checkpoint(ckpt, rank).rank_state["optimizer"]["state"].values() for rank in (0, 1)]
    moments = [[s["exp_avg"] for s in state if s["exp_avg"].ndim == 3] for state in states]
    assert moments[0] and all(m.shape[0] == 2 for m in moments[0] + moments[1])
    assert not torch.equal(moments[0][0], moments[1][0])
    # each expert-parallel rank saved its own experts and nothing was gathered: model.pt holds no routed
    # expert, experts0.pt and experts1.pt two of the four each
    base = torch.load(ckpt / "model.pt", weights_only=True)
    shards = [torch.load(ckpt / f"experts{e}.pt", weights_only=True) for e in (0, 1)]
    assert shards[0].keys() == shards[1].keys() and not shards[0].keys() & base.keys()
    assert {k.rsplit(".", 1)[1] for k in shards[0]} == {"w1", "w2", "w3"}
    assert all(t.shape[0] == 2 for shard in shards for t in shard.values())
    # the checkpoint holds every rank's experts: in one process it has the validation loss the run logged
    model, cfg = load_model(tmp_path / "ep2")
    assert model.layers[0].feed_forward.experts.w1.shape[0] == 4
    evaluated = open_source(tmp_path / "ep2").load()  # what `llamoe eval` and `init_from` read
    assert all(torch.equal(a, b) for a, b in zip(evaluated.state_dict().values(), model.state_dict().values()))
    one = World()
    val = validation_loss(model, val_batches(cfg, cfg.tokenizer.build(), one), one, nullcontext())
    assert val == pytest.approx(read_metrics(tmp_path / "ep2")[-1]["val_loss"], rel=1e-5)


def test_zero3_reproduces_data_parallel_for_a_dense_model(
    tmp_path: Path, run_args: Callable[..., list[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    """ZeRO-3 partitions the parameters: same losses as ZeRO-0, a full model.pt, an exact resume.

    llama3.1-tiny's FFN matrices (704x256) exceed DeepSpeed's persistence threshold (1e5 elements), so
    they are partitioned while the smaller ones stay whole. The save at step 2 follows an optimizer
    step with no validation forward, so the partitions are released then and model.pt needs the gather.
    """
    dense = ["model=llama3.1-tiny", "model.n_layers=2", "train.max_steps=4", "optim.decay_steps=4",
             "train.save_every=2"]  # fmt: skip
    zero3 = "distributed.zero_stage=3"
    resumed = run_args(tmp_path / "zero3_resumed", *dense, zero3)
    plan = [run_args(tmp_path / "dp", *dense), run_args(tmp_path / "zero3", *dense, zero3)]
    plan += [[*resumed, "train.max_steps=2"], resumed]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert launch(2, [str(WORKER), str(tmp_path / "plan.json")], module=False, timeout=600) == 0
    assert f"resuming from {tmp_path / 'zero3_resumed' / 'checkpoints' / 'step_2'} at step 2" in capfd.readouterr().out

    reference = read_metrics(tmp_path / "dp")
    assert len(reference) == 4
    for name in ("zero3", "zero3_resumed"):
        rows = read_metrics(tmp_path / name)
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=1e-4), (name, key)
        assert rows[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], rel=1e-4), name
    # ZeRO-3 keeps each rank's half of the fp32 parameters (and their moments) in its own rank file
    flat = [load_checkpoint(tmp_path / "zero3" / "checkpoints" / "step_4", r).rank_state["optimizer"] for r in (0, 1)]
    per_rank = [sum(t.numel() for t in state["fp32_flat_groups"]) for state in flat]
    model, cfg = load_model(tmp_path / "zero3", step=2)
    assert per_rank[0] == per_rank[1] and sum(per_rank) == pytest.approx(cfg.model.num_params(), rel=1e-3)
    # the step-2 model.pt, gathered from released partitions, is the model the resumed run validated at step 2
    one = World()
    val = validation_loss(model, val_batches(cfg, cfg.tokenizer.build(), one), one, nullcontext())
    assert val == pytest.approx(read_metrics(tmp_path / "zero3_resumed")[1]["val_loss"], rel=1e-5)


def test_cli_nproc_launches_expert_parallel_training(
    tmp_path: Path,
    moe_args: Callable[..., list[str]],
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--nproc 2` trains with EP=2, and joining the process group compiles nothing: DeepSpeed's CPU
    shared-memory comm op (inference only) would take a minute per fresh machine to build and leave a
    lock that hangs every later launch if a worker dies while building it."""
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    args = moe_args(tmp_path / "run", "train.max_steps=2", "distributed.ep_size=2")
    assert cli_main(["/dev/null", *args, "--nproc", "2"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert load_run_config(tmp_path / "run" / "config.yaml", world_size=2).distributed.ep_size == 2
    assert "done: step 2" in capfd.readouterr().out
    assert not extensions.exists() or not any(extensions.iterdir())


def test_a_launch_still_running_at_its_timeout_is_killed_whole(tmp_path: Path) -> None:
    """A hung collective must fail a test, not stall CI: the launcher and every worker are killed."""
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "hang.py"
    script.write_text(
        f"import os, time\nopen(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\ntime.sleep(600)\n"
    )
    with pytest.raises(TimeoutError, match="still running after 30 s"):
        launch(2, [str(script)], module=False, timeout=30)
    started = [int(p.name) for p in pids.iterdir()]
    assert len(started) == 2
    time.sleep(1)  # an orphan killed with its group is reaped by init
    for pid in started:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid


def test_activation_checkpointing_under_expert_parallelism_changes_nothing(
    tmp_path: Path, moe_args: Callable[..., list[str]]
) -> None:
    """EP=2 through DeepSpeed: the recompute repeats the all-to-alls on both ranks; losses, routing and
    biases stay bitwise equal. (The biases cannot show a load counted twice in every layer; that the
    load counts once under EP is checked in tests/models/test_checkpointing.py.)"""
    policies = ("none", "full", "selective")
    plan = [moe_args(tmp_path / p, "distributed.ep_size=2", f"train.activation_checkpointing={p}") for p in policies]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert launch(2, [str(WORKER), str(tmp_path / "plan.json")], module=False, timeout=600) == 0

    reference = read_metrics(tmp_path / "none")
    assert len(reference) == 4
    for policy in policies[1:]:
        rows = read_metrics(tmp_path / policy)
        for key in ("loss", "grad_norm", "aux_loss", "val_loss", "router"):
            assert [r.get(key) for r in rows] == [r.get(key) for r in reference], (policy, key)
        state = load_checkpoint(tmp_path / policy / "checkpoints" / "step_4", 0).model
        ref_state = load_checkpoint(tmp_path / "none" / "checkpoints" / "step_4", 0).model
        biases = [k for k in ref_state if k.endswith("expert_bias")]
        assert biases and any(ref_state[k].abs().sum() > 0 for k in biases)
        for key in biases:
            assert torch.equal(state[key], ref_state[key]), (policy, key)

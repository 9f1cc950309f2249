"""Checkpoints: bit-exact resume, the latest pointer and pruning, corruption, kill -9, load_model, generate."""

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from llamoe.experiments.commands.generate import cli_main as generate_main
from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.checkpoint import (
    CheckpointError,
    ShardedModelState,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_tokenizer,
)
from llamoe.experiments.train.distributed import World, full_state_dict
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics

Args = Callable[..., list[str]]


@pytest.fixture
def moe_resume_args(run_args: Args, tiny_moe: list[str]) -> Callable[[Path, int], list[str]]:
    """Everything that carries state across a resume: router jitter (torch RNG), aux-loss-free bias
    buffers, AdamW moments, gradient accumulation, an MQAR task mix (data position), periodic validation."""

    def build(run_dir: Path, max_steps: int) -> list[str]:
        return run_args(run_dir, *tiny_moe, f"train.max_steps={max_steps}", "optim.decay_steps=6",
                        "model.moe.jitter=0.1", "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01",
                        "model.moe.aux_loss_weight=0.01", "train.micro_batch_size=4", "data.tasks.mqar=0.3",
                        "train.val_every=2", "train.save_every=1", "train.keep_checkpoints=2")  # fmt: skip

    return build


def test_resume_equals_uninterrupted_bit_for_bit(
    tmp_path: Path, moe_resume_args: Callable[[Path, int], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    train(load_run_config(None, moe_resume_args(tmp_path / "straight", 6)))
    train(load_run_config(None, moe_resume_args(tmp_path / "resumed", 3)))
    capsys.readouterr()
    train(load_run_config(None, moe_resume_args(tmp_path / "resumed", 6)))
    assert f"resuming from {tmp_path / 'resumed' / 'checkpoints' / 'step_3'} at step 3\n" in capsys.readouterr().out

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "aux_loss", "grad_norm", "lr", "load_imbalance"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key
    # validation runs every 2 steps and at a run's last step (so also at step 3 of the first part)
    assert [(r["step"], r["val_loss"]) for r in straight if "val_loss" in r] == [
        (r["step"], r["val_loss"]) for r in resumed if "val_loss" in r and r["step"] != 3
    ]
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_latest_pointer_and_pruning(tmp_path: Path, moe_resume_args: Callable[[Path, int], list[str]]) -> None:
    train(load_run_config(None, moe_resume_args(tmp_path / "run", 4)))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_3", "step_4"]
    assert (root / "latest").read_text() == "step_4\n" and latest_checkpoint(tmp_path / "run") == root / "step_4"
    state = load_checkpoint(root / "step_4")
    assert state.step == 4 and state.meta["tokens"] == 4 * 8 * 32
    assert {"optimizer", "data", "rng"} <= set(state.rank_state)
    assert set(state.rank_state["rng"]) >= {"python", "numpy", "torch"}


def test_finished_run_and_mismatched_resume(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = run_args(tmp_path / "run", *tiny_dense, "train.max_steps=2")
    assert cli_main(["/dev/null", *args]) == 0
    capsys.readouterr()
    assert cli_main(["/dev/null", *args]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli_main(["/dev/null", *args, "train.max_steps=4", "train.seq_len=16"]) == 2
    err = capsys.readouterr().err
    assert "train.seq_len:" in err and "Traceback" not in err
    assert cli_main(["/dev/null", *args, "train.max_steps=4", "model.n_layers=3"]) == 2
    assert "model:" in capsys.readouterr().err


def test_corrupt_checkpoints_give_clear_errors(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = run_args(run, *tiny_dense, "train.max_steps=2")
    assert cli_main(["/dev/null", *args]) == 0
    model_file = run / "checkpoints" / "step_2" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="model.pt is unreadable"):
        load_model(run)
    capsys.readouterr()
    assert cli_main(["/dev/null", *args, "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llamoe train: checkpoint file {model_file} is unreadable") and "Traceback" not in err

    (run / "checkpoints" / "step_2" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is missing or corrupt"):
        load_model(run)
    (run / "checkpoints" / "latest").write_text("step_9\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(run)
    (run / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="should name a step_<N> directory"):
        load_model(run)


def test_load_model_tokenizer_and_generate(
    tmp_path: Path, run_args: Args, tiny_moe: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    cfg = load_run_config(None, run_args(run, *tiny_moe, "train.max_steps=2"))
    train(cfg)
    model, saved = load_model(run)
    assert saved.model == cfg.model and saved.train == cfg.train and not model.training
    tokens = torch.tensor([load_tokenizer(run).encode("the cat sat")])
    logits = model(tokens).logits
    assert logits.shape == (1, 11, cfg.model.vocab_size) and torch.isfinite(logits).all()

    capsys.readouterr()
    assert generate_main([str(run), "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and len(first.rstrip("\n")) > len("the cat")
    assert generate_main([str(run), "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first  # greedy decoding is deterministic
    assert generate_main([str(tmp_path / "nothing"), "--prompt", "x"]) == 2  # bad input: no such run directory


@pytest.mark.slow
def _latest_step(run: Path) -> int:
    """The step of the checkpoint `latest` names (0 before the first), from its directory name."""
    path = latest_checkpoint(run)
    return int(path.name.removeprefix("step_")) if path else 0


def test_kill_9_during_training_never_breaks_latest_and_resume_is_exact(
    tmp_path: Path, run_args: Args, tiny_moe: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL a training process (a forked copy of this one, so no start-up cost) at random moments
    while it saves every step; `latest` must always load, and the run finished after the kills must
    log exactly the losses of an uninterrupted run."""
    steps = 48
    run = tmp_path / "killed"
    argv = ["/dev/null", *run_args(run, *tiny_moe, f"train.max_steps={steps}", "train.save_every=1",
                                   "model.moe.jitter=0.1", "model.moe.bias_balancing=true")]  # fmt: skip
    assert cli_main([*argv, f"run_dir={tmp_path / 'straight'}"]) == 0
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for _ in range(4):
        # kill 1-4 saves on, then up to 20 ms later: somewhere in a step or a save, whatever the machine's speed
        target = _latest_step(run) + rng.randint(1, 4)
        proc = fork.Process(target=cli_main, args=(argv,))
        proc.start()
        deadline = time.time() + 60
        while _latest_step(run) < target and proc.is_alive() and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        assert proc.is_alive(), "the run ended before it was killed; give it more steps"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        path = latest_checkpoint(run)
        assert path is not None
        state = load_checkpoint(path)  # every file of the checkpoint `latest` names is complete
        assert 1 <= state.step < steps and path.name == f"step_{state.step}"
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert f"resuming from {run / 'checkpoints'}" in capsys.readouterr().out
    killed, straight = read_metrics(run), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in killed] == list(range(1, steps + 1))
    assert [r["loss"] for r in killed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in killed] == [r["grad_norm"] for r in straight]


def test_expert_rows_of_per_rank_files_equal_rows_of_the_whole_tensor() -> None:
    """Experts saved by 2 ranks (2 each) read back as the whole [4, ...] tensor, and any row range, one
    rank's of another layout included, comes from the files that hold it."""
    full = {"layers.1.feed_forward.experts.w1": torch.randn(4, 3, 5), "norm.weight": torch.randn(5)}
    key = "layers.1.feed_forward.experts.w1"
    state = ShardedModelState({"norm.weight": full["norm.weight"]}, [{key: full[key][:2]}, {key: full[key][2:]}])
    assert list(state) == ["norm.weight", key] and len(state) == 2
    assert key in state and "norm.weight" in state and "missing" not in state
    assert torch.equal(state[key], full[key]) and torch.equal(state["norm.weight"], full["norm.weight"])
    for first, stop in [(0, 2), (2, 4), (1, 3), (0, 4), (3, 4), (0, 1)]:
        assert torch.equal(state.expert_rows(key, first, stop), full[key][first:stop]), (first, stop)


def test_only_rank_0_copies_the_model_to_save_it() -> None:
    """full_state_dict is model.pt's content on rank 0 and nothing elsewhere: 8 ranks no longer each make a
    host copy of the whole model that only rank 0 writes."""
    model = torch.nn.Linear(4, 3)
    assert full_state_dict(model, World(rank=1, size=2)) == {}
    state = full_state_dict(model, World(rank=0, size=2))
    assert state.keys() == model.state_dict().keys() and torch.equal(state["weight"], model.weight)

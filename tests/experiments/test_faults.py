"""Fault injection: what a cluster does to a run (double launches, dead owners, preemption signals,
full disks, torn files, corrupt shards). Each test checks that nothing was lost: a resumed run logs
the same losses, bit for bit, as one that was never interrupted."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train import runctl
from llamoe.experiments.train.checkpoint import latest_checkpoint, load_model
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics

Args = Callable[..., list[str]]
ROOT = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject_enospc.py"
SAME = ("loss", "aux_loss", "grad_norm", "lr", "tokens")


@pytest.fixture
def dense(run_args: Args, tiny_dense: list[str]) -> Callable[[Path, int], list[str]]:
    """A tiny dense run whose learning rate does not depend on max_steps, so runs of any length compare."""

    def build(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
        return run_args(run_dir, *tiny_dense, f"train.max_steps={max_steps}", "optim.decay_steps=100000", *extra)

    return build


_SPAWNED: list[subprocess.Popen] = []


def _spawn(*argv: str) -> subprocess.Popen:
    """`llamoe ...` in a subprocess (one torch thread), with stdout and stderr captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llamoe.experiments.cli", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _SPAWNED.append(proc)
    return proc


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first found first."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(autouse=True)
def _kill_what_a_failed_test_left_running():
    """A test that fails mid-run must not leave its `llamoe` process, launcher or workers (which run in
    their own session) behind to load the machine for the tests after it."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def _wait_for_rows(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    """Wait until the run logged `n` metrics rows (it is then mid-training)."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


def _assert_same_run(resumed: Path, straight: Path) -> None:
    a, b = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(b) + 1))
    for key in SAME:
        assert [r[key] for r in a] == [r[key] for r in b], key
    ma, _ = load_model(resumed)
    mb, _ = load_model(straight)
    for (name, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------- ownership
def test_sigterm_saves_then_resume_is_exact_and_a_second_launch_is_refused(
    tmp_path: Path, dense: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    proc = _spawn("train", "/dev/null", *dense(run, 100000))
    _wait_for_rows(run, proc, 3)

    # a second launch in the same run_dir exits 2 at once, naming the holder, and writes nothing
    rows_before = len(read_metrics(run))
    assert cli_main(["/dev/null", *dense(run, 100000)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {run} is in use by pid {proc.pid} on " in err and "kill -TERM" in err
    assert "Traceback" not in err
    assert len(read_metrics(run)) >= rows_before  # the owner went on; no duplicate or missing rows below

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = latest_checkpoint(run)
    assert saved is not None
    step = int(saved.name.removeprefix("step_"))
    assert f"stopped by SIGTERM at step {step}/100000 after saving {saved}" in err and "Traceback" not in err
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))
    assert json.loads((run / runctl.LOCK_FILE).read_text() or "{}") == {}  # released on the way out

    train(load_run_config(None, dense(run, step + 3)))
    assert f"resuming from {saved} at step {step}" in capsys.readouterr().out
    train(load_run_config(None, dense(tmp_path / "straight", step + 3)))
    _assert_same_run(run, tmp_path / "straight")


def test_a_lock_left_by_a_dead_process_is_taken_over(
    tmp_path: Path, dense: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    holder = "from llamoe.experiments.train.runctl import DirLock; import os, signal, sys; DirLock(sys.argv[1]).acquire(); " \
             "os.kill(os.getpid(), signal.SIGKILL)"  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", holder, str(run)], cwd=ROOT)
    assert dead.wait() == -signal.SIGKILL
    left = json.loads((run / runctl.LOCK_FILE).read_text())
    assert left["pid"] == dead.pid
    assert cli_main(["/dev/null", *dense(run, 2)]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {run}: pid {left['pid']} on {left['host']}" in err and "no longer running" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_a_locked_sweep_directory_refuses_a_second_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamoe.experiments.commands.ablate import cli_main as ablate_main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"name": "toy", "base": {"model": "llama3.1-tiny"}}))
    with runctl.DirLock(tmp_path / "out", "sweep directory"):
        assert ablate_main([str(sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"sweep directory {tmp_path / 'out'} is in use by pid {os.getpid()}" in err and "Traceback" not in err


# ---------------------------------------------------------------------- error display
@pytest.mark.parametrize("debug", ["", "flag", "env"])
@pytest.mark.parametrize(
    "argv, message, error",
    [
        (["train", "/dev/null", "model.no_such_key=1"], "llamoe train: invalid config: model.no_such_key: unknown key",
         "ConfigError"),
        (["ablate", "/no/such/sweep.yaml"], "llamoe ablate: invalid sweep '/no/such/sweep.yaml': SWEEP: no sweep file",
         "SweepError"),
    ],
)  # fmt: skip
def test_a_user_error_is_one_line_and_debug_adds_the_traceback(
    debug: str, argv: list[str], message: str, error: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from llamoe.experiments.cli import main

    monkeypatch.setenv("LLAMOE_DEBUG", "1" if debug == "env" else "0")  # restored after the test (--debug sets it)
    assert main(["--debug", *argv] if debug == "flag" else argv) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1], err
    if debug:
        assert err.startswith("Traceback (most recent call last):") and error in err, err
    else:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------------- stopping
def test_a_second_signal_aborts_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in a background job
    with runctl.StopSignals(announce=False) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a duplicate of the same request (within DUPLICATE_S)
        assert signals.status == 130
        time.sleep(runctl.DUPLICATE_S + 0.1)
        with pytest.raises(runctl.Aborted) as aborted:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert aborted.value.exit_status == 143
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_time_limit_saves_and_stops_before_it(tmp_path: Path, dense: Callable[..., list[str]]) -> None:
    started = time.perf_counter()
    with pytest.raises(runctl.Stopped, match="stopped by train.time_limit_s at step") as stopped:
        train(load_run_config(None, dense(tmp_path / "run", 100000, "train.time_limit_s=4")))
    assert stopped.value.exit_status == 124 and time.perf_counter() - started < 4.5  # the limit, plus one tiny save
    saved = latest_checkpoint(tmp_path / "run")
    assert saved is not None and saved.name == f"step_{read_metrics(tmp_path / 'run')[-1]['step']}"


# ---------------------------------------------------------------------- full disks and torn files
def _inject(pattern: str, *argv: str) -> subprocess.CompletedProcess:
    """`llamoe ARGV` in a subprocess whose writes to files matching `pattern` fail with ENOSPC."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(INJECT), pattern, *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_disk_full_during_a_checkpoint_save(tmp_path: Path, dense: Callable[..., list[str]]) -> None:
    run = tmp_path / "run"
    train(load_run_config(None, dense(run, 2)))
    failed = _inject("*/checkpoints/.tmp-step_4/model.pt", "train", "/dev/null", *dense(run, 4))
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert lines[0].startswith(f"llamoe train: could not write checkpoint {run / 'checkpoints' / 'step_4'}: ")
    assert "[Errno 28] No space left on device; it needs about " in lines[0] and " are free there" in lines[0]
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_2'} is intact" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2"]  # no temporary left

    (run / "checkpoints" / ".tmp-step_9").mkdir()  # as a save killed by kill -9 leaves it
    train(load_run_config(None, dense(run, 4)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2", "step_4"]
    train(load_run_config(None, dense(tmp_path / "straight", 4)))
    _assert_same_run(run, tmp_path / "straight")


def test_disk_full_while_caching_the_tokenised_corpus(tmp_path: Path, dense: Callable[..., list[str]]) -> None:
    cache = tmp_path / "cache"
    args = dense(tmp_path / "run", 2, f"data.cache_dir={cache}")
    failed = _inject(f"{cache}/*.tmp-*/tokens.*", "train", "/dev/null", *args)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    line = failed.stderr.strip()
    assert line.startswith(f"llamoe train: could not write the token cache {cache}/") and "[Errno 28]" in line, line
    assert not list(cache.iterdir())  # the temporary entry was removed

    assert cli_main(["/dev/null", *args]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    # a builder that died on this host left its temporary: the next build of that entry removes it
    entry = sorted(cache.iterdir())[0]
    dead = cache / f".{entry.name}.tmp-{socket.gethostname()}-999999999-0"
    dead.mkdir()
    shutil.rmtree(entry)
    assert cli_main(["/dev/null", *dense(tmp_path / "again", 1, f"data.cache_dir={cache}")]) == 0
    assert entry.is_dir() and not dead.exists()


@pytest.mark.slow
def test_disk_full_while_writing_the_sweep_results_and_report(
    tmp_path: Path, corpus: list[str], tiny_dense: list[str]
) -> None:
    from llamoe.experiments.sweeps.report import load_results
    from llamoe.experiments.sweeps.scheduler import DONE_FILE

    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"name": "toy", "base": {"model": "llama3.1-tiny"}, "runs": {"a": {}},
                                "eval": {"long_context": {"evals": ["ppl"], "multiples": [1], "sequences": 1,
                                                          "plots": False}}}))  # fmt: skip
    overrides = [*corpus, *tiny_dense[1:], "train.seq_len=16", "train.batch_size=2", "train.max_steps=1",
                 "train.val_every=0", "train.val_batches=1", "train.progress=false"]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    before = '{"run": "old", "run_dir": "old", "status": "done"}\n'  # what an earlier sweep left
    (out / "results.jsonl").write_text(before)

    # the run trains and completes; rewriting results.jsonl then fails: one line, the old file intact
    failed = _inject(f"{out}/.results.jsonl.*.tmp", "ablate", str(spec), *overrides, "--out", str(out))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    line = failed.stderr.strip()
    assert "\n" not in line and line.startswith(
        f"llamoe ablate: could not write sweep results {out / 'results.jsonl'}: "
    )
    assert "[Errno 28] No space left on device" in line
    assert (out / "results.jsonl").read_text() == before and not list(out.glob(".results.jsonl.*"))
    assert (out / "a" / DONE_FILE).is_file()  # the finished run is kept: the rerun below does not train it again

    # the rerun writes results.jsonl; writing report.md then fails: one line, the old report intact
    (out / "report.md").write_text("the previous report\n")
    failed = _inject(f"{out}/.report.md.*.tmp", "ablate", str(spec), *overrides, "--out", str(out))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    line = failed.stderr.strip()
    assert "\n" not in line and line.startswith(
        f"llamoe ablate: could not write the sweep report {out / 'report.md'}: "
    )
    assert "[Errno 28] No space left on device" in line
    assert "a: already complete, skipped" in failed.stdout
    assert [(r["run_dir"], r["status"]) for r in load_results(out)] == [("a", "done")]
    assert (out / "report.md").read_text() == "the previous report\n" and not list(out.glob(".report.md.*"))


def test_a_torn_last_line_in_metrics_is_dropped_on_resume(tmp_path: Path, dense: Callable[..., list[str]]) -> None:
    run = tmp_path / "run"
    train(load_run_config(None, dense(run, 3)))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # the process died mid-line
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    train(load_run_config(None, dense(run, 5)))
    assert "\n" == (run / "metrics.jsonl").read_text()[-1]
    train(load_run_config(None, dense(tmp_path / "straight", 5)))
    _assert_same_run(run, tmp_path / "straight")


def test_a_corrupt_shard_of_a_multi_rank_checkpoint_is_named(
    tmp_path: Path, dense: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from llamoe.experiments.train.checkpoint import CheckpointError, load_checkpoint

    run = tmp_path / "run"
    train(load_run_config(None, dense(run, 2)))
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    shard = ckpt / "rank1.pt"  # a second rank's shard, then damaged (a torn copy, a bad block)
    shard.write_bytes((ckpt / "rank0.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} is unreadable"):
        load_checkpoint(ckpt, 1)
    # rank 0 read its own part, but the ranks agree that one failed: rank 0 stops too instead of waiting
    with pytest.raises(CheckpointError, match="another rank could not read its part"):
        load_checkpoint(ckpt, 0, lambda ok: False)


# ---------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_sigterm_to_a_sweep_interrupts_every_run_and_a_rerun_resumes_them(
    tmp_path: Path, corpus: list[str], tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from llamoe.experiments.commands import ablate
    from llamoe.experiments.overrides import parse_items
    from llamoe.experiments.sweeps import scheduler
    from llamoe.experiments.sweeps.report import load_results
    from llamoe.experiments.sweeps.spec import expand, load_sweep

    base = dict(item.split("=", 1) for item in [*corpus, *tiny_dense])
    base.update({"train.seq_len": 32, "train.batch_size": 8, "train.log_every": 1, "train.val_every": 0,
                 "train.val_batches": 1, "train.save_every": 0, "optim.decay_steps": 100000,
                 "train.max_steps": 100000, "train.progress": False})  # fmt: skip
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"name": "toy", "base": "base.yaml", "runs": {"a": {}, "b": {"optim.lr": 1e-3}},
                                "parallel": 2}))  # fmt: skip
    (tmp_path / "base.yaml").write_text(json.dumps({"model": base.pop("model")}))
    out = tmp_path / "out"
    overrides = [f"{k}={v}" for k, v in base.items()]
    proc = _spawn("ablate", str(spec), *overrides, "--out", str(out))
    for name in ("a", "b"):
        _wait_for_rows(out / name, proc, 2, timeout=240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "sweep stopped by SIGTERM: 2 run(s) saved and interrupted (a, b), 0 not started" in err
    assert "Traceback" not in err
    rows = {r["run_dir"]: r for r in load_results(out)}
    assert {name: r["status"] for name, r in rows.items()} == {"a": "interrupted", "b": "interrupted"}
    saved = {name: latest_checkpoint(out / name) for name in ("a", "b")}
    steps = {name: int(path.name.removeprefix("step_")) for name, path in saved.items() if path is not None}
    assert set(steps) == {"a", "b"}

    with open(out / scheduler.RESULTS_FILE, "a") as f:
        f.write('{"run": "a", "stat')  # a torn last line, as a crash mid-write on another filesystem leaves
    total = max(steps.values()) + 2
    capsys.readouterr()
    assert ablate.cli_main([str(spec), *overrides, f"train.max_steps={total}", "--out", str(out)]) == 0
    for name in ("a", "b"):
        assert f"resuming from {saved[name]} at step {steps[name]}" in (out / name / scheduler.LOG_FILE).read_text()
    rows = {r["run_dir"]: r for r in load_results(out)}
    assert {name: r["status"] for name, r in rows.items()} == {"a": "done", "b": "done"}

    plan = next(p for p in expand(load_sweep(str(spec))) if p.name == "a")
    straight = {**plan.overrides, **parse_items(overrides), "train.max_steps": total,
                "run_dir": str(tmp_path / "straight")}  # fmt: skip
    train(load_run_config(plan.base, straight))
    _assert_same_run(out / "a", tmp_path / "straight")


# ---------------------------------------------------------------------- two processes
@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_an_expert_parallel_run_saves_every_rank_and_resume_is_exact(
    tmp_path: Path, run_args: Args, tiny_moe: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    from llamoe.experiments.train.distributed import launch

    def moe(run_dir: Path, max_steps: int) -> list[str]:
        return run_args(run_dir, *tiny_moe, f"train.max_steps={max_steps}", "optim.decay_steps=100000",
                        "distributed.ep_size=2", "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01",
                        "model.moe.aux_loss_weight=0.01")  # fmt: skip

    run = tmp_path / "run"
    proc = _spawn("train", "/dev/null", *moe(run, 100000), "--nproc", "2")
    _wait_for_rows(run, proc, 2, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    saved = latest_checkpoint(run)
    assert saved is not None and {"rank0.pt", "rank1.pt", "model.pt"} <= {p.name for p in saved.iterdir()}
    step = int(saved.name.removeprefix("step_"))
    assert f"stopped by SIGTERM at step {step}/100000 after saving {saved}" in err and "Traceback" not in err

    # a copy whose second shard is damaged must stop both ranks with the file named, not hang
    shutil.copytree(run, tmp_path / "corrupt")
    shard = tmp_path / "corrupt" / "checkpoints" / saved.name / "rank1.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    plan = [moe(tmp_path / "straight", step + 2), moe(run, step + 2), moe(tmp_path / "corrupt", step + 2)]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capfd.readouterr()
    assert (
        launch(
            2,
            [str(Path(__file__).parent / "distributed_worker.py"), str(tmp_path / "plan.json")],
            module=False,
            timeout=600,
        )
        == 1
    )
    out, err = capfd.readouterr()
    assert f"resuming from {saved} at step {step}" in out
    assert f"checkpoint file {shard} is unreadable" in err and "another rank could not read its part" in err
    a, b = read_metrics(run), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, step + 3))
    for key in SAME:  # gloo reduces in a fixed order, so two-process runs repeat exactly too
        assert [r[key] for r in a] == [r[key] for r in b], key

"""Sweeps through submitit (`llamoe ablate --executor slurm|debug`), without a cluster.

The debug executor runs a tiny sweep in this process; a fake Slurm (sbatch, srun, squeue, sacct,
scontrol as shell scripts on PATH) keeps every submitted script and runs it on this machine the way
Slurm would: array tasks at once, `--dependency=afterany`, one srun task per rank with Slurm's
variables, and `scontrol requeue` running the job again under the same id. Both must give the local
scheduler's results rows (all but the timing field tokens_per_s).
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamoe.experiments.commands import ablate
from llamoe.experiments.sweeps.report import load_results
from llamoe.experiments.sweeps.slurm import ClusterOptions, parse_time
from llamoe.experiments.sweeps.spec import SweepError
from tests.experiments.test_ablate import tiny_sweep_data

RUNS = {
    "a": {},
    "a-temp": {"reuse": "a", "eval_overrides": {"model.attention.temperature_tuning": True}},
    "b": {"optim.lr": 1.0e30},  # diverges at step 2: a failed run
    "b-temp": {"reuse": "b"},  # fails because the run it evaluates failed
}
TIMING = ("tokens_per_s",)

FAKE_SBATCH = r"""#!/bin/bash
# fake sbatch: keep the script, run its (array) tasks at once in the background, print the job id
dir="$FAKE_SLURM_DIR"; script="$1"
id=$(cat "$dir/next_id" 2>/dev/null || echo 1000); echo $((id + 1)) > "$dir/next_id"
cp "$script" "$dir/$id.sbatch"
option() { sed -n "s/^#SBATCH --$1=\(.*\)\$/\1/p" "$script"; }
last=$(option array | sed 's/^0-\([0-9]*\).*/\1/'); dep=$(option dependency | sed 's/^afterany://')
tasks=none; [ -n "$last" ] && tasks=$(seq 0 "$last")
jid() { if [ "$1" = none ]; then echo "$id"; else echo "${id}_$1"; fi; }
for t in $tasks; do echo PENDING > "$dir/$(jid $t).state"; done
[ -n "$FAKE_SLURM_HOLD" ] && { echo "Submitted batch job $id"; exit 0; }
export SLURM_JOB_ID=$id SLURM_NTASKS=$(option ntasks-per-node) SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=localhost
[ -n "$(option cpus-per-task)" ] && export SLURM_CPUS_PER_TASK=$(option cpus-per-task)
for t in $tasks; do (
  j=$(jid $t); [ "$t" != none ] && export SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$t
  [ -n "$dep" ] && while ! grep -qE 'COMPLETED|FAILED' "$dir/$dep.state" 2>/dev/null; do sleep 0.2; done
  while :; do
    echo RUNNING > "$dir/$j.state"; bash "$script"; rc=$?
    [ -f "$dir/$j.requeue" ] || break
    rm "$dir/$j.requeue"; echo "$j" >> "$dir/requeued"
  done
  if [ $rc = 0 ]; then echo COMPLETED; else echo FAILED; fi > "$dir/$j.state"
) < /dev/null > "$dir/$(jid $t).runner.log" 2>&1 & done
echo "Submitted batch job $id"
"""
FAKE_SRUN = r"""#!/bin/bash
# fake srun: SLURM_NTASKS tasks on this machine with Slurm's task variables, output per --output/--error
while [ $# -gt 0 ]; do case "$1" in
  --unbuffered) shift;; --output) out="$2"; shift 2;; --error) err="$2"; shift 2;; *) break;; esac; done
name() { p="${1//%A/$SLURM_ARRAY_JOB_ID}"; p="${p//%a/$SLURM_ARRAY_TASK_ID}"; p="${p//%j/$SLURM_JOB_ID}"; echo "${p//%t/$2}"; }
pids=()
for ((k = 0; k < SLURM_NTASKS; k++)); do
  SLURM_PROCID=$k SLURM_LOCALID=$k SLURM_NODEID=0 "$@" >> "$(name "$out" $k)" 2>> "$(name "$err" $k)" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
FAKE_SQUEUE = r"""#!/bin/bash
# fake squeue -h -r -o '%i|%T': the jobs that are pending, running or requeued
for f in "$FAKE_SLURM_DIR"/*.state; do
  [ -f "$f" ] || continue; s=$(cat "$f")
  case "$s" in PENDING|RUNNING|REQUEUED) echo "$(basename "$f" .state)|$s";; esac
done
"""
FAKE_SACCT = r"""#!/bin/bash
# fake sacct -o JobID,State,NodeList --parsable2: every job's state
echo "JobID|State|NodeList"
for f in "$FAKE_SLURM_DIR"/*.state; do [ -f "$f" ] && echo "$(basename "$f" .state)|$(cat "$f")|localhost"; done
"""
FAKE_SCONTROL = r"""#!/bin/bash
# fake scontrol requeue ID: the job runs again under the same id once it exits
[ "$1" = requeue ] && [ -z "$FAKE_SLURM_NO_REQUEUE" ] || { echo "scontrol: requeue refused" >&2; exit 1; }
touch "$FAKE_SLURM_DIR/$2.requeue"; echo REQUEUED > "$FAKE_SLURM_DIR/$2.state"
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake Slurm's state directory (scripts, job states); its commands come first on PATH."""
    bin_dir, state = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("squeue", FAKE_SQUEUE),
                       ("sacct", FAKE_SACCT), ("scontrol", FAKE_SCONTROL)):  # fmt: skip
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


def _wait_for_jobs(state: Path, timeout: float = 240.0) -> dict[str, str]:
    """Job id -> final state, once no fake job is pending, running or requeued."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {f.stem: f.read_text().strip() for f in state.glob("*.state")}
        if states and all(s in ("COMPLETED", "FAILED") for s in states.values()):
            return states
        time.sleep(0.5)
    logs = "\n".join(f.read_text()[-2000:] for f in state.glob("*.runner.log"))
    raise AssertionError(f"fake Slurm jobs still running after {timeout:.0f} s: {states}\n{logs}")


def _sweep_file(tmp_path: Path, runs: dict[str, Any], **extra: Any) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_sweep_data(tmp_path, runs), **extra}))
    return path


def _comparable(sweep_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in load_results(sweep_dir)]


@pytest.fixture(scope="module")
def scheduler_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The sweep file of RUNS and the local scheduler's rows for it (the reference)."""
    tmp = tmp_path_factory.mktemp("scheduler")
    path = _sweep_file(tmp, RUNS)
    assert ablate.cli_main([str(path), "--out", str(tmp / "out")]) == 1  # b and b-temp fail
    return path, _comparable(tmp / "out")


@pytest.mark.slow
def test_status_of_a_local_sweep_keeps_its_results(
    scheduler_sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, reference = scheduler_sweep
    out = path.parent / "out"
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert ablate.cli_main([str(path), "--out", str(out), "--status"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines == {"a": "done", "a-temp": "done", "b": "failed", "b-temp": "failed"}
    assert (out / "results.jsonl").read_text() == before  # b-temp never started, yet keeps its row


SLURM_ARGS = ["--executor", "slurm", "--partition", "gpu", "--account", "lab", "--time", "1:30:00",
              "--gpus-per-run", "1", "--slurm", "qos=high", "--slurm", "mem=8G"]  # fmt: skip


# ---------------------------------------------------------------------------- options
def test_time_takes_sbatch_formats_in_whole_minutes() -> None:
    assert [parse_time(t) for t in ("90", "1:30:00", "2-0", "1-2:03", "0:0:30", "45:30")] == [90, 90, 2880, 1563, 1, 46]
    for bad in ("", "1h", "0", "0:00:00", "1:2:3:4"):
        with pytest.raises(SweepError) as info:
            parse_time(bad)
        assert info.value.key == "--time"


def test_time_limit_is_derived_from_time_with_room_for_the_evaluation() -> None:
    assert ClusterOptions.parse("slurm", time="60").time_limit_s() == 3600 - 300
    assert ClusterOptions.parse("slurm", time="10").time_limit_s() == 600 - 60
    opts = ClusterOptions.parse("slurm", time="5", gpus_per_run=8, nodes_per_run=2)
    assert (opts.tasks_per_node, opts.world_size) == (4, 8)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--partition", "gpu"], "--partition"),
        (["--executor", "debug", "--time", "10"], "--time"),
        (["--executor", "slurm"], "--time"),
        (["--executor", "slurm", "--time", "soon"], "--time"),
        (["--executor", "slurm", "--time", "9", "--gpus-per-run", "3", "--nodes-per-run", "2"], "--gpus-per-run"),
        (["--executor", "slurm", "--time", "9", "--nodes-per-run", "2"], "--nodes-per-run"),
        (["--executor", "slurm", "--time", "9", "--slurm", "qos"], "--slurm"),
        (["--executor", "slurm", "--time", "9", "--slurm", "ntasks-per-node=4"], "--slurm"),
        (["--executor", "slurm", "--time", "9", "--gpus-per-run", "two"], "--gpus-per-run"),
        (["--executor", "cloud"], "--executor"),
        (["--parallel", "0"], "--parallel"),
    ],
)
def test_bad_cluster_options_exit_2_naming_the_option(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = ablate.cli_main(["quickstart", "--dry-run", *args])
    except SystemExit as e:  # argparse's own type and choice errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and option in err and "Traceback" not in err


def test_submitting_without_slurm_on_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _sweep_file(tmp_path, {"a": {}})
    old = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path / "nothing-here")
    try:
        status = ablate.cli_main([str(path), "--out", str(tmp_path / "out"), *SLURM_ARGS])
    finally:
        os.environ["PATH"] = old
    assert status == 2 and "sbatch, srun, squeue not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- submission (fake Slurm)
def test_dry_run_prints_the_scripts_that_are_submitted(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")  # the jobs stay pending
    path, out = _sweep_file(tmp_path, RUNS), tmp_path / "out"
    args = [str(path), "--out", str(out), "--parallel", "2", *SLURM_ARGS]
    assert ablate.cli_main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert ablate.cli_main(args) == 0
    capsys.readouterr()
    array, a_temp, b_temp = ((fake_slurm / f"{i}.sbatch").read_text() for i in (1000, 1001, 1002))
    assert not (fake_slurm / "1003.sbatch").exists()
    # the dry run printed exactly what was submitted (the dependencies name the parent's job id)
    assert array in printed
    assert a_temp.replace("afterany:1000_0", "afterany:JOB-OF-a") in printed
    assert b_temp.replace("afterany:1000_1", "afterany:JOB-OF-b") in printed
    for flag in ("--array=0-1%2", "--partition=gpu", "--account=lab", "--time=90", "--gpus-per-node=1",
                 "--ntasks-per-node=1", "--nodes=1", "--qos=high", "--mem=8G", "--signal=USR2@90",
                 "--job-name=llamoe-out"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in array
    assert "#SBATCH --dependency=afterany:1000_0\n" in a_temp and "--array" not in a_temp
    assert "srun --unbuffered" in array and "-m submitit.core._submit" in array
    jobs = {n: json.loads((out / n / "job.json").read_text())["job_id"] for n in RUNS}
    assert jobs == {"a": "1000_0", "b": "1000_1", "a-temp": "1001", "b-temp": "1002"}
    assert ablate.cli_main([str(path), "--out", str(out), "--status"]) == 0
    status = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in status.splitlines() if line.startswith("  ")}
    assert lines["a"] == ["pending", "job", "1000_0", "(slurm)"] and lines["b-temp"][:3] == ["pending", "job", "1002"]
    assert "4 pending" in status
    # a rerun submits nothing while the jobs are queued
    assert ablate.cli_main(args) == 0
    assert "a: job 1000_0 is pending, not submitted again" in capsys.readouterr().out
    assert not (fake_slurm / "1003.sbatch").exists()
    # the report on demand, before any run ended
    assert ablate.cli_main([str(path), "--out", str(out), "--report"]) == 0
    assert "(no results)" in capsys.readouterr().out and (out / "report.md").is_file()


@pytest.mark.slow
def test_slurm_jobs_give_the_rows_of_the_local_scheduler(
    fake_slurm: Path, tmp_path: Path, scheduler_sweep: tuple[Path, list[dict[str, Any]]]
) -> None:
    path, reference = scheduler_sweep
    out = tmp_path / "out"
    assert ablate.cli_main([str(path), "--out", str(out), *SLURM_ARGS]) == 0
    states = _wait_for_jobs(fake_slurm)
    assert states == {"1000_0": "COMPLETED", "1000_1": "COMPLETED", "1001": "COMPLETED", "1002": "COMPLETED"}
    assert _comparable(out) == reference
    assert (out / "report.md").is_file()  # built by the job of the last run to end
    config = yaml.safe_load((out / "a" / "config.yaml").read_text())
    assert config["train"]["time_limit_s"] == 90 * 60 - 300


@pytest.mark.slow
def test_debug_executor_gives_the_rows_of_the_local_scheduler(
    tmp_path: Path, scheduler_sweep: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, reference = scheduler_sweep
    out = tmp_path / "out"
    assert ablate.cli_main([str(path), "--out", str(out), "--executor", "debug"]) == 1
    assert _comparable(out) == reference
    assert "FAILED b-temp: the run it depends on, b, failed" in capsys.readouterr().out
    assert (out / "report.md").is_file()
    assert json.loads((out / "a" / "job.json").read_text())["executor"] == "debug"


@pytest.mark.slow
def test_an_interrupted_run_is_resubmitted_alone_and_a_requeued_job_resumes(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `a` stops after every step (train.time_limit_s): with requeue refused its run is interrupted
    path = _sweep_file(tmp_path, {"a": {"train.time_limit_s": 1e-6, "train.max_steps": 3}, "b": {"train.max_steps": 3}})
    out = tmp_path / "out"
    args = [str(path), "--out", str(out), *SLURM_ARGS]
    monkeypatch.setenv("FAKE_SLURM_NO_REQUEUE", "1")
    assert ablate.cli_main(args) == 0
    _wait_for_jobs(fake_slurm)
    rows = {r["run_dir"]: r for r in load_results(out)}
    assert rows["a"]["status"] == "interrupted" and rows["b"]["status"] == "done"
    assert "train.time_limit_s" in rows["a"]["error"]
    capsys.readouterr()
    assert ablate.cli_main([str(path), "--out", str(out), "--status"]) == 0
    status = capsys.readouterr().out
    assert "interrupted" in status and "checkpoint step_1" in status and "1 done" in status
    # the rerun submits `a` only; its job resumes, stops after step 2, requeues itself and resumes to the end
    monkeypatch.delenv("FAKE_SLURM_NO_REQUEUE")
    assert ablate.cli_main(args) == 0
    assert sorted(p.name for p in fake_slurm.glob("*.sbatch")) == ["1000.sbatch", "1001.sbatch"]
    assert "--array" not in (fake_slurm / "1001.sbatch").read_text()
    assert _wait_for_jobs(fake_slurm)["1001"] == "COMPLETED"
    assert (fake_slurm / "requeued").read_text().split() == ["1001"]
    rows = {r["run_dir"]: r for r in load_results(out)}
    assert rows["a"]["status"] == "done" and rows["a"]["tokens"] == 3 * 2 * 16
    log = Path(json.loads((out / "a" / "job.json").read_text())["log"]).read_text()
    assert "step_1 at step 1" in log and "step_2 at step 2" in log  # resumed twice: resubmitted, then requeued
    steps = [json.loads(line)["step"] for line in (out / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # resumed exactly: the same results as `b`, the same run trained without stopping
    same = ("final_loss", "val_loss", "eval", "eval_ci95", "tokens")
    assert {k: rows["a"][k] for k in same} == {k: rows["b"][k] for k in same}


def _job_pids(folder: Path) -> list[int]:
    """The pids of the submitit job processes working on `folder` (this test's own jobs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        launcher = any(a.endswith(b"/srun") for a in argv[:2])  # the fake srun's bash has the same arguments
        if b"submitit.core._submit" in argv and str(folder).encode() in argv and not launcher:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_preemption_signal_saves_requeues_and_the_job_resumes(
    fake_slurm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    path, out = _sweep_file(tmp_path, {"a": {"train.max_steps": 150}}), tmp_path / "out"
    assert ablate.cli_main([str(path), "--out", str(out), *SLURM_ARGS]) == 0
    metrics, deadline = out / "a" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:
        time.sleep(0.1)
    pids = _job_pids(out / "_submitit")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGUSR2)  # what Slurm sends before preemption or the time limit (--signal=USR2@90)
    assert _wait_for_jobs(fake_slurm) == {"1000": "COMPLETED"}
    assert (fake_slurm / "requeued").read_text().split() == ["1000"]
    log = Path(json.loads((out / "a" / "job.json").read_text())["log"]).read_text()
    assert "resuming from" in log
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 151))
    assert load_results(out)[0]["status"] == "done"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_gpu_run_is_two_srun_ranks_through_deepspeed(
    fake_slurm: Path, tmp_path: Path, scheduler_sweep: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Two srun tasks, ranks from Slurm's variables, joined by DeepSpeed (gloo here): data parallel over the same
    global batch, so the single-process run's losses, and rank 0 evaluates."""
    from llamoe.experiments.train.checkpoint import latest_checkpoint, read_meta

    _, reference = scheduler_sweep
    path, out = _sweep_file(tmp_path, {"a": {}}), tmp_path / "out"
    args = [a for a in SLURM_ARGS if a != "1"]  # --gpus-per-run 2
    args[args.index("--gpus-per-run") + 1 : args.index("--gpus-per-run") + 1] = ["2"]
    assert ablate.cli_main([str(path), "--out", str(out), *args]) == 0
    assert "#SBATCH --ntasks-per-node=2\n" in (fake_slurm / "1000.sbatch").read_text()
    assert _wait_for_jobs(fake_slurm) == {"1000": "COMPLETED"}
    assert read_meta(latest_checkpoint(out / "a"))["world_size"] == 2
    row, single = load_results(out)[0], reference[0]
    assert row["status"] == "done" and row["tokens"] == single["tokens"]
    for key in ("final_loss", "val_loss"):
        assert row[key] == pytest.approx(single[key], rel=1e-4)
    assert row["eval"] == pytest.approx(single["eval"], rel=1e-4)

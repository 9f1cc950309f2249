"""Sweeps through submitit: `llamoe ablate SWEEP --executor slurm|debug`, one job per run.

The sweep directory stays the one source of truth. Each run is the run directory the local
scheduler (experiments/sweeps/scheduler.py) makes: its `plan.json`, `job.json` (executor, job id, log), and
one outcome file the job writes itself: `done.json` (the results row), `error.txt` (a traceback) or
`stopped.json` (stopped on request after saving). The job rebuilds `results.jsonl` from those files
under a lock, and the report once the last run ended (`--report` builds it on demand). `--status`
shows each run's state; rerunning submits only the runs neither done nor pending/running (squeue).

Slurm: runs that depend on no other run go out as one job array (`--parallel N` throttles it); a
run that evaluates or starts from another waits for its job (`--dependency=afterany:<id>`) and
fails, as locally, if that run did not finish. A run of G GPUs on N nodes is G srun tasks, one per
GPU (submitit's advice); each maps Slurm's ids to RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT (submitit.helpers.TorchDistributedEnvironment) and trains through the same DeepSpeed
initialisation as `llamoe train --nproc` (experiments/distributed.init_world); rank 0 evaluates.

Preemption and time limits: submitit asks Slurm for SIGUSR2 `signal_delay_s` before the time limit.
The job turns it into runctl's graceful stop (finish the step, save), then rank 0
requeues the job (`scontrol requeue`, as submitit's checkpoint hook does) and the requeued job
resumes from that checkpoint. `train.time_limit_s`, unless the run sets it, is `--time` less
TIME_MARGIN_S (kept for the evaluation); a run stopped by it is requeued the same way. SIGTERM
(scancel) saves and stops without a requeue: the run is `interrupted` until the sweep is rerun.
The debug executor (submitit's DebugExecutor) runs the same jobs one after another in this process.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, Optional, TextIO

import submitit
from submitit.helpers import Checkpointable, TorchDistributedEnvironment
from submitit.slurm.slurm import SlurmInfoWatcher, _make_sbatch_string  # private: --dry-run prints what it writes

from llamoe.experiments.errors import TIME_LIMIT, UsageError
from llamoe.experiments.sweeps.scheduler import (
    DONE_FILE,
    ERROR_FILE,
    PLAN_FILE,
    completed_row,
    failed_row,
    interrupted_row,
    write_json_atomic,
    write_results,
)
from llamoe.experiments.sweeps.spec import PlannedRun, SweepError
from llamoe.experiments.train import runctl

EXECUTORS = ("local", "slurm", "debug")  # local: experiments/sweeps/scheduler.py; the others: this module
JOB_FILE = "job.json"
STOP_FILE = "stopped.json"
SUBMITIT_DIR = "_submitit"  # submitit's pickles, sbatch scripts and logs (no run name starts with "_")
TIME_MARGIN_S = 300.0  # train.time_limit_s ends this long before --time (at most a tenth of it)
# experiments/ablate.execute(plan, run_dir, extra, world_size=, rank=) -> exit status: one run, here
Execute = Callable[..., int]
_OWN_FLAGS = {"partition": "--partition", "account": "--account", "time": "--time", "nodes": "--nodes-per-run",
              "gpus-per-node": "--gpus-per-run", "ntasks-per-node": "--gpus-per-run", "array": "--parallel"}  # fmt: skip
_MANAGED = ("dependency", "signal", "output", "error", "open-mode", "job-name")  # what the bookkeeping relies on


# ---------------------------------------------------------------------------- options
def parse_time(text: str) -> int:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise SweepError("--time", f"expected minutes or [D-]HH:MM[:SS] (sbatch's format), got {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:
        seconds = a * 3600 + b * 60 + c
    else:
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise SweepError("--time", f"must be longer than 0, got {text!r}")
    return math.ceil(seconds / 60)


@dataclass(frozen=True)
class ClusterOptions:
    """Where and with what each run's job runs (`llamoe ablate --executor ...`)."""

    executor: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    gpus_per_run: Optional[int] = None
    nodes_per_run: int = 1
    time_min: Optional[int] = None
    slurm: tuple[tuple[str, str], ...] = ()  # free sbatch options, key=value

    @classmethod
    def parse(
        cls,
        executor: str,
        *,
        partition: Optional[str] = None,
        account: Optional[str] = None,
        gpus_per_run: Optional[int] = None,
        nodes_per_run: Optional[int] = None,
        time: Optional[str] = None,
        slurm: tuple[str, ...] = (),
    ) -> ClusterOptions:
        """Validate the command line's cluster options; SweepError names the option."""
        given = {"--partition": partition, "--account": account, "--gpus-per-run": gpus_per_run,
                 "--nodes-per-run": nodes_per_run, "--time": time, "--slurm": slurm or None}  # fmt: skip
        if executor != "slurm":
            for flag, value in given.items():
                if value is not None:
                    raise SweepError(flag, f"is a Slurm option; use it with --executor slurm (not {executor})")
            return cls(executor)
        if time is None:
            raise SweepError("--time", "is required with --executor slurm (the job's time limit, e.g. 60 or 4:00:00)")
        nodes = 1 if nodes_per_run is None else nodes_per_run
        if nodes < 1:
            raise SweepError("--nodes-per-run", f"must be >= 1, got {nodes}")
        if gpus_per_run is not None and (gpus_per_run < 1 or gpus_per_run % nodes):
            raise SweepError(
                "--gpus-per-run", f"must be a positive multiple of --nodes-per-run={nodes}, got {gpus_per_run}"
            )
        if gpus_per_run is None and nodes > 1:
            raise SweepError("--nodes-per-run", "a run on several nodes needs --gpus-per-run (one rank per GPU)")
        items = []
        for item in slurm:
            key, sep, value = item.partition("=")
            key = key.strip().lstrip("-").replace("_", "-")
            if not sep or not key:
                raise SweepError("--slurm", f"takes key=value (an sbatch option without its dashes), got {item!r}")
            if key in _OWN_FLAGS or key in _MANAGED:
                raise SweepError("--slurm", f"{key} is set by {_OWN_FLAGS.get(key, 'llamoe ablate')}, not --slurm")
            items.append((key, value))
        return cls(executor, partition, account, gpus_per_run, nodes, parse_time(time), tuple(items))

    @property
    def tasks_per_node(self) -> int:
        """srun tasks per node: one per GPU (one in all without GPUs)."""
        return self.gpus_per_run // self.nodes_per_run if self.gpus_per_run else 1

    @property
    def world_size(self) -> int:
        return self.tasks_per_node * self.nodes_per_run

    def time_limit_s(self) -> Optional[float]:
        """The train.time_limit_s a run gets unless it sets one: --time less the margin for evaluation."""
        if self.time_min is None:
            return None
        total = self.time_min * 60.0
        return total - min(TIME_MARGIN_S, total / 10)

    def slurm_parameters(self, job_name: str, dependency: Optional[str] = None) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters of one submission."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time_min,
            "nodes": self.nodes_per_run,
            "ntasks_per_node": self.tasks_per_node,
        }
        if self.gpus_per_run:
            params["gpus_per_node"] = self.tasks_per_node
        for key, value in (("partition", self.partition), ("account", self.account), ("dependency", dependency)):
            if value is not None:
                params[key] = value
        if self.slurm:
            params["additional_parameters"] = dict(self.slurm)
        return params


# ---------------------------------------------------------------------------- the job
class RunJob(Checkpointable):
    """One planned run as a submitit job: every task trains (rank 0 also evaluates) and rank 0 leaves the
    outcome in the run directory, then refreshes results.jsonl (and the report after the last run)."""

    def __init__(self, execute: Execute, plan: PlannedRun, parent: Optional[PlannedRun], sweep_dir: Path,
                 extra: dict[str, Any], threads: int = 0) -> None:  # fmt: skip
        self.execute, self.plan, self.parent, self.sweep_dir = execute, plan, parent, sweep_dir.resolve()
        self.extra, self.threads = extra, threads
        self._requeue = False

    def __call__(self) -> str:
        """The run's state when this task ends: done, failed, interrupted or requeued."""
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # srun tasks, one per GPU: the env:// variables DeepSpeed's init reads
            import torch

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as experiments/distributed.launch does
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))  # the CPUs Slurm allocated
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        run_dir = self.sweep_dir / self.plan.name
        if env.global_rank == 0:  # a job Slurm requeued itself after a SIGTERM runs again: not stopped any more
            (run_dir / STOP_FILE).unlink(missing_ok=True)
        if self.parent is not None and completed_row(self.sweep_dir / self.parent.name, self.parent) is None:
            if env.global_rank == 0:
                (run_dir / ERROR_FILE).write_text(f"the run it depends on, {self.parent.name}, failed\n")
                refresh(self.sweep_dir)
            return "failed"
        previous = signal.signal(signal.SIGUSR2, self._preempted)
        try:
            status = self.execute(self.plan, run_dir, self.extra, world_size=env.num_tasks, rank=env.global_rank)
        finally:
            signal.signal(signal.SIGUSR2, previous)
        if env.global_rank != 0:
            return "done" if status == 0 else "stopped"
        state = {0: "done", 1: "failed"}.get(status, "interrupted")
        if state == "interrupted":
            if (self._requeue or status == TIME_LIMIT) and env.cluster == "slurm" and _requeue(env.job_id):
                return "requeued"
            write_json_atomic(run_dir / STOP_FILE, {"status": status})
        refresh(self.sweep_dir)
        return state

    def _preempted(self, signum: int, frame: Optional[FrameType]) -> None:
        """SIGUSR2 (preemption or the time limit is near): today's graceful stop, then a requeue."""
        self._requeue = True
        print("SIGUSR2 (preemption or the time limit): saving, then requeueing the job", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGTERM)  # runctl's handler: finish the step, save, stop


def _requeue(job_id: str) -> bool:
    """Put the job back in the queue (it restarts with the same id and resumes); False if Slurm refuses."""
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode:
        print(f"scontrol requeue {job_id} failed: {done.stderr.strip()}; rerun the sweep to resume", file=sys.stderr)
    return done.returncode == 0


# ---------------------------------------------------------------------------- the sweep directory
@contextmanager
def _results_lock(sweep_dir: Path) -> Iterator[None]:
    """Serialise the jobs that rewrite results.jsonl and the report (a blocking flock)."""
    fd = os.open(sweep_dir / ".results.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def planned_runs(sweep_dir: Path) -> list[PlannedRun]:
    """The sweep's runs as last run or submitted (sweep.json's `plans`; none in a sweep.json that predates it)."""
    return [PlannedRun.from_dict(p) for p in (_read_json(sweep_dir / "sweep.json") or {}).get("plans", [])]


def outcome(plan: PlannedRun, run_dir: Path) -> Optional[dict[str, Any]]:
    """The results row of a run that ended (done, failed or stopped), from its files; None until then."""
    row = completed_row(run_dir, plan)
    if row is not None:
        return row
    try:
        lines = [ln.strip() for ln in (run_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
        return failed_row(plan, lines[-1] if lines else "failed (empty error.txt)")
    except OSError:
        pass
    stop = _read_json(run_dir / STOP_FILE)
    return interrupted_row(plan, stop["status"]) if stop is not None else None


def refresh(sweep_dir: Path, ended: Optional[dict[str, str]] = None) -> tuple[list[dict[str, Any]], bool]:
    """Rewrite results.jsonl from the run directories; build the report once every run ended. `ended`: run ->
    the Slurm state of a job that ended without leaving an outcome (killed). Returns (rows, all ended)."""
    from llamoe.experiments.sweeps import report
    from llamoe.experiments.sweeps.report import load_results

    with _results_lock(sweep_dir):
        plans = planned_runs(sweep_dir)
        before = {r["run_dir"]: r for r in load_results(sweep_dir)} if (sweep_dir / "results.jsonl").exists() else {}
        rows, all_ended = [], True
        for plan in plans:
            run_dir = sweep_dir / plan.name
            row = outcome(plan, run_dir)
            if row is None and plan.name in (ended or {}):
                message = f"its job ended {ended[plan.name]} without a result; rerun the sweep to resume it"
                row = {**failed_row(plan, message), "status": "interrupted"}
            if row is None and not (run_dir / JOB_FILE).exists():
                row = before.get(plan.name)  # a run of the local scheduler
            all_ended &= row is not None
            if row is not None:
                rows.append(row)
        write_results(sweep_dir, rows)
        if all_ended and plans:
            report.build_report(sweep_dir)
    return rows, all_ended


def _live_jobs(records: dict[str, dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """(run -> Slurm state of its queued or running job (squeue), run -> final state of its ended job (sacct))."""
    ids = {name: r["job_id"] for name, r in records.items() if r.get("executor") == "slurm"}
    if not ids:
        return {}, {}
    try:
        queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()],
                               capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        raise UsageError(f"cannot ask Slurm about the sweep's jobs (squeue): {e}") from None
    live = dict(line.split("|", 1) for line in queue.split() if "|" in line)
    cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for job_id in sorted({j.split("_")[0] for j in ids.values()}):
        cmd += ["-j", job_id]
    try:
        info = SlurmInfoWatcher().read_info(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
    except (OSError, subprocess.SubprocessError):
        info = {}
    final = {n: (info.get(j, {}).get("State") or "UNKNOWN").split()[0] for n, j in ids.items() if j not in live}
    return {n: live[j] for n, j in ids.items() if j in live}, final


def sweep_status(sweep_dir: Path, out: TextIO) -> int:
    """`llamoe ablate SWEEP --status`: each run's state, job id and checkpoint; refreshes results.jsonl."""
    from llamoe.experiments.train.checkpoint import latest_checkpoint

    plans = planned_runs(sweep_dir)
    if not plans:
        raise UsageError(f"no sweep in {sweep_dir} (no sweep.json with its plans): run or submit the sweep first "
                         "(runs that are done are skipped)")  # fmt: skip
    records = {p.name: _read_json(sweep_dir / p.name / JOB_FILE) or {} for p in plans}
    live, ended = _live_jobs(records)
    rows = {r["run_dir"]: r for r in refresh(sweep_dir, ended)[0]}
    counts: dict[str, int] = {}
    for plan in plans:
        run_dir, record = sweep_dir / plan.name, records[plan.name]
        row = rows.get(plan.name) if plan.name not in live else None
        state = (row["status"] if row else live.get(plan.name, "submitted" if record else "not started")).lower()
        counts[state] = counts.get(state, 0) + 1
        latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        detail = [f"job {record['job_id']} ({record['executor']})"] if record else []
        detail += [f"checkpoint {latest.name}"] if latest is not None and state != "done" else []
        detail += [row["error"]] if row is not None and row.get("error") else []
        detail += [f"log {record['log']}"] if record.get("log") and state not in ("done", "pending") else []
        out.write(f"  {plan.name:<28} {state:<12} {'; '.join(detail)}\n")
    out.write(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(plans)} runs in {sweep_dir})\n")
    return 0


# ---------------------------------------------------------------------------- submission
def _dependency_order(plans: list[PlannedRun]) -> list[PlannedRun]:
    """Plans with each run after the run it depends on (file order otherwise)."""
    order: list[PlannedRun] = []
    placed: set[str] = set()
    pending = list(plans)
    while pending:
        ready = [p for p in pending if p.depends_on is None or p.depends_on in placed]
        assert ready, "experiments/sweeps/spec.py refuses circular init_from"
        order += ready
        placed |= {p.name for p in ready}
        pending = [p for p in pending if p.name not in placed]
    return order


def _job_command(folder: Path) -> str:
    """The command of every sbatch script: submitit's job runner on `folder`."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def check_slurm() -> None:
    """UsageError unless Slurm's commands are on PATH (submitting needs them; --dry-run does not)."""
    missing = [c for c in ("sbatch", "srun", "squeue") if shutil.which(c) is None]
    if missing:
        raise UsageError(f"--executor slurm: {', '.join(missing)} not on PATH; submit from a Slurm login node "
                         "(--dry-run prints the sbatch scripts anywhere)")  # fmt: skip


def _slurm_executor(folder: Path, params: dict[str, Any]) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=folder)  # parameters accumulate: one executor per submission
    executor.update_parameters(**params)
    return executor


def submit_sweep(
    execute: Execute,
    plans: list[PlannedRun],
    sweep_dir: Path,
    opts: ClusterOptions,
    *,
    parallel: Optional[int],
    extra: dict[str, dict[str, Any]],
    dry_run: bool = False,
    out: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """Submit a job running `execute` for each run neither done nor pending/running, in dependency order;
    returns the rows of the runs ended so far. Slurm returns once submitted (`dry_run`: prints the sbatch
    scripts instead); debug runs the jobs here. `extra`: run -> overrides outside its fingerprint."""
    out = out or sys.stdout
    folder = (sweep_dir / SUBMITIT_DIR).absolute()  # as submitit's executors spell it
    by_name = {p.name: p for p in plans}
    records = {p.name: _read_json(sweep_dir / p.name / JOB_FILE) or {} for p in plans}
    live = {} if dry_run else _live_jobs(records)[0]
    todo = [p for p in _dependency_order(plans) if p.name not in live and completed_row(sweep_dir / p.name, p) is None]
    for name, state in live.items():
        out.write(f"{name}: job {records[name]['job_id']} is {state.lower()}, not submitted again\n")
    job_ids = {n: records[n]["job_id"] for n in live}
    waits = {p.name: p.depends_on for p in todo if p.depends_on in job_ids or p.depends_on in {t.name for t in todo}}
    threads = max(1, (os.cpu_count() or 1) // (parallel or 1)) if opts.executor == "debug" else 0
    jobs = {
        p.name: RunJob(execute, p, by_name.get(p.depends_on or ""), sweep_dir, extra.get(p.name, {}), threads)
        for p in todo
    }
    if not dry_run:
        for plan in todo:
            run_dir = sweep_dir / plan.name
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (DONE_FILE, ERROR_FILE, STOP_FILE, JOB_FILE):
                (run_dir / stale).unlink(missing_ok=True)
            write_json_atomic(run_dir / PLAN_FILE, asdict(plan))
    if opts.executor == "debug":
        return _run_debug(todo, jobs, sweep_dir, folder, out) if not dry_run else []
    first = [p for p in todo if p.name not in waits]
    rest = [p for p in todo if p.name in waits]
    name = f"llamoe-{sweep_dir.name}"
    params = opts.slurm_parameters(name)
    if parallel is not None:
        params["array_parallelism"] = parallel
    if dry_run:
        array = {"map_count": len(first)} if len(first) > 1 else {}
        scripts = [(", ".join(p.name for p in first), {**params, **array})] if first else []
        scripts += [
            (p.name, opts.slurm_parameters(f"{name}-{p.name}", f"afterany:JOB-OF-{waits[p.name]}")) for p in rest
        ]
        for what, script in scripts:
            out.write(
                f"# ---- sbatch script for {what}\n{_make_sbatch_string(_job_command(folder), folder, **script)}\n"
            )
        return []
    if first:
        executor = _slurm_executor(folder, params)
        with executor.batch():
            submitted = [executor.submit(jobs[p.name]) for p in first]
        _record(sweep_dir, first, submitted, "slurm", job_ids, out)
    for plan in rest:
        params = opts.slurm_parameters(f"{name}-{plan.name}", f"afterany:{job_ids[waits[plan.name]]}")
        _record(sweep_dir, [plan], [_slurm_executor(folder, params).submit(jobs[plan.name])], "slurm", job_ids, out)
    return refresh(sweep_dir)[0]


def _record(sweep_dir: Path, plans: list[PlannedRun], jobs: list[Any], executor: str, job_ids: dict[str, str],
            out: TextIO) -> None:  # fmt: skip
    """Write each run's job.json (executor, job id, log, submission time) and say what was submitted."""
    for plan, job in zip(plans, jobs):
        job_ids[plan.name] = job.job_id
        record = {"executor": executor, "job_id": job.job_id, "log": str(job.paths.stdout),
                  "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        write_json_atomic(sweep_dir / plan.name / JOB_FILE, record)
        out.write(f"{plan.name}: submitted as {executor} job {job.job_id}\n")
        out.flush()


def _run_debug(
    todo: list[PlannedRun], jobs: dict[str, RunJob], sweep_dir: Path, folder: Path, out: TextIO
) -> list[dict[str, Any]]:
    """Run the jobs in this process, in dependency order, through submitit's DebugExecutor; a run stopped by a
    signal stops the sweep (runctl.Stopped), as under the local scheduler."""
    executor = submitit.DebugExecutor(folder)
    job_ids: dict[str, str] = {}
    for plan in todo:
        job = executor.submit(jobs[plan.name])
        _record(sweep_dir, [plan], [job], "debug", job_ids, out)
        if job.result() == "interrupted":
            status = (_read_json(sweep_dir / plan.name / STOP_FILE) or {}).get("status", 130)
            refresh(sweep_dir)
            raise runctl.Stopped(status, f"sweep stopped by {runctl.describe(status)} in {plan.name} (saved); "
                                         "rerun the same command to resume")  # fmt: skip
    return refresh(sweep_dir)[0]

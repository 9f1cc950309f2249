"""Running a sweep's planned runs: N worker processes at a time, resumable, one row per run.

Each run is an ordinary run directory under the sweep directory. The scheduler writes the
run's plan, starts a worker subprocess for it (its own session, its output in the run's
`sweep.log`), and reads the outcome back: `done.json` (the results row and the fingerprint
of the settings that produced it), `error.txt` (a traceback), or an exit status that says
the worker stopped on request. A run whose `done.json` matches its fingerprint is skipped,
so rerunning a sweep resumes it. `results.jsonl` is rewritten after every run.

SIGTERM or SIGINT to the sweep reaches every worker once (experiments/train/runctl.py): each saves
a checkpoint and stops, no new run starts, and run_sweep raises runctl.Stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from llamoe.experiments.errors import write_text_atomic
from llamoe.experiments.sweeps.spec import PlannedRun, Sweep, SweepError, expand
from llamoe.experiments.train import runctl

PLAN_FILE = "plan.json"
DONE_FILE = "done.json"
ERROR_FILE = "error.txt"
LOG_FILE = "sweep.log"
RESULTS_FILE = "results.jsonl"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place, so readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n", path.name)


def completed_row(run_dir: Path, plan: PlannedRun) -> Optional[dict[str, Any]]:
    """The result row of a run completed with exactly these settings, else None (run it, or resume it)."""
    try:
        done = json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return done["row"] if done.get("fingerprint") == plan.fingerprint() else None


def failed_row(plan: PlannedRun, message: str) -> dict[str, Any]:
    """The results row of a run that did not complete."""
    return {"run": plan.label, "seed": plan.seed, "run_dir": plan.name, "status": "failed", "error": message}


def interrupted_row(plan: PlannedRun, status: int) -> dict[str, Any]:
    """The results row of a run stopped on request (it saved a checkpoint; rerunning the sweep resumes it)."""
    return {
        **failed_row(plan, f"stopped by {runctl.describe(status)}; rerun the sweep to resume"),
        "status": "interrupted",
    }


def _stop_status(returncode: int) -> Optional[int]:
    """The stop status of a worker that exited on request (128+N, 124, or killed by SIGTERM/SIGINT), else None."""
    status = 128 - returncode if returncode < 0 else returncode
    return status if status in (130, 143, runctl.TIME_LIMIT) else None


def _error_summary(run_dir: Path, returncode: int) -> str:
    try:
        lines = [ln for ln in (run_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else f"worker exited with status {returncode} (see {run_dir / LOG_FILE})"


def write_results(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """results.jsonl: one JSON row per run, replaced atomically."""
    path = sweep_dir / RESULTS_FILE
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows), "sweep results")
    return path


@dataclass
class _Worker:
    plan: PlannedRun
    proc: subprocess.Popen
    reader: threading.Thread
    started: float
    slot: int


def visible_gpus() -> list[str]:
    """The CUDA devices this process may give its workers: CUDA_VISIBLE_DEVICES's entries when it is set,
    else every device torch counts (none on a machine without CUDA)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _launch(
    plan: PlannedRun,
    sweep_dir: Path,
    worker: Sequence[str],
    threads: int,
    out: TextIO,
    lock: threading.Lock,
    slot: int = 0,
    gpu: Optional[str] = None,
) -> _Worker:
    """Start a worker subprocess in worker slot `slot` for one run (`worker` + PLAN_FILE --threads N), on CUDA
    device `gpu` alone when given (its CUDA_VISIBLE_DEVICES); its output goes to the run's sweep.log and, prefixed, to `out`."""
    run_dir = sweep_dir / plan.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    (run_dir / DONE_FILE).unlink(missing_ok=True)
    write_json_atomic(run_dir / PLAN_FILE, asdict(plan))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    cmd = [*worker, str(run_dir / PLAN_FILE), "--threads", str(threads)]
    proc = subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches the sweep, which passes it on once
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        with open(run_dir / LOG_FILE, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with lock:
                    out.write(f"[{plan.name}] {line}")
                    out.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return _Worker(plan, proc, reader, time.time(), slot)


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    worker: Sequence[str],
    *,
    parallel: int = 1,
    cli_overrides: Optional[dict[str, Any]] = None,
    out: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every planned run (N at a time), skipping complete ones; returns the result rows.

    `worker` is the command that runs one plan file in a subprocess (`llamoe ablate`'s hidden
    `--worker` mode), which writes the run's DONE_FILE or ERROR_FILE.

    A run that fails gets a `failed` row and the others go on; an eval-only run
    (or one that starts from another run's weights) waits for that run and fails if it failed. results.jsonl is
    rewritten after every run, so a sweep in progress can already be inspected.
    SIGTERM/SIGINT are passed on to the running workers; once they saved, this raises
    runctl.Stopped (rows so far are in results.jsonl, stopped runs `interrupted`).
    On a machine with CUDA devices, worker slot i (of `parallel`) runs on visible device i mod their
    count, alone (its CUDA_VISIBLE_DEVICES), so N workers spread over N GPUs instead of sharing cuda:0.
    """
    if parallel < 1:
        raise SweepError("--parallel", f"must be >= 1, got {parallel}")
    plans = expand(sweep, cli_overrides)
    out = out or sys.stdout
    sweep_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    gpus = visible_gpus()
    free_slots = list(range(parallel))
    lock = threading.Lock()
    rows: dict[str, dict[str, Any]] = {}
    queue = list(plans)
    running: dict[str, _Worker] = {}
    t0 = time.time()

    def say(msg: str) -> None:
        with lock:
            out.write(f"[sweep {sweep.name} {len(rows)}/{len(plans)} {time.time() - t0:6.0f}s] {msg}\n")
            out.flush()

    def record(plan: PlannedRun, row: dict[str, Any]) -> None:
        rows[plan.name] = row
        write_results(sweep_dir, [rows[p.name] for p in plans if p.name in rows])

    def forward(signum: int) -> None:
        for w in running.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signum)

    on = f", GPUs {','.join(gpus)} round-robin" if gpus else ""
    say(f"{len(plans)} runs -> {sweep_dir} ({parallel} at a time, {threads} torch thread(s) each{on})")
    signals = runctl.StopSignals(forward, announce=False)
    try:
        signals.__enter__()
        while queue or running:
            if signals.status and queue:
                say(f"{runctl.describe(signals.status)}: waiting for {len(running)} run(s) to save; starting no more")
                queue.clear()
            for plan in list(queue):
                if len(running) >= parallel:
                    break
                row = completed_row(sweep_dir / plan.name, plan)
                if row is not None:
                    queue.remove(plan)
                    record(plan, row)
                    say(f"{plan.name}: already complete, skipped")
                    continue
                if plan.depends_on is not None:
                    dep = rows.get(plan.depends_on)
                    if dep is None:
                        continue  # the checkpoint it evaluates or starts from is not trained yet
                    if dep["status"] != "done":
                        queue.remove(plan)
                        record(plan, failed_row(plan, f"the run it depends on, {plan.depends_on}, failed"))
                        say(f"{plan.name}: FAILED, the run it depends on, {plan.depends_on}, failed")
                        continue
                queue.remove(plan)
                slot = free_slots.pop(0)
                gpu = gpus[slot % len(gpus)] if gpus else None
                running[plan.name] = _launch(plan, sweep_dir, worker, threads, out, lock, slot, gpu)
                say(
                    f"{plan.name}: started"
                    + (f" (evaluating {plan.reuse}'s checkpoint)" if plan.reuse else "")
                    + (f" (from {plan.init_from}'s weights)" if plan.init_from else "")
                )
            finished = [w for w in running.values() if w.proc.poll() is not None]
            for w in finished:
                w.reader.join()
                del running[w.plan.name]
                free_slots.append(w.slot)
                free_slots.sort()
                run_dir = sweep_dir / w.plan.name
                row = completed_row(run_dir, w.plan) if w.proc.returncode == 0 else None
                took = time.time() - w.started
                stop = _stop_status(w.proc.returncode) if row is None else None
                if stop is not None:
                    record(w.plan, interrupted_row(w.plan, stop))
                    say(
                        f"{w.plan.name}: interrupted after {took:.0f}s ({runctl.describe(stop)}); it resumes on a rerun"
                    )
                elif row is None:
                    message = _error_summary(run_dir, w.proc.returncode)
                    record(w.plan, failed_row(w.plan, message))
                    say(f"{w.plan.name}: FAILED after {took:.0f}s: {message} (traceback in {run_dir / ERROR_FILE})")
                else:
                    record(w.plan, row)
                    say(f"{w.plan.name}: done in {took:.0f}s")
            if not finished:
                time.sleep(0.2)
    finally:
        signals.__exit__()
        for w in running.values():  # only after an error or an abort: the workers abort too
            w.proc.terminate()
        for w in running.values():
            w.proc.wait()
    if signals.status:
        stopped = [p.name for p in plans if rows.get(p.name, {}).get("status") == "interrupted"]
        raise runctl.Stopped(signals.status, f"sweep stopped by {runctl.describe(signals.status)}: "
                             f"{len(stopped)} run(s) saved and interrupted ({', '.join(stopped) or 'none'}), "
                             f"{len(plans) - len(rows)} not started; rerun the same command to resume")  # fmt: skip
    return [rows[p.name] for p in plans]

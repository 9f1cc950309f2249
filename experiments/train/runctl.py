"""Run control: who owns a run or sweep directory, and how a run stops before it is done.

Ownership: the process that trains in a directory holds an exclusive `fcntl.flock` on
`DIR/.llamoe.lock`, a file that names it (host, pid, start time, command). A second launch
finds the lock taken and exits with status 2, naming the holder. The kernel drops the lock
when its process dies, however it dies; a lock file that still names a holder but is no longer
locked was left by a dead process, and the next launch takes it over and says so. Under
`--nproc` rank 0 holds it. The file is emptied, never deleted, on release: deleting a lock file
lets two processes lock two different files.

Stopping: SIGTERM (what Slurm and Kubernetes send before preemption) and SIGINT (Ctrl-C) ask the
run to stop: it finishes the current step, saves a checkpoint and exits with 128 + the signal
(143, 130). `train.time_limit_s` does the same (status 124) when the next step and save would not
fit before the limit. A second signal aborts at once; the last complete checkpoint stays valid. A
signal repeated within `DUPLICATE_S` is taken as the same request (a scheduler that signals every
process of a job reaches a worker directly and through its launcher).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

from llamoe.experiments.errors import TIME_LIMIT, UsageError
from llamoe.experiments.train import collectives

LOCK_FILE = ".llamoe.lock"
DUPLICATE_S = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunLocked(UsageError):
    """The directory is owned by another live process."""


class Stopped(Exception):
    """A run stopped early on request (a signal or the time limit) after saving; `status` is its exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = status


class Aborted(BaseException):
    """A second signal: stop at once (a BaseException, so ordinary error handling does not swallow it)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"aborted by a second {describe(status)}; the last complete checkpoint is kept")
        self.exit_status = status


def describe(status: int) -> str:
    """'SIGTERM', 'SIGINT', or 'time limit' for an exit status of this convention."""
    if status == TIME_LIMIT:
        return "train.time_limit_s"
    try:
        return signal.Signals(status - 128).name
    except ValueError:
        return f"status {status}"


# ---------------------------------------------------------------------- ownership
class DirLock:
    """An exclusive lock on a directory (see the module docstring); a context manager."""

    def __init__(self, directory: str | Path, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a message when it took over a dead holder's lock. RunLocked if held."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read(fd))
            os.close(fd)
            raise RunLocked(
                f"{self.what} {self.directory} is in use by {holder}; wait for it to finish, stop it "
                "(kill -TERM <pid> saves a checkpoint first), or use another directory"
            ) from None
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        if previous:
            return f"took over the lock of {self.directory}: {_holder_text(previous)} is no longer running"
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> DirLock:
        message = self.acquire()
        if message:
            print(message, file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_unlocked(directory: str | Path, what: str = "run directory") -> None:
    """RunLocked if a live process holds `directory` (a launcher's check before it starts workers)."""
    if (Path(directory) / LOCK_FILE).exists():
        lock = DirLock(directory, what)
        lock.acquire()
        lock.release()


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}  # fmt: skip


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}: {holder.get('command')})"


# ---------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM/SIGINT handlers for the duration of a `with` block (in the main thread only).

    The first signal sets `status` (128 + signal) and calls `on_signal(signum)`; a later one (after
    DUPLICATE_S) calls `on_signal` again and raises Aborted. Previous handlers are restored on exit.
    """

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None, announce: bool = True) -> None:
        self.on_signal = on_signal
        self.announce = announce
        self.status: Optional[int] = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        now = time.monotonic()
        if self.status is not None and now - self._first < DUPLICATE_S:
            return
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.status is not None:
            raise Aborted(128 + signum)
        self.status, self._first = 128 + signum, now
        if self.announce:
            print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(send it again to abort at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopControl:
    """When a training loop should stop early: on a signal, or before `time_limit_s` (from `started`).

    `should_stop` is called by every rank after every step; ranks agree through an all-reduce
    (max) of their statuses, so all of them save the same step.
    """

    def __init__(self, signals: StopSignals, time_limit_s: Optional[float], started: float) -> None:
        self.signals = signals
        self.time_limit_s = time_limit_s
        self.started = started
        self.longest_step_s = 0.0
        self.save_s = 0.0
        self.last_save_s = 0.0

    def saved(self, seconds: float) -> None:
        """Record how long a save took (the time limit keeps room for one)."""
        self.save_s = max(self.save_s, seconds)
        self.last_save_s = seconds

    def should_stop(self, step_s: float, distributed: bool) -> int:
        """0 to go on, else the exit status to stop with (agreed across ranks)."""
        self.longest_step_s = max(self.longest_step_s, step_s)
        status = self.signals.status or 0
        if not status and self.time_limit_s is not None:
            remaining = self.time_limit_s - (time.perf_counter() - self.started)
            status = TIME_LIMIT if remaining < self.longest_step_s + self.save_s else 0
        return collectives.agree_max(status) if distributed else status

    def stopped(self, status: int, step: int, max_steps: int, checkpoint: Path) -> Stopped:
        """The Stopped of a run that saved `checkpoint` at `step` and stops with `status`."""
        return Stopped(status, f"stopped by {describe(status)} at step {step}/{max_steps} after saving "
                               f"{checkpoint} ({self.last_save_s:.2f} s); rerun the same command to resume")  # fmt: skip


def all_ok(ok: bool, distributed: bool) -> bool:
    """Whether `ok` holds on every rank (an all-reduce of failures; `ok` itself in one process)."""
    return collectives.all_true(ok) if distributed else ok


# ---------------------------------------------------------------------- launchers
def forward_signals(runner_pid: int) -> StopSignals:
    """Handlers that pass SIGTERM/SIGINT on to the training workers, once per signal, so each saves.

    The workers are the grandchildren of DeepSpeed's runner `runner_pid` (runner -> launch.py ->
    workers). launch.py itself is not signalled: it would terminate the workers before they saved.
    """
    import psutil  # a DeepSpeed dependency

    def forward(signum: int) -> None:
        try:
            workers = [w for launcher in psutil.Process(runner_pid).children() for w in launcher.children()]
        except psutil.Error:
            return
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.Error:
                pass

    return StopSignals(forward, announce=False)


__all__ = [
    "Aborted",
    "DirLock",
    "LOCK_FILE",
    "RunLocked",
    "StopControl",
    "StopSignals",
    "Stopped",
    "all_ok",
    "check_unlocked",
    "describe",
    "forward_signals",
]

"""One exit-status convention for every `llamoe` subcommand, and how errors a user can cause are shown.

Exit status:
    0    done
    1    a run failed: diverged, an unusable checkpoint, a write that failed (disk full, permissions)
    2    bad input: an invalid config or sweep, a missing run directory or checkpoint, a directory in use
    124  a run stopped at train.time_limit_s, after saving a checkpoint
    128+N  a run stopped by signal N after saving a checkpoint (130: SIGINT, 143: SIGTERM), or aborted
           at once by a second signal

An error a user can cause prints one line, `llamoe <command>: <message>`, and no traceback;
`llamoe --debug ...` or LLAMOE_DEBUG=1 prints the traceback too. Only bugs show a traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Optional, Union

FAILED = 1
USAGE = 2
TIME_LIMIT = 124


class UserError(Exception):
    """An error the user can act on; the message says what to do, `exit_status` which convention applies."""

    exit_status = FAILED


class UsageError(UserError):
    """Bad input: the command cannot start with what it was given."""

    exit_status = USAGE


class WriteError(UserError):
    """A file could not be written (disk full, quota, permissions); whatever was written before is intact."""


def debug_enabled() -> bool:
    """Whether tracebacks are wanted (`llamoe --debug` sets LLAMOE_DEBUG=1, which workers inherit)."""
    return os.environ.get("LLAMOE_DEBUG", "") not in ("", "0")


def report(prog: str, error: BaseException, status: int, prefix: str = "", quiet: bool = False) -> int:
    """Print `prog: prefix error` (and the traceback under --debug) to stderr unless `quiet`; return `status`."""
    if not quiet:
        if debug_enabled():
            traceback.print_exception(type(error), error, error.__traceback__)
        print(f"{prog}: {prefix}{error}", file=sys.stderr, flush=True)
    return status


def exit_status(error: BaseException) -> Optional[int]:
    """The exit status of an error a user can cause, or of a requested stop; None for a bug.

    Anything with an `exit_status` attribute (UserError, runctl.Stopped, runctl.Aborted) says
    its own; OSError is a failed run (1); KeyboardInterrupt is 130.
    """
    status = getattr(error, "exit_status", None)
    if isinstance(status, int):
        return status
    if isinstance(error, OSError):
        return FAILED
    if isinstance(error, KeyboardInterrupt):
        return 130
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def io_reason(error: BaseException) -> str:
    """The OS reason of a failed write: the OSError itself or the one behind it (torch.save wraps it)."""
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def write_failed(what: str, path: Union[str, Path], error: BaseException, needed: Optional[int] = None) -> WriteError:
    """A WriteError saying what could not be written where, why, and how many bytes it needed vs had free."""
    message = f"could not write {what} {path}: {io_reason(error)}"
    if needed is not None:
        message += f"; it needs about {human_bytes(needed)}"
        existing = next((p for p in Path(path).parents if p.exists()), None)
        if existing is not None:
            message += f", {human_bytes(shutil.disk_usage(existing).free)} are free there"
    return WriteError(message)


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place, so a reader sees the old
    file or the new one; a failed write removes the temporary file and raises write_failed(what, path)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(what, path, e) from e


__all__ = [
    "FAILED",
    "TIME_LIMIT",
    "USAGE",
    "UsageError",
    "UserError",
    "WriteError",
    "debug_enabled",
    "exit_status",
    "human_bytes",
    "io_reason",
    "report",
    "write_failed",
    "write_text_atomic",
]

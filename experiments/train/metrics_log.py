"""A run's training log, `metrics.jsonl`: one JSON object per logged step, appended by rank 0.

The one writer (experiments/train/loop.py) and the one reader (training, sweeps, reports, tests).
Rows are appended whole, so a crash mid-write can tear only the last line: the reader drops an
unreadable last line (a run still writing, or one that died) and raises on any other, since a
corrupt row in the middle was not written by a crash and skipping it would hide logged steps.
A resumed run first cuts the log back to its checkpoint's step and drops a torn last line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

from llamoe.experiments.errors import UserError, write_text_atomic

FILE = "metrics.jsonl"


def number(value: Any) -> float | None:
    """A logged value as a float when it is a finite int or float (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) for every row of the log at `path`; see the module docstring for unreadable lines."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            if number == len(lines):
                break  # torn by a crash (or a write in progress); the next resume drops it
            raise UserError(
                f"{path}:{number}: corrupt training log line ({e}); only the last line can be torn by a crash, "
                "so this one was changed after it was written: repair or delete it"
            ) from e
        out.append((line, row))
    return out


def read_metrics(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (none if it has no log yet), without a torn last line."""
    return [row for _, row in _rows(Path(run_dir) / FILE)]


def append(run_dir: Union[str, Path], row: dict[str, Any]) -> None:
    """Append one row to a run's metrics.jsonl."""
    with open(Path(run_dir) / FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate(run_dir: Union[str, Path], last_step: int) -> None:
    """Drop the rows logged after `last_step` (after the checkpoint a run resumes from) and a torn last line."""
    path = Path(run_dir) / FILE
    if path.is_file():
        keep = "".join(line + "\n" for line, row in _rows(path) if row.get("step", 0) <= last_step)
        write_text_atomic(path, keep, "the training log")

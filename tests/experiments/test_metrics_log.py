"""The training log: a torn last line is dropped, a corrupt line elsewhere is named, resume cuts the log back."""

import json
import re
from pathlib import Path

import pytest

from llamoe.experiments.errors import UserError
from llamoe.experiments.train import metrics_log


def _write(run_dir: Path, text: str) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)


def test_rows_append_and_read_back_and_a_missing_log_reads_empty(tmp_path: Path) -> None:
    assert metrics_log.read_metrics(tmp_path / "nothing") == []
    rows = [
        {"step": 1, "loss": 3.25, "router": {"1": {"tokens_per_expert": [3, 1]}}},
        {"step": 2, "loss": float("nan")},
    ]
    for row in rows:
        metrics_log.append(tmp_path, row)
    read = metrics_log.read_metrics(tmp_path)
    assert read[0] == rows[0] and read[1]["step"] == 2 and read[1]["loss"] != read[1]["loss"]  # NaN survives


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    _write(tmp_path, '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    assert [r["step"] for r in metrics_log.read_metrics(tmp_path)] == [1, 2]


def test_a_corrupt_line_before_the_last_raises_naming_the_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, '{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: corrupt training log line"):
        metrics_log.read_metrics(tmp_path)
    _write(tmp_path, '{"step": 1}\n[1, 2]\n{"step": 3}\n')  # valid JSON, but not a row
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'metrics.jsonl'}:2: ") + ".*not an object"):
        metrics_log.read_metrics(tmp_path)


def test_truncate_keeps_the_rows_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    _write(tmp_path, "\n".join(lines) + '\n{"step": 5, "loss"')
    metrics_log.truncate(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    metrics_log.truncate(tmp_path / "fresh", 0)  # a new run has no log to cut
    assert not (tmp_path / "fresh").exists()

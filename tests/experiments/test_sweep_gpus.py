"""`llamoe ablate --parallel N` spreads its workers over the visible GPUs: worker slot i runs alone on
visible device i mod their count (its CUDA_VISIBLE_DEVICES), never all on cuda:0."""

import json
import sys
from pathlib import Path

import pytest

from llamoe.experiments.sweeps import scheduler
from llamoe.experiments.sweeps.spec import parse_sweep

RECORDER = """
import json, os, sys, time
run_dir = os.path.dirname(sys.argv[1])
started = time.time()
time.sleep(0.6)
with open(os.path.join(run_dir, "worker_env.json"), "w") as f:
    json.dump({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started, "end": time.time()}, f)
sys.exit(3)
"""


def _sweep(n: int) -> object:
    runs = {f"r{i}": {"train.seed": i} for i in range(n)}
    return parse_sweep({"name": "gpus", "base": {"model": "llama3.1-tiny"}, "runs": runs})


def _envs(sweep_dir: Path, n: int) -> list[dict]:
    return [json.loads((sweep_dir / f"r{i}" / "worker_env.json").read_text()) for i in range(n)]


def test_parallel_workers_get_one_visible_gpu_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    rows = scheduler.run_sweep(_sweep(5), tmp_path / "out", [sys.executable, str(script)], parallel=2, out=sys.stderr)
    assert [r["status"] for r in rows] == ["failed"] * 5  # the recorder exits 3; its environment is what counts
    envs = _envs(tmp_path / "out", 5)
    assert {e["gpus"] for e in envs} == {"3", "5"}
    for i, a in enumerate(envs):  # two workers running at the same time never share a GPU
        for b in envs[i + 1 :]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["gpus"] != b["gpus"], (a, b)


def test_more_workers_than_gpus_share_them_round_robin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    scheduler.run_sweep(_sweep(2), tmp_path / "out", [sys.executable, str(script)], parallel=2, out=sys.stderr)
    assert [e["gpus"] for e in _envs(tmp_path / "out", 2)] == ["7", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no device visible: the workers' environment is left alone
    assert scheduler.visible_gpus() == []

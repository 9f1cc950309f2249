"""Routing health: the tail summary against hand computations, and the collapse warning end to end
(a real MoE model's router stats -> metrics.jsonl -> results row -> report.md)."""

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from llamoe.experiments.commands.ablate import _training_fields
from llamoe.experiments.config import load_run_config
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.sweeps.report import build_report
from llamoe.experiments.train import routing_health
from llamoe.experiments.train.distributed import World
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.experiments.train.train_metrics import RouterStats
from llamoe.models import Transformer


def _row(step: int, imbalance: float, entropy: float, loads: dict[str, list[int]]) -> dict[str, Any]:
    router = {layer: {"tokens_per_expert": counts} for layer, counts in loads.items()}
    return {"step": step, "loss": 2.0, "load_imbalance": imbalance, "router_entropy": entropy, "router": router}


def test_summary_equals_a_hand_computation_over_the_last_tenth_of_steps() -> None:
    early = [_row(s, 7.0, 0.1, {"1": [100, 0, 0, 0], "3": [100, 0, 0, 0]}) for s in range(10, 190, 10)]
    tail = [
        _row(190, 3.0, 1.5, {"1": [60, 30, 9, 1], "3": [25, 25, 25, 25]}),
        _row(200, 2.0, 1.0, {"1": [40, 30, 1, 0], "3": [25, 25, 25, 25]}),
    ]
    health = routing_health.summarize([{"step": 0, "loss": 5.0}, *early, *tail])
    # tail = steps > 0.9 * 200 = 180: rows 190 and 200 only
    assert health["routing_imbalance"] == pytest.approx((3.0 + 2.0) / 2)
    assert health["routing_entropy"] == pytest.approx((1.5 + 1.0) / 2)
    # layer 1 summed over the tail: [100, 60, 10, 1], fair share 171/4 = 42.75, dead below 4.275:
    # one expert of four (row 200 alone would count two). Layer 3 is uniform: none.
    assert health["routing_dead_frac"] == pytest.approx((1 / 4 + 0 / 4) / 2)
    assert routing_health.collapse_reasons(health) == ["imbalance 2.50 > 2.0"]


def test_dense_runs_have_no_routing_health() -> None:
    assert routing_health.summarize([{"step": s, "loss": 2.0} for s in (10, 20)]) == {}
    assert routing_health.table_columns([[{"run": "dense", "val_loss": 2.0}]]) == []
    assert routing_health.report_lines([{"run": "dense", "status": "done"}]) == []


def _routing_rows(moe_args: list[str], favoured_bias: float, steps: int = 4) -> list[dict[str, Any]]:
    """metrics rows from a real tiny MoE model's router stats over `steps` logged forwards on Python
    source text; favoured_bias > 0 adds that selection bias to expert 0 of every router."""
    cfg = load_run_config(None, [*moe_args, "model.moe.bias_balancing=true"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf[0] += favoured_bias
    ids = Tokenizer.byte_level().encode(Path(routing_health.__file__).read_text())
    batch = torch.tensor(ids[: 4 * 4 * 128]).reshape(4, 4, 128)  # steps x batch x length
    stats, rows = RouterStats(), []
    with torch.no_grad():
        for step in range(steps):
            stats.add(model(batch[step % 4]).router_stats)
            rows.append({"step": step + 1, "loss": 2.0, **stats.reduce(World())})
    return rows


def _sweep(tmp_path: Path, runs: dict[str, list[dict[str, Any]]]) -> str:
    """Write each run's metrics.jsonl, build its results row through ablate's training fields, and
    return the report built from the sweep directory."""
    results = []
    for name, rows in runs.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        fields = _training_fields({"tokens": 1, "tokens_per_s": 1.0, "final_loss": 2.0, "val_loss": 2.0}, run_dir)
        results.append({"run": name, "seed": 0, "run_dir": name, "status": "done", **fields})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return build_report(tmp_path).read_text()


def test_collapse_warning_for_a_router_favouring_one_expert_and_not_for_a_balanced_one(
    tmp_path: Path, tiny_moe: list[str]
) -> None:
    collapsed, balanced = _routing_rows(tiny_moe, favoured_bias=10.0), _routing_rows(tiny_moe, favoured_bias=0.0)
    # every token of every layer on expert 0: max/mean = num_experts (4), three of four experts dead
    health = routing_health.summarize(collapsed)
    assert health["routing_imbalance"] == pytest.approx(4.0)
    assert health["routing_dead_frac"] == pytest.approx(0.75)
    assert 0 < health["routing_entropy"] <= math.log(4)
    fair = routing_health.summarize(balanced)
    assert fair["routing_imbalance"] < 2.0 and fair["routing_dead_frac"] <= 0.25, fair

    report = _sweep(tmp_path, {"collapsed": collapsed, "balanced": balanced, "dense": [{"step": 4, "loss": 2.0}]})
    warnings = [line for line in report.splitlines() if "WARNING: router collapse" in line]
    assert len(warnings) == 1 and "`collapsed`" in warnings[0], warnings
    assert "imbalance 4.00 > 2.0" in warnings[0] and "dead-expert fraction 0.75 > 0.25" in warnings[0]
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[1:]}
    column = header.index("imbalance")
    assert cells["collapsed"][column] == "4.00" and cells["dense"][column] == "-"
    assert float(cells["balanced"][column]) == pytest.approx(fair["routing_imbalance"], abs=0.005)
    assert cells["collapsed"][header.index("dead experts")] == "0.75"


def test_training_prints_routing_health_at_the_end(
    tmp_path: Path, run_args: Callable[..., list[str]], tiny_moe: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    train(load_run_config(None, run_args(tmp_path / "run", *tiny_moe, "train.max_steps=4")))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == routing_health.describe(routing_health.summarize(read_metrics(tmp_path / "run")))
    assert line.startswith("routing health (last 10% of steps): imbalance ")

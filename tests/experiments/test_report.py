"""Report generation from a synthetic sweep directory: table contents, matching notes, plots."""

import json
from pathlib import Path

import numpy as np
import pytest

from llamoe.experiments.evals.stats import bootstrap_mean
from llamoe.experiments.sweeps import report


def _write_run(sweep: Path, name: str, losses: list[float], moe: bool) -> None:
    run_dir = sweep / name
    run_dir.mkdir(parents=True)
    rows = []
    for step, loss in enumerate(losses, start=1):
        row = {"step": step, "tokens": step * 512, "loss": loss}
        if moe:
            row["router"] = {"1": {"tokens_per_expert": [step, 1, 1, 1]}, "3": {"tokens_per_expert": [1, 1, 1, step]}}
        rows.append(row)
    rows.append({"step": len(losses), "tokens": len(losses) * 512, "val_loss": losses[-1] + 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(run: str, seed: int, active: int, total: int, flops: float, loss: float, passkey: float) -> dict:
    return {
        "run": run,
        "seed": seed,
        "run_dir": f"{run}-s{seed}",
        "status": "done",
        "params": total,
        "active_params": active,
        "flops_per_token": flops,
        "train_seq_len": 128,
        "tokens": 2048,
        "tokens_per_s": 1000.0,
        "final_loss": loss,
        "val_loss": loss + 0.1,
        "eval": {
            "passkey@128": 1.0,
            "passkey@256": passkey,
            "ppl@128": 10.0 + seed,
            "ppl@256": 12.0,
            "nll@128": 2.3,
            "ppl@256:off": 13.0,
        },
    }


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic sweep (dense vs MoE, two seeds, one failed run) with its report built once."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    rows = []
    for seed in (0, 1):
        rows.append(_row("dense", seed, 1_000_000, 1_000_000, 6e6, 3.0 + seed, 0.25))
        rows.append(_row("moe", seed, 1_010_000, 3_000_000, 6.1e6, 2.5 + seed, 0.75))
        _write_run(tmp_path, f"dense-s{seed}", [4.0, 3.5, 3.0 + seed], moe=False)
        _write_run(tmp_path, f"moe-s{seed}", [4.0, 3.0, 2.5 + seed], moe=True)
    rows.append({"run": "broken", "seed": 0, "run_dir": "broken-s0", "status": "failed", "error": "ValueError: boom"})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "toy", "description": "a toy sweep", "baseline": "dense"}))
    report.build_report(tmp_path)
    return tmp_path


def test_report_table_has_every_run_with_mean_and_std(sweep_dir: Path) -> None:
    text = (sweep_dir / "report.md").read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| run | seeds | params | active | active/base | FLOPs/tok | FLOPs/base")
    assert table[0].endswith("| passkey@128 | passkey@256 |")  # no ppl@/nll@ (they average failures away), no :off
    by_run = {ln.split("|")[1].strip(): ln for ln in table[1:]}
    assert set(by_run) == {"dense", "moe", "broken"}
    # final loss of dense over seeds 0, 1: 3.0 and 4.0 -> mean 3.5, t-interval 3.5 +- 12.706 * 0.707 / sqrt(2)
    assert "3.500 [-2.853, 9.853]" in by_run["dense"]
    assert "| 2/2 |" in by_run["moe"] and "| 0/1 |" in by_run["broken"]
    assert "1.01x" in by_run["moe"] and "1.00x" in by_run["dense"]
    assert "0.750" in by_run["moe"]  # passkey@256
    assert "matched active params, FLOPs/token" in text
    assert "3.00x total params" in text
    assert "`broken-s0`: ValueError: boom" in text


def test_report_plots_exist_and_are_linked(sweep_dir: Path) -> None:
    text = (sweep_dir / "report.md").read_text()
    plots = sweep_dir / "plots"
    expected = ["loss_vs_tokens", "loss_vs_flops", "ppl_vs_length", "passkey_heatmap", "expert_load_moe"]
    for name in expected:
        png = plots / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in text
    assert not (plots / "expert_load_dense.png").exists()  # dense runs log no router stats


def test_router_loads_normalises_per_step() -> None:
    # rows as experiments/train/loop.py logs them: per-layer router stats beside the tokens-per-expert counts
    def row(tokens: int, counts: dict[str, list[int]]) -> dict:
        router = {layer: {"tokens_per_expert": c, "load_imbalance": 1.5, "cv": 0.5} for layer, c in counts.items()}
        return {"step": tokens // 10, "tokens": tokens, "loss": 2.0, "load_imbalance": 1.5, "router": router}

    metrics = [row(10, {"1": [3, 1], "3": [0, 4]}), {"step": 1, "tokens": 10, "val_loss": 2.1}, row(20, {"1": [1, 1]})]
    loads = report.router_loads(metrics)
    assert loads == {1: ([10.0, 20.0], [[0.75, 0.25], [0.5, 0.5]]), 3: ([10.0], [[0.0, 1.0]])}


def test_terminal_table_lists_runs_and_eval_keys(sweep_dir: Path) -> None:
    table = report.terminal_table(report.load_results(sweep_dir), "dense")
    lines = table.splitlines()
    assert lines[0].split()[0] == "run" and "passkey@256" in lines[0]
    assert [ln.split()[0] for ln in lines[2:]] == ["dense", "moe", "broken"]


def test_report_cli_rejects_a_non_sweep_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_one_seed_cells_carry_the_bootstrap_interval_and_the_headline_compares_with_the_baseline(
    tmp_path: Path,
) -> None:
    def row(run: str, delta: float, half: float) -> dict:
        return {
            "run": run,
            "seed": 0,
            "run_dir": run,
            "status": "done",
            "train_seq_len": 64,
            "eval": {
                "delta_tail_nll@512": delta,
                "tail_nll@512": 2.0 + delta,
                "bucket_nll@0-64": 1.5,
                "bucket_nll@64-128": 1.5 + delta,
            },
            "eval_ci95": {"delta_tail_nll@512": [delta - half, delta + half], "bucket_nll@0-64": [1.4, 1.6]},
        }

    rows = [row("rope", 0.8, 0.03), row("irope", 0.1, 0.04), row("nope", 0.78, 0.05)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "lc", "baseline": "rope"}))
    text = report.build_report(tmp_path).read_text()
    head = text[text.index("## Headline: `delta_tail_nll@512`") : text.index("## Results")]
    lines = {ln.split("|")[1].strip(): ln for ln in head.splitlines() if ln.startswith("| ") and "run |" not in ln}
    assert "0.800 [0.770, 0.830]" in lines["rope"]
    # irope - rope = -0.7, half-width hypot(0.04, 0.03) = 0.05
    assert "-0.700 [-0.750, -0.650]" in lines["irope"] and "excludes 0 for these weights; one seed" in lines["irope"]
    assert "not a result" in lines["nope"]  # -0.02 +- 0.058
    assert "| run | [0, 64) | [64, 128) |" in text and "1.500 [1.400, 1.600]" in text
    assert (tmp_path / "plots" / "nll_by_position.png").is_file()


def test_factor_attribution_equals_a_hand_computation(tmp_path: Path) -> None:
    nll = {"dense-rope": (2.0, 0.03), "dense-irope": (1.9, 0.04), "moe-rope": (1.8, 0.03), "moe-irope": (1.5, 0.04)}
    rows = [
        {
            "run": run,
            "seed": 0,
            "run_dir": run,
            "status": "done",
            "train_seq_len": 64,
            "eval": {"nll@64": v},
            "eval_ci95": {"nll@64": [v - h, v + h]},
        }
        for run, (v, h) in nll.items()
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    factors = {
        "ffn": {"dense": ["dense-rope", "dense-irope"], "moe": ["moe-rope", "moe-irope"]},
        "attention": {"rope": ["dense-rope", "moe-rope"], "irope": ["dense-irope", "moe-irope"]},
    }
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "q", "baseline": "dense-rope", "factors": factors}))
    text = report.build_report(tmp_path).read_text()
    section = text[text.index("## Factor attribution") :].split("\n## ")[0]
    lines = {
        ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| ") and "factor |" not in ln
    }
    # ffn: (1.8 + 1.5) / 2 - (2.0 + 1.9) / 2 = -0.3; each level mean has half-width sqrt(.03^2 + .04^2) / 2 = 0.025,
    # so the difference has hypot(0.025, 0.025) = 0.0354
    assert (
        "-0.300 [-0.335, -0.265] (excludes 0 for these weights; one seed, training noise not measured)" in lines["ffn"]
        and "moe − dense" in lines["ffn"]
    )
    assert "-0.200 [-0.235, -0.165]" in lines["attention"]  # (1.9 + 1.5) / 2 - (2.0 + 1.8) / 2
    # interaction: 1.5 - 1.8 - 1.9 + 2.0 = -0.2, half-width sqrt(2 * .03^2 + 2 * .04^2) = 0.0707
    assert "-0.200 [-0.271, -0.129]" in lines["ffn × attention"]


def test_factor_effects_pair_by_window_when_the_runs_share_their_windows(tmp_path: Path) -> None:
    """Windows differ far more from each other than the runs do: pairing by window removes that shared
    spread, so the effect's interval is the bootstrap of the per-window contrast, much narrower than
    the independent one; with a run scored on other windows every effect (each involves all four runs)
    falls back to the independent interval."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(2.0, 0.5, size=64)  # shared by every run
    shift = {"dense-rope": 0.0, "dense-irope": -0.05, "moe-rope": -0.03, "moe-irope": -0.10}
    per_window = {run: difficulty + s + rng.normal(0, 0.01, size=64) for run, s in shift.items()}
    rows = []
    for run, values in per_window.items():
        lo, hi = bootstrap_mean(values)
        rows.append({"run": run, "seed": 0, "run_dir": run, "status": "done", "train_seq_len": 64,
                     "eval": {"nll@64": float(values.mean())}, "eval_ci95": {"nll@64": [lo, hi]}})  # fmt: skip
        (tmp_path / run / "eval").mkdir(parents=True)
        result = {"per_window": {"windows_sha256": "same", "nll@64": values.tolist()}}
        (tmp_path / run / "eval" / "long_context.json").write_text(json.dumps(result))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    factors = {
        "ffn": {"dense": ["dense-rope", "dense-irope"], "moe": ["moe-rope", "moe-irope"]},
        "attention": {"rope": ["dense-rope", "moe-rope"], "irope": ["dense-irope", "moe-irope"]},
    }
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "q", "baseline": "dense-rope", "factors": factors}))

    def ffn_cell() -> tuple[str, str]:
        section = report.build_report(tmp_path).read_text().split("## Factor attribution")[1].split("\n## ")[0]
        return next(ln for ln in section.splitlines() if ln.startswith("| ffn |")), section

    contrast = (
        per_window["moe-rope"] + per_window["moe-irope"] - per_window["dense-rope"] - per_window["dense-irope"]
    ) / 2
    lo, hi = bootstrap_mean(contrast)
    cell, section = ffn_cell()
    assert f"{contrast.mean():.3f} [{lo:.3f}, {hi:.3f}] (excludes 0 for these weights; one seed" in cell
    assert "Every interval is paired by held-out window" in section
    assert "evaluation noise only" in section  # one seed per run: not a claim about the configurations
    assert hi - lo < 0.01  # the windows' spread (0.5 nats) is gone from the interval

    other = json.loads((tmp_path / "moe-irope" / "eval" / "long_context.json").read_text())
    other["per_window"]["windows_sha256"] = "other"
    (tmp_path / "moe-irope" / "eval" / "long_context.json").write_text(json.dumps(other))
    cell, section = ffn_cell()
    low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
    assert high - low > 0.1 and "not a result" in cell  # the independent interval carries the windows' spread
    assert "combine the runs' own intervals as independent estimates" in section


def test_the_headline_difference_of_single_seed_runs_pairs_by_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.5, 0.4, size=48)
    per_window = {"rope": difficulty + 0.30, "irope": difficulty + rng.normal(0, 0.02, size=48)}
    rows = []
    for run, values in per_window.items():
        lo, hi = bootstrap_mean(values)
        rows.append({"run": run, "seed": 0, "run_dir": run, "status": "done", "train_seq_len": 64,
                     "eval": {"delta_tail_nll@512": float(values.mean())},
                     "eval_ci95": {"delta_tail_nll@512": [lo, hi]}})  # fmt: skip
        (tmp_path / run / "eval").mkdir(parents=True)
        result = {"per_window": {"windows_sha256": "w", "delta_tail_nll@512": values.tolist()}}
        (tmp_path / run / "eval" / "long_context.json").write_text(json.dumps(result))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "lc", "baseline": "rope"}))
    text = report.build_report(tmp_path).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| irope |"))
    diff = per_window["irope"] - per_window["rope"]
    lo, hi = bootstrap_mean(diff)
    assert f"{diff.mean():.3f} [{lo:.3f}, {hi:.3f}] | excludes 0 for these weights; one seed" in line


def test_declared_headline_pairs_differences_by_seed(tmp_path: Path) -> None:
    """A sweep's `headline:` keys lead the report; with shared seeds the difference's interval is the
    t-interval of the per-seed differences, here much narrower than the unpaired one."""
    base = {0: 2.0, 1: 2.3, 2: 2.6}  # large seed-to-seed spread ...
    diff = {0: -0.10, 1: -0.12, 2: -0.08}  # ... but a steady per-seed difference
    rows = []
    for seed in base:
        for run, nll in (("dense", base[seed]), ("moe", base[seed] + diff[seed])):
            rows.append(
                {
                    "run": run,
                    "seed": seed,
                    "run_dir": f"{run}-s{seed}",
                    "status": "done",
                    "active_params": 100,
                    "flops_per_token": 600.0,
                    "train_seq_len": 64,
                    "val_loss": nll + 0.5,
                    "eval": {"nll@64": nll},
                    "eval_ci95": {"nll@64": [nll - 0.01, nll + 0.01]},
                }
            )
    rows.append({**rows[-1], "seed": 3, "run_dir": "moe-s3"})  # an unpaired seed is left out of the differences
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.json").write_text(
        json.dumps({"name": "m", "baseline": "dense", "headline": ["nll@64", "val_loss"]})
    )
    text = report.build_report(tmp_path).read_text()
    head = text[text.index("## Headline: `nll@64`, `val_loss`") : text.index("## Results")]
    moe = next(ln for ln in head.splitlines() if ln.startswith("| moe |"))
    # per-seed differences -0.10, -0.12, -0.08: mean -0.1, sd 0.02, t(2) = 4.303 -> half-width 0.0497
    assert moe.count("-0.100 [-0.150, -0.050] (interval excludes 0)") == 2  # nll@64 and val_loss
    assert "| 4 | 1.00x | 1.00x |" in moe


def test_headline_must_be_keys() -> None:
    from llamoe.experiments.sweeps.spec import SweepError, parse_sweep

    data = {"name": "s", "base": {"model": "llama3.1-tiny"}, "runs": {"a": {}}}
    assert parse_sweep({**data, "headline": "nll@64"}).headline == ("nll@64",)
    with pytest.raises(SweepError, match="headline"):
        parse_sweep({**data, "headline": [1]})

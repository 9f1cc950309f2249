"""Sweeps: file validation, expansion (runs x grid x seeds), and running, skipping, resuming, failing."""

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamoe.config_error import ConfigError
from llamoe.experiments.commands import ablate
from llamoe.experiments.overrides import parse_items
from llamoe.experiments.sweeps import scheduler
from llamoe.experiments.sweeps import spec as sweeps
from llamoe.experiments.sweeps.report import load_results
from llamoe.experiments.sweeps.spec import SweepError, expand, parse_sweep


def _sweep(**extra: Any) -> dict[str, Any]:
    return {"name": "toy", "base": {"model": "llama3.1-tiny"}, **extra}


def test_expansion_is_runs_times_grid_times_seeds_with_derived_names() -> None:
    sweep = parse_sweep(
        _sweep(
            overrides={"train": {"max_steps": 3}},
            runs={"dense": {"model": "llama3.1-tiny"}, "moe": {"model": "llama4-tiny", "train.max_steps": 5}},
            grid={"optim.lr": [0.001, 0.003], "train.batch_size": [2, 4]},
            seeds=[0, 7],
        )
    )
    plans = expand(sweep, {"train.log_every": 1})
    assert len(plans) == 2 * 4 * 2
    assert [p.name for p in plans[:4]] == [
        "dense-lr0.001-batch_size2-s0",
        "dense-lr0.001-batch_size2-s7",
        "dense-lr0.001-batch_size4-s0",
        "dense-lr0.001-batch_size4-s7",
    ]
    last = plans[-1]
    assert last.name == "moe-lr0.003-batch_size4-s7" and last.label == "moe-lr0.003-batch_size4" and last.seed == 7
    # order: sweep overrides, grid point, the run's own, the seed, then the command line
    assert list(last.overrides.items()) == [
        ("train.max_steps", 5),
        ("optim.lr", 0.003),
        ("train.batch_size", 4),
        ("model", "llama4-tiny"),
        ("train.seed", 7),
        ("train.log_every", 1),
    ]
    assert plans[0].overrides["train.max_steps"] == 3
    assert [p.name for p in expand(sweep)] == [p.name for p in plans]  # deterministic


def test_without_runs_or_seeds_a_single_base_run_without_suffix() -> None:
    plans = expand(parse_sweep(_sweep()))
    assert [(p.name, p.seed, p.overrides) for p in plans] == [("base", None, {})]


def test_eval_only_run_reuses_the_run_of_the_same_seed() -> None:
    sweep = parse_sweep(
        _sweep(
            runs={
                "irope-temp": {"reuse": "irope", "eval_overrides": {"model.attention.temperature_tuning": True}},
                "irope": {"model.attention.nope_layer_interval": 2},
            },
            seeds=[1, 2],
            eval={"long_context": {"evals": ["ppl", "passkey"], "multiples": [1, 8]}},
        )
    )
    plans = {p.name: p for p in expand(sweep)}
    assert plans["irope-temp-s2"].reuse == "irope-s2"
    assert plans["irope-temp-s2"].eval_overrides == {"model.attention.temperature_tuning": True}
    assert plans["irope-s1"].reuse is None
    assert plans["irope-s1"].eval == {"long_context": {"evals": ["ppl", "passkey"], "multiples": [1, 8]}}


@pytest.mark.parametrize(
    "data, key",
    [
        (_sweep(typo=1), "typo"),
        ({"base": {}}, "name"),
        ({"name": "toy"}, "base"),
        (_sweep(name="has space"), "name"),
        (_sweep(base=3), "base"),
        (_sweep(base="missing.yaml"), "base"),
        (_sweep(runs={"a": {"reuse": "b"}}), "runs.a.reuse"),
        (_sweep(runs={"a": {}, "b": {"reuse": "a", "optim.lr": 1.0}}), "runs.b.optim.lr"),
        (_sweep(runs={"a": {"eval_overrides": {"x": 1}}}), "runs.a.eval_overrides"),
        (_sweep(runs={"a": {}, "b": {"reuse": "a"}, "c": {"reuse": "b"}}), "runs.c.reuse"),
        (_sweep(runs={"a": 3}), "runs.a"),
        (_sweep(grid={"optim.lr": 0.1}), "grid.optim.lr"),
        (_sweep(grid={"optim.lr": [0.1, 0.1]}), "grid.optim.lr"),
        (_sweep(seeds=[1, 1]), "seeds"),
        (_sweep(seeds="0"), "seeds"),
        (_sweep(baseline="nope"), "baseline"),
        (_sweep(parallel=0), "parallel"),
        (_sweep(eval={"long_context": [1, 2]}), "eval.long_context"),
        (_sweep(eval={"lenghts": [1]}), "eval.lenghts"),
        (
            _sweep(runs={"a": {}, "b": {"reuse": "a", "eval_overrides": {"optim.lr": 1}}}),
            "runs.b.eval_overrides.optim.lr",
        ),
    ],
)
def test_invalid_sweep_files_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(SweepError) as info:
        parse_sweep(data, Path("/nonexistent/sweep.yaml"))
    assert info.value.key == key


def test_two_runs_expanding_to_one_directory_are_rejected() -> None:
    sweep = parse_sweep(_sweep(runs={"a": {}}, grid={"data.source": ["x/y", "x_y"]}))
    with pytest.raises(SweepError, match="same directory name 'a-sourcex_y'"):
        expand(sweep)


def test_base_path_is_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump({"model": "llama4-tiny", "train": {"seq_len": 32}}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep(base="cfg/run.yaml")))
    sweep = sweeps.load_sweep(str(path))
    assert sweep.base == {"model": "llama4-tiny", "train": {"seq_len": 32}}


def test_unknown_sweep_name_lists_the_builtin_ones() -> None:
    with pytest.raises(SweepError, match="quickstart"):
        sweeps.resolve_sweep_path("no_such_sweep")


def test_cli_overrides_parse_as_yaml_values() -> None:
    assert parse_items(["train.max_steps=3", "model.moe=null", "optim.lr=1e-3", "model=llama4-tiny"]) == {
        "train.max_steps": 3,
        "model.moe": None,
        "optim.lr": 1e-3,
        "model": "llama4-tiny",
    }
    with pytest.raises(ConfigError, match="train.max_steps: overrides take the form key=value"):
        parse_items(["train.max_steps"])


def test_required_run_names_of_the_long_context_sweep() -> None:
    plans = {p.name: p for p in expand(sweeps.load_sweep("long_context"))}
    assert sorted(plans) == ["irope", "irope-evaltemp", "irope-temp", "nope", "rope"]
    # temperature studied two ways: trained with it on (floor_scale below the training length), and eval-only
    assert plans["irope-temp"].reuse is None
    assert plans["irope-temp"].overrides["model.attention.temperature_tuning"] is True
    assert plans["irope-temp"].overrides["model.attention.floor_scale"] < plans["irope-temp"].overrides["train.seq_len"]
    assert plans["irope-evaltemp"].reuse == "irope"
    assert plans["irope-evaltemp"].eval_overrides == {"eval.long_context.temperature": "calibrate"}
    assert plans["rope"].eval["long_context"]["multiples"] == [1, 2, 4, 8, 16]
    assert "mqar" in plans["rope"].eval["long_context"]["evals"]


# ---------------------------------------------------------------------------- running sweeps (tiny real runs)
def _corpus(tmp_path: Path) -> Path:
    """A directory of 40 small, distinct text files (near-copies would be one held-out group): enough held-out
    documents for tiny evaluation windows."""
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    words = "the quick brown fox jumps over a lazy dog and cat".split()
    rng = random.Random(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + " ".join(rng.choices(words, k=36)) + ".")
    return root


def tiny_sweep_data(tmp_path: Path, runs: dict[str, Any]) -> dict[str, Any]:
    """A sweep file's mapping: a 2-step, 2-layer, dim-32 model on a small corpus, evaluated at 1x and 2x."""
    base = {
        "model": {
            "preset": "llama3.1-tiny",
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "n_kv_heads": 1,
            "multiple_of": 16,
        },
        "data": {"source": str(_corpus(tmp_path)), "val_fraction": 0.5, "cache_dir": str(tmp_path / "cache")},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "log_every": 1, "val_every": 0, "val_batches": 1},
    }
    eval_ = {
        "long_context": {
            "evals": ["ppl"],
            "multiples": [1, 2],
            "sequences": 1,
            "calibration_sequences": 1,
            "plots": False,
        }
    }
    return {"name": "tiny", "base": base, "runs": runs, "eval": eval_}


def _tiny_sweep(tmp_path: Path, runs: dict[str, Any]) -> sweeps.Sweep:
    return parse_sweep(tiny_sweep_data(tmp_path, runs))


def _rows(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["run_dir"]: r for r in load_results(sweep_dir)}


RESULT_KEYS = {
    "run",
    "seed",
    "run_dir",
    "status",
    "params",
    "active_params",
    "flops_per_token",
    "train_seq_len",
    "tokens",
    "tokens_per_s",
    "final_loss",
    "val_loss",
    "eval",
}


_RUNS = {
    "ok": {},
    "broken": {"data.source": "/nonexistent/missing.txt"},
    "ok-temp": {"reuse": "ok", "eval_overrides": {"model.attention.temperature_tuning": True}},
    "broken-temp": {"reuse": "broken"},
}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One real sweep run (two tiny trainings, one failing, and two eval-only runs), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    rows = scheduler.run_sweep(_tiny_sweep(tmp, _RUNS), out, ablate.WORKER)
    return out, rows


@pytest.mark.slow
def test_results_rows_follow_the_schema(finished_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = finished_sweep
    saved = _rows(out)
    assert list(saved) == ["ok", "broken", "ok-temp", "broken-temp"] == [r["run_dir"] for r in rows]
    ok = saved["ok"]
    assert RESULT_KEYS <= set(ok) and ok["status"] == "done"
    assert ok["seed"] is None and ok["train_seq_len"] == 16 and ok["tokens"] == 2 * 2 * 16
    assert ok["params"] == ok["active_params"] > 0 and ok["flops_per_token"] > 0
    assert ok["final_loss"] > 0 and ok["val_loss"] > 0 and ok["tokens_per_s"] > 0
    assert set(ok["eval"]) >= {"ppl@16", "ppl@32"}
    assert (out / "ok" / "config.yaml").is_file() and (out / "ok" / "eval" / "long_context.json").is_file()


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_others_continue(finished_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = finished_sweep
    assert [r["status"] for r in rows] == ["done", "failed", "done", "failed"]
    saved = _rows(out)
    assert saved["broken"]["status"] == "failed" and "missing.txt" in saved["broken"]["error"]
    assert "Traceback" in (out / "broken" / "error.txt").read_text()
    assert not (out / "broken" / scheduler.DONE_FILE).exists()
    assert saved["broken-temp"]["error"] == "the run it depends on, broken, failed"


@pytest.mark.slow
def test_eval_only_run_evaluates_the_reused_checkpoint(finished_sweep: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = finished_sweep
    ok, temp = _rows(out)["ok"], _rows(out)["ok-temp"]
    assert temp["source_run_dir"] == "ok" and temp["final_loss"] == ok["final_loss"]
    assert not (out / "ok-temp" / "checkpoints").exists()  # nothing trained
    result = json.loads((out / "ok-temp" / "eval" / "long_context.json").read_text())
    assert result["temperature"]["temperature_tuning"] is True
    assert (
        json.loads((out / "ok" / "eval" / "long_context.json").read_text())["temperature"]["temperature_tuning"]
        is False
    )


@pytest.mark.slow
def test_completed_runs_are_skipped(
    finished_sweep: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = finished_sweep
    marker = out / "ok" / scheduler.DONE_FILE
    before = marker.stat().st_mtime_ns
    same = _tiny_sweep(out.parent, {k: _RUNS[k] for k in ("ok", "ok-temp")})
    capsys.readouterr()
    rows = scheduler.run_sweep(same, out, ablate.WORKER)
    log = capsys.readouterr().out
    assert "ok: already complete, skipped" in log and "ok-temp: already complete, skipped" in log
    assert "started" not in log
    assert marker.stat().st_mtime_ns == before
    assert [r["status"] for r in rows] == ["done", "done"]
    # a changed setting makes the run due again (here: eval-only, so no training is repeated)
    changed = _tiny_sweep(out.parent, {"ok": {}, "ok-temp": {"reuse": "ok"}})
    assert scheduler.completed_row(out / "ok-temp", expand(changed)[1]) is None
    assert scheduler.completed_row(out / "ok", expand(changed)[0]) is not None


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamoe.experiments.config import load_run_config
    from llamoe.experiments.train.loop import train

    sweep = _tiny_sweep(tmp_path, {"a": {}})
    out = tmp_path / "sweep"
    plan = expand(sweep, {"train.max_steps": 3})[0]
    # an interrupted run: trained to step 2 and checkpointed, but never finished (no done marker)
    train(load_run_config(plan.base, ["train.max_steps=2", f"run_dir={out / 'a'}"]))
    scheduler.run_sweep(sweep, out, ablate.WORKER, cli_overrides={"train.max_steps": 3})
    log = capsys.readouterr().out
    assert "resuming from" in log and "step_2" in log
    steps = [r["step"] for r in (json.loads(x) for x in (out / "a" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3]
    assert _rows(out)["a"]["status"] == "done" and _rows(out)["a"]["tokens"] == 3 * 2 * 16


@pytest.mark.parametrize("name", sweeps.builtin_sweeps())
def test_every_builtin_sweep_validates(name: str) -> None:
    plans = expand(sweeps.load_sweep(name))
    assert plans and all(p.eval for p in plans)
    sweeps.validate_plans(plans)  # every run's config and evaluation options resolve


def test_validation_names_the_run_and_the_bad_key() -> None:
    plans = expand(parse_sweep(_sweep(runs={"good": {}, "bad": {"train.max_stepz": 3}})))
    with pytest.raises(SweepError, match="train.max_stepz") as info:
        sweeps.validate_plans(plans)
    assert info.value.key == "runs.bad"


def test_eval_time_overrides_are_validated_against_the_reused_run() -> None:
    runs = {"a": {"model": "llama4-tiny"}, "b": {"reuse": "a", "eval_overrides": {"model.moe.top_k": 9}}}
    with pytest.raises(SweepError, match="moe.top_k") as info:
        sweeps.validate_plans(expand(parse_sweep(_sweep(runs=runs))))
    assert info.value.key == "runs.b"
    runs = {"a": {}, "b": {"reuse": "a", "eval_overrides": {"eval.other_suite.x": 1}}}
    with pytest.raises(SweepError) as info:
        sweeps.validate_plans(expand(parse_sweep(_sweep(runs=runs))))
    assert info.value.key == "runs.b.eval_overrides.eval.other_suite.x"


def test_factors_must_name_two_disjoint_levels_of_runs() -> None:
    base = {"name": "f", "base": {"model": "llama3.1-tiny"}, "runs": {"a": {}, "b": {}, "c": {}}}
    ok = sweeps.parse_sweep({**base, "factors": {"x": {"lo": ["a"], "hi": ["b", "c"]}}})
    assert ok.factors == {"x": {"lo": ["a"], "hi": ["b", "c"]}}
    for factors, key in (
        ({"x": {"lo": ["a"]}}, "factors.x"),
        ({"x": {"lo": ["a"], "hi": ["zz"]}}, "factors.x.hi"),
        ({"x": {"lo": ["a"], "hi": ["a", "b"]}}, "factors.x"),
        ({"x": {"lo": [], "hi": ["b"]}}, "factors.x.lo"),
    ):
        with pytest.raises(SweepError) as err:
            sweeps.parse_sweep({**base, "factors": factors})
        assert err.value.key == key


def test_the_quickstart_crosses_dense_and_moe_with_one_attention_component_per_factor() -> None:
    from llamoe.experiments.config import load_run_config

    sweep = sweeps.load_sweep("quickstart")
    plans = {p.name: p for p in expand(sweep)}
    ladder = ["rope", "nope", "nope-qk", "irope"]
    assert sorted(plans) == sorted(f"{ffn}-{a}" for ffn in ("dense", "moe") for a in ladder)
    models = {n: load_run_config(p.base, p.overrides).model for n, p in plans.items()}
    active = {n: m.num_active_params() for n, m in models.items()}
    for a in ladder:  # matched active parameters; the attention is the same on both sides
        assert active[f"dense-{a}"] == active["dense-rope"] and active[f"moe-{a}"] == active["moe-rope"]
        assert models[f"dense-{a}"].attention == models[f"moe-{a}"].attention
    assert abs(active["moe-rope"] / active["dense-rope"] - 1) < 0.01  # the router is the only difference
    fields = ("nope_layer_interval", "chunk_size", "qk_norm", "temperature_tuning")
    changed = []  # each step of the ladder changes one component (the schedule: NoPE layers and chunking)
    for low, high in zip(ladder, ladder[1:]):
        a, b = models[f"dense-{low}"].attention, models[f"dense-{high}"].attention
        changed.append({f for f in fields if getattr(a, f) != getattr(b, f)})
    assert changed == [{"nope_layer_interval", "chunk_size"}, {"qk_norm"}, {"temperature_tuning"}]
    assert models["moe-irope"].attention == load_run_config(None, ["model=llama4-tiny"]).model.attention
    for factor, step in zip(("schedule", "qk_norm", "temperature"), zip(ladder, ladder[1:])):
        low, high = sweep.factors[factor].values()
        assert (sorted(low), sorted(high)) == tuple(sorted(f"{ffn}-{s}" for ffn in ("dense", "moe")) for s in step)
    assert set(sweep.factors) == {"ffn", "attention", "schedule", "qk_norm", "temperature"}


def test_init_from_a_run_of_the_sweep_is_a_dependency_of_the_same_seed() -> None:
    runs = {"dense": {"model": "llama3.1-tiny"}, "moe": {"model": "llama4-tiny", "init_from": "dense"},
            "path": {"init_from": "/some/dir"}}  # fmt: skip
    plans = {p.name: p for p in expand(parse_sweep({**_sweep(runs=runs), "seeds": [0, 1]}))}
    assert plans["moe-s1"].init_from == "dense-s1" and plans["moe-s1"].depends_on == "dense-s1"
    assert "init_from" not in plans["moe-s1"].overrides  # resolved to the run's directory when it starts
    assert plans["path-s0"].init_from is None and plans["path-s0"].overrides["init_from"] == "/some/dir"
    # a plan without init_from keeps the fingerprint it had before the key existed (finished sweeps stay done)
    data = {"name": "s", "base": {"model": "llama3.1-tiny"}, "runs": {"a": {"train.max_steps": 3}}, "seeds": [1]}
    assert expand(parse_sweep(data))[0].fingerprint() == "2ab17d5847cd7e1c"
    for bad, key in (({"a": {"init_from": "a"}}, "runs.a.init_from"),
                     ({"a": {}, "b": {"reuse": "a"}, "c": {"init_from": "b"}}, "runs.c.init_from"),
                     ({"a": {"init_from": "c"}, "b": {"init_from": "a"}, "c": {"init_from": "b"}}, "runs.a.init_from")):  # fmt: skip
        with pytest.raises(SweepError) as info:
            parse_sweep(_sweep(runs=bad))
        assert info.value.key == key

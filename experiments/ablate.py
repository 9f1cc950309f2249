"""`llamoe ablate SWEEP`: one YAML, one command, one results folder.

The sweep file's format and its expansion into run directories are experiments/sweep.py's;
running them N at a time, resumably, is experiments/scheduler.py's; the report is
experiments/report.py's. This module is the command and the worker's job: train one planned
run (experiments/train.py), evaluate it through `llamoe eval`'s own path
(experiments/evals/long_context.evaluate_run), and return its results row.

    llamoe ablate quickstart                  # a built-in sweep (experiments/configs/ablations/)
    llamoe ablate my_sweep.yaml train.max_steps=50 --parallel 2 --out runs/try
    llamoe ablate quickstart --dry-run        # validate and list the runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from experiments import runctl
from experiments.errors import USAGE, exit_status, report, write_failed
from experiments.overrides import format_items, parse_items
from experiments.routing_health import KEYS as ROUTING_KEYS
from experiments.scheduler import DONE_FILE, ERROR_FILE, RESULTS_FILE, run_sweep, write_json_atomic
from experiments.sweep import (
    PlannedRun,
    Sweep,
    SweepError,
    builtin_sweeps,
    expand,
    load_sweep,
    model_overrides,
    suite_overrides,
    validate_plans,
)

WORKER = [sys.executable, "-m", "experiments.ablate", "--worker"]  # + PLAN_FILE --threads N (scheduler.py)


_TRAINING_FIELDS = ("tokens", "tokens_per_s", "final_loss", "val_loss")


def _training_fields(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """tokens, tokens_per_s, final_loss, val_loss from the training summary, else the run's metrics.jsonl;
    plus, for MoE runs, the routing-health keys computed from metrics.jsonl."""
    from experiments.metrics_log import read_metrics
    from experiments.routing_health import summarize

    metrics = read_metrics(run_dir)
    last = {"final_loss": "loss"}
    out = {}
    for key in _TRAINING_FIELDS:
        value = summary.get(key)
        if value is None:
            name = last.get(key, key)
            value = next((m[name] for m in reversed(metrics) if isinstance(m.get(name), (int, float))), None)
        out[key] = value
    out.update(summarize(metrics))  # routing health of MoE runs (experiments/routing_health.py)
    return out


def _spent_before(plan: PlannedRun, run_dir: Path) -> dict[str, Any]:
    """For a run started from another run's weights: that run (`init_from_run_dir`) and the training tokens
    and FLOPs spent to produce its weights (`init_tokens`, `init_flops`, chained), so curves compare at equal
    total cost."""
    if plan.init_from is None:
        return {}
    source = json.loads((run_dir.parent / plan.init_from / DONE_FILE).read_text())["row"]
    return {
        "init_from_run_dir": plan.init_from,
        "init_tokens": (source.get("tokens") or 0) + source.get("init_tokens", 0),
        "init_flops": (source.get("tokens") or 0) * (source.get("flops_per_token") or 0) + source.get("init_flops", 0),
    }


def run_one(plan: PlannedRun, run_dir: Path) -> dict[str, Any]:
    """Train (unless eval-only), evaluate, and return the run's results row."""
    if plan.reuse is None:
        from experiments.config import load_run_config
        from experiments.train import train

        start = {"init_from": str(run_dir.parent / plan.init_from)} if plan.init_from else {}
        cfg = load_run_config(plan.base, {**plan.overrides, **start, "run_dir": str(run_dir)})
        training = {**_training_fields(train(cfg), run_dir), **_spent_before(plan, run_dir)}
        source_dir = run_dir
    else:
        source_dir = run_dir.parent / plan.reuse
        source_row = json.loads((source_dir / DONE_FILE).read_text())["row"]
        training = {k: source_row[k] for k in (*_TRAINING_FIELDS, *ROUTING_KEYS) if k in source_row}
    cfg, evals, eval_ci = _evaluate(plan, source_dir, run_dir)
    model = cfg.model
    row: dict[str, Any] = {
        "run": plan.label,
        "seed": plan.seed,
        "run_dir": plan.name,
        "status": "done",
        "params": model.num_params(),
        "active_params": model.num_active_params(),
        "flops_per_token": model.flops_per_token(cfg.train.seq_len),
        "train_seq_len": cfg.train.seq_len,
        **training,
        "eval": evals,
        "eval_ci95": eval_ci,  # 95% bootstrap interval of each eval key (experiments/evals/stats.py)
    }
    if plan.reuse is not None:
        row["source_run_dir"] = plan.reuse
        row["eval_overrides"] = plan.eval_overrides
    return row


def _evaluate(plan: PlannedRun, source_dir: Path, run_dir: Path) -> tuple[Any, dict[str, float], dict[str, list]]:
    """The sweep's evaluation suites on the source run's checkpoint, through the one path `llamoe eval`
    takes (experiments/evals/long_context.evaluate_run); results go to run_dir/eval/<suite>.json.

    Options layer as: the run config's `eval.<suite>` section, the sweep's `eval.<suite>`, then the
    run's `eval_overrides`. Returns (run config, flat eval keys, their 95% intervals)."""
    from experiments.checkpoint import checkpoint_path, load_config
    from experiments.evals.long_context import evaluate_run

    overrides = model_overrides(plan.eval_overrides)
    if not plan.eval:
        return load_config(checkpoint_path(source_dir), overrides), {}, {}
    flat: dict[str, float] = {}
    intervals: dict[str, list] = {}
    for suite, options in plan.eval.items():
        result, cfg = evaluate_run(
            source_dir,
            [options, suite_overrides(plan.eval_overrides, suite)],
            model_overrides=overrides,
            out_dir=run_dir / "eval",
            suite=suite,
        )
        flat.update({k: v for k, v in result.items() if "@" in k and isinstance(v, (int, float))})
        intervals.update(result.get("ci95", {}))
    return cfg, flat, intervals


# ---------------------------------------------------------------------------- command line
def _print_plan(plans: list[PlannedRun], out: TextIO) -> None:
    for p in plans:
        what = (
            f"eval-only, reuses {p.reuse}: {format_items(p.eval_overrides)}"
            if p.reuse
            else format_items(p.overrides) + (f" (starts from {p.init_from}'s weights)" if p.init_from else "")
        )
        out.write(f"  {p.name:<28} {what}\n")


def cli_main(argv: list[str]) -> int:
    """`llamoe ablate SWEEP [--parallel N] [--out DIR] [--dry-run] [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="llamoe ablate",
        description="Train and evaluate every run of a sweep, then write results.jsonl, report.md and plots/.",
        epilog=f"built-in sweeps: {', '.join(builtin_sweeps())}",
    )
    parser.add_argument("sweep", nargs="?", help="a sweep YAML file or the name of a built-in sweep")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides applied to every run")
    parser.add_argument(
        "--parallel", type=int, metavar="N", help="runs trained at once (default: the sweep's `parallel`, else 1)"
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="sweep directory (default runs/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs without training")
    parser.add_argument("--list", action="store_true", help="list the built-in sweeps and exit")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        return _worker_main(args.worker, args.threads)
    if args.list:
        for name in builtin_sweeps():
            sweep = load_sweep(name)
            print(f"{name:<20} {len(expand(sweep)):>3} runs  {sweep.description.strip().splitlines()[0][:80]}")
        return 0
    if args.sweep is None:
        parser.error("the SWEEP argument is required")
    try:
        sweep = load_sweep(args.sweep)
        plans = expand(sweep, parse_items(args.overrides))
        validate_plans(plans)
    except (SweepError, ValueError) as e:
        return report("llamoe ablate", e, USAGE, f"invalid sweep {args.sweep!r}: ")
    sweep_dir = args.out if args.out is not None else Path("runs") / sweep.name
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(plans)} runs -> {sweep_dir}")
        _print_plan(plans, sys.stdout)
        return 0

    prog = "llamoe ablate"
    try:
        with runctl.DirLock(sweep_dir, "sweep directory"):
            return _run_and_report(sweep, plans, sweep_dir, args)
    except BaseException as e:  # re-raised unless it is a user error or a requested stop
        status = exit_status(e)
        if status is None:
            raise
        return report(prog, e, status)


def _run_and_report(sweep: Sweep, plans: list[PlannedRun], sweep_dir: Path, args: argparse.Namespace) -> int:
    """Run the sweep, then write its report and print the summary; the exit status."""
    from experiments import report

    write_json_atomic(
        sweep_dir / "sweep.json",
        {
            "name": sweep.name,
            "description": sweep.description,
            "baseline": sweep.baseline,
            "factors": sweep.factors,
            "headline": list(sweep.headline),
            "runs": [p.name for p in plans],
        },
    )
    t0 = time.time()
    parallel = args.parallel if args.parallel is not None else sweep.parallel
    rows = run_sweep(sweep, sweep_dir, WORKER, parallel=parallel, cli_overrides=parse_items(args.overrides))
    try:
        report_path = report.build_report(sweep_dir)
    except OSError as e:
        raise write_failed("the sweep report in", sweep_dir, e) from e
    failed = [r for r in rows if r["status"] != "done"]
    print(f"\nsweep {sweep.name}: {len(rows) - len(failed)}/{len(rows)} runs done in {time.time() - t0:.0f}s\n")
    print(report.terminal_table(rows, sweep.baseline))
    print(f"\nresults: {sweep_dir / RESULTS_FILE}\nreport:  {report_path}\nplots:   {sweep_dir / 'plots'}")
    for r in failed:
        print(f"FAILED {r['run_dir']}: {r.get('error')} (traceback: {sweep_dir / r['run_dir'] / ERROR_FILE})")
    return 1 if failed else 0


def _worker_main(plan_path: Path, threads: int) -> int:
    """Run one planned run inside a worker process; on failure save the traceback in the run directory."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    run_dir = plan_path.parent
    plan = PlannedRun.from_dict(json.loads(plan_path.read_text()))
    try:
        row = run_one(plan, run_dir)
        write_json_atomic(run_dir / DONE_FILE, {"fingerprint": plan.fingerprint(), "row": row})
    except (runctl.Stopped, runctl.Aborted, KeyboardInterrupt) as e:  # stopped on request: resumes on a rerun
        status = exit_status(e) or 130
        return report("worker", e, status)
    except BaseException:  # noqa: BLE001  (any failure is this run's to report)
        text = traceback.format_exc()
        (run_dir / ERROR_FILE).write_text(text)
        sys.stderr.write(text)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))

"""`llamoe ablate SWEEP`: one YAML, one command, one results folder.

The sweep file's format and its expansion into run directories are experiments/sweeps/spec.py's;
running them N at a time, resumably, is experiments/sweeps/scheduler.py's (`--executor local`), or one
submitit job per run experiments/sweeps/slurm.py's (`--executor slurm|debug`); the report is
experiments/sweeps/report.py's. This module is the command and the worker's job: train one planned
run (experiments/train/loop.py), evaluate it through `llamoe eval`'s own path
(experiments/commands/eval.py: evaluate_run), and return its results row.

    llamoe ablate quickstart                  # a built-in sweep (experiments/configs/ablations/)
    llamoe ablate my_sweep.yaml train.max_steps=50 --parallel 2 --out runs/try
    llamoe ablate quickstart --dry-run        # validate and list the runs
    llamoe ablate quickstart --executor slurm --partition gpu --time 4:00:00 --gpus-per-run 8
    llamoe ablate quickstart --status         # each run's state (and job)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, TextIO

from llamoe.experiments.errors import USAGE, UsageError, exit_status, report, write_failed
from llamoe.experiments.overrides import format_items, parse_items
from llamoe.experiments.sweeps.scheduler import DONE_FILE, ERROR_FILE, RESULTS_FILE, run_sweep, write_json_atomic
from llamoe.experiments.sweeps.slurm import (
    EXECUTORS,
    ClusterOptions,
    check_slurm,
    planned_runs,
    refresh,
    submit_sweep,
    sweep_status,
)
from llamoe.experiments.sweeps.spec import (
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
from llamoe.experiments.train import runctl
from llamoe.experiments.train.routing_health import KEYS as ROUTING_KEYS

WORKER = [
    sys.executable,
    "-m",
    "llamoe.experiments.commands.ablate",
    "--worker",
]  # + PLAN_FILE --threads N (scheduler.py)


_TRAINING_FIELDS = ("tokens", "tokens_per_s", "final_loss", "val_loss")


def _training_fields(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """tokens, tokens_per_s, final_loss, val_loss from the training summary, else the run's metrics.jsonl;
    plus, for MoE runs, the routing-health keys computed from metrics.jsonl."""
    from llamoe.experiments.train.metrics_log import read_metrics
    from llamoe.experiments.train.routing_health import summarize

    metrics = read_metrics(run_dir)
    last = {"final_loss": "loss"}
    out = {}
    for key in _TRAINING_FIELDS:
        value = summary.get(key)
        if value is None:
            name = last.get(key, key)
            value = next((m[name] for m in reversed(metrics) if isinstance(m.get(name), (int, float))), None)
        out[key] = value
    out.update(summarize(metrics))  # routing health of MoE runs (experiments/train/routing_health.py)
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


def run_config(plan: PlannedRun, run_dir: Path, extra: Optional[dict[str, Any]] = None, world_size: int = 1) -> Any:
    """The RunConfig a planned run trains with in `run_dir`; `extra` overrides apply last (settings of where it
    runs, such as train.time_limit_s, that are not part of its fingerprint)."""
    from llamoe.experiments.config import load_run_config

    start = {"init_from": str(run_dir.parent / plan.init_from)} if plan.init_from else {}
    overrides = {**plan.overrides, **start, "run_dir": str(run_dir), **(extra or {})}
    return load_run_config(plan.base, overrides, world_size=world_size)


def run_one(
    plan: PlannedRun, run_dir: Path, extra: Optional[dict[str, Any]] = None, world_size: int = 1
) -> dict[str, Any]:
    """Train (unless eval-only), evaluate, and return the run's results row."""
    if plan.reuse is None:
        from llamoe.experiments.train.loop import train

        cfg = run_config(plan, run_dir, extra, world_size)
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
    takes (experiments/commands/eval.py: evaluate_run); results go to run_dir/eval/<suite>.json.

    Options layer as: the run config's `eval.<suite>` section, the sweep's `eval.<suite>`, then the
    run's `eval_overrides`. Returns (run config, flat eval keys, their 95% intervals)."""
    from llamoe.experiments.commands.eval import evaluate_run
    from llamoe.experiments.train.checkpoint import checkpoint_path, load_config

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
    """`llamoe ablate SWEEP [--parallel N] [--out DIR] [--dry-run] [--executor local|slurm|debug] [--status]
    [--report] [Slurm options] [key=value ...]`."""
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
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and list the runs (with slurm: print the sbatch scripts)"
    )
    parser.add_argument("--list", action="store_true", help="list the built-in sweeps and exit")
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: worker processes here (default); slurm: one job per run through submitit; "
        "debug: submitit's in-process executor, one run after another",
    )
    parser.add_argument("--status", action="store_true", help="show each run's state and job, then exit")
    parser.add_argument("--report", action="store_true", help="rebuild results.jsonl and the report now, then exit")
    cluster = parser.add_argument_group("Slurm (with --executor slurm)")
    cluster.add_argument("--partition", help="sbatch --partition")
    cluster.add_argument("--account", help="sbatch --account")
    cluster.add_argument("--gpus-per-run", type=int, metavar="G", help="GPUs of each run, one srun task (rank) each")
    cluster.add_argument("--nodes-per-run", type=int, metavar="N", help="nodes of each run (default 1)")
    cluster.add_argument("--time", help="time limit of each job: minutes or [D-]HH:MM[:SS] (required)")
    cluster.add_argument(
        "--slurm", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option (repeatable)"
    )
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
    prog = "llamoe ablate"
    try:
        opts = ClusterOptions.parse(
            args.executor,
            partition=args.partition,
            account=args.account,
            gpus_per_run=args.gpus_per_run,
            nodes_per_run=args.nodes_per_run,
            time=args.time,
            slurm=tuple(args.slurm),
        )
        if args.parallel is not None and args.parallel < 1:
            raise SweepError("--parallel", f"must be >= 1, got {args.parallel}")
    except SweepError as e:
        return report(prog, e, USAGE)
    try:
        sweep = load_sweep(args.sweep)
        plans = expand(sweep, parse_items(args.overrides))
        if not (args.status or args.report):
            validate_plans(plans, world_size=opts.world_size)
    except (SweepError, ValueError) as e:
        return report(prog, e, USAGE, f"invalid sweep {args.sweep!r}: ")
    sweep_dir = args.out if args.out is not None else Path("runs") / sweep.name
    try:
        if args.status:
            return sweep_status(sweep_dir, sys.stdout)
        if args.report:
            return _report_now(sweep, sweep_dir)
        if args.dry_run:
            print(f"sweep {sweep.name}: {len(plans)} runs -> {sweep_dir}")
            _print_plan(plans, sys.stdout)
            if opts.executor == "slurm":
                extra = _extra(plans, opts)
                submit_sweep(execute, plans, sweep_dir, opts, parallel=args.parallel, extra=extra, dry_run=True)
            return 0
        if opts.executor == "slurm":
            check_slurm()
        with runctl.DirLock(sweep_dir, "sweep directory"):
            if opts.executor == "local":
                return _run_and_report(sweep, plans, sweep_dir, args)
            return _submit_and_report(sweep, plans, sweep_dir, opts, args)
    except BaseException as e:  # re-raised unless it is a user error or a requested stop
        status = exit_status(e)
        if status is None:
            raise
        return report(prog, e, status)


def _extra(plans: list[PlannedRun], opts: ClusterOptions) -> dict[str, dict[str, Any]]:
    """run -> train.time_limit_s derived from --time, for the runs that train and do not set one."""
    from llamoe.experiments.config import load_run_config

    limit = opts.time_limit_s()
    if limit is None:
        return {}
    return {
        p.name: {"train.time_limit_s": limit}
        for p in plans
        if p.reuse is None and load_run_config(p.base, p.overrides, world_size=None).train.time_limit_s is None
    }


def _write_sweep_file(sweep: Sweep, plans: list[PlannedRun], sweep_dir: Path) -> None:
    write_json_atomic(
        sweep_dir / "sweep.json",
        {
            "name": sweep.name,
            "description": sweep.description,
            "baseline": sweep.baseline,
            "factors": sweep.factors,
            "headline": list(sweep.headline),
            "runs": [p.name for p in plans],
            "plans": [asdict(p) for p in plans],  # what --status and the jobs of experiments/sweeps/slurm.py read
        },
    )


def _summary(sweep: Sweep, rows: list[dict[str, Any]], sweep_dir: Path, report_path: Path, seconds: float) -> int:
    """Print the summary table and where the results are; the exit status (1 if a run failed)."""
    from llamoe.experiments.sweeps import report

    failed = [r for r in rows if r["status"] != "done"]
    print(f"\nsweep {sweep.name}: {len(rows) - len(failed)}/{len(rows)} runs done in {seconds:.0f}s\n")
    print(report.terminal_table(rows, sweep.baseline))
    print(f"\nresults: {sweep_dir / RESULTS_FILE}\nreport:  {report_path}\nplots:   {sweep_dir / 'plots'}")
    for r in failed:
        print(f"FAILED {r['run_dir']}: {r.get('error')} (traceback: {sweep_dir / r['run_dir'] / ERROR_FILE})")
    return 1 if failed else 0


def _run_and_report(sweep: Sweep, plans: list[PlannedRun], sweep_dir: Path, args: argparse.Namespace) -> int:
    """Run the sweep with the local scheduler, then write its report and print the summary; the exit status."""
    from llamoe.experiments.sweeps import report

    _write_sweep_file(sweep, plans, sweep_dir)
    t0 = time.time()
    parallel = args.parallel if args.parallel is not None else sweep.parallel
    rows = run_sweep(sweep, sweep_dir, WORKER, parallel=parallel, cli_overrides=parse_items(args.overrides))
    try:
        report_path = report.build_report(sweep_dir)
    except OSError as e:
        raise write_failed("the sweep report in", sweep_dir, e) from e
    return _summary(sweep, rows, sweep_dir, report_path, time.time() - t0)


def _submit_and_report(
    sweep: Sweep, plans: list[PlannedRun], sweep_dir: Path, opts: ClusterOptions, args: argparse.Namespace
) -> int:
    """Submit the runs that are not done (experiments/sweeps/slurm.py). Slurm: say what was submitted and return;
    debug: the runs ran here, so print the summary as the local scheduler does."""
    _write_sweep_file(sweep, plans, sweep_dir)
    t0 = time.time()
    parallel = args.parallel if args.parallel is not None or opts.executor == "slurm" else sweep.parallel
    rows = submit_sweep(execute, plans, sweep_dir, opts, parallel=parallel, extra=_extra(plans, opts))
    if opts.executor == "debug":
        return _summary(sweep, rows, sweep_dir, sweep_dir / "report.md", time.time() - t0)
    again = f"llamoe ablate {args.sweep} --out {sweep_dir}"
    print(f"\nsweep {sweep.name}: {len(rows)}/{len(plans)} runs ended so far; results.jsonl and report.md are "
          f"written as runs end.\n  {again} --status   # each run's state\n  {again} --report   # the report now")  # fmt: skip
    return 0


def _report_now(sweep: Sweep, sweep_dir: Path) -> int:
    """`--report`: results.jsonl from the run directories, then report.md and plots/ whether or not all ended."""
    from llamoe.experiments.sweeps import report

    if not planned_runs(sweep_dir):
        raise UsageError(f"no sweep in {sweep_dir} (no sweep.json with its plans): run or submit the sweep first")
    rows, _ = refresh(sweep_dir)
    try:
        report_path = report.build_report(sweep_dir)
    except OSError as e:
        raise write_failed("the sweep report in", sweep_dir, e) from e
    print(report.terminal_table(rows, sweep.baseline))
    print(f"\nresults: {sweep_dir / RESULTS_FILE}\nreport:  {report_path}")
    return 0


def execute(
    plan: PlannedRun, run_dir: Path, extra: Optional[dict[str, Any]] = None, world_size: int = 1, rank: int = 0
) -> int:
    """Run one planned run in this process and leave its outcome in run_dir (rank 0: DONE_FILE with the row, or
    ERROR_FILE with the traceback; the other ranks of a multi-process run only train). Returns the exit status:
    0 done, 1 failed, 124 / 128+N stopped on request after saving (rerunning resumes it)."""
    try:
        if rank == 0:
            row = run_one(plan, run_dir, extra, world_size)
            write_json_atomic(run_dir / DONE_FILE, {"fingerprint": plan.fingerprint(), "row": row})
        elif plan.reuse is None:
            from llamoe.experiments.train.loop import train

            train(run_config(plan, run_dir, extra, world_size))
    except (runctl.Stopped, runctl.Aborted, KeyboardInterrupt) as e:  # stopped on request: resumes on a rerun
        status = exit_status(e) or 130
        return report("worker", e, status, quiet=rank != 0)
    except BaseException:  # noqa: BLE001  (any failure is this run's to report)
        text = traceback.format_exc()
        if rank == 0:
            (run_dir / ERROR_FILE).write_text(text)
        sys.stderr.write(text)
        return 1
    return 0


def _worker_main(plan_path: Path, threads: int) -> int:
    """Run one planned run inside a worker process of the local scheduler."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return execute(PlannedRun.from_dict(json.loads(plan_path.read_text())), plan_path.parent)


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))

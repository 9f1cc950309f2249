"""Sweeps: one YAML, one command, one results folder.

A sweep file names a base run config, the runs that differ from it (each a set
of `key: value` overrides of the run config), an optional grid (a cartesian
product of overrides), seeds, and the evaluations to run after training:

    name: quickstart                  # the sweep directory is runs/<name>/
    description: dense vs MoE         # optional, shown in report.md
    base: ../quickstart.yaml          # a run-config YAML (relative to this file) or an inline mapping
    overrides: {train.max_steps: 200} # optional, applied to every run
    runs:                             # optional; run name -> overrides (or null for the base as is)
      dense: {model: llama3.1-tiny}
      moe: {model: llama4-tiny}
      moe-temp:                       # eval-only: evaluate another run's checkpoint
        reuse: moe
        eval_overrides: {model.attention.temperature_tuning: true}
    grid: {optim.lr: [1.0e-3, 3.0e-3]}  # optional; every run x every combination
    seeds: [0, 1]                     # optional; sets train.seed, adds -s<seed> to run names
    baseline: dense                   # optional; ratio columns are against it (default: the first run)
    factors:                          # optional: a two-level factorial design over the runs; the report
      ffn: {dense: [dense], moe: [moe, moe-temp]}   # attributes differences to each factor, with intervals
    headline: [nll@256, val_loss]     # optional: the report's lead keys (eval keys or row fields), each
                                      # with its difference from the baseline, paired over seeds
    parallel: 2                       # optional; runs trained at once unless --parallel says otherwise
    eval:                             # optional; evaluation suites run after training, with options
      long_context:                   # experiments/evals/options.py: LongContextEvalConfig
        evals: [ppl, passkey]
        multiples: [1, 2, 4, 8]       # evaluation lengths = multiple x train.seq_len

`eval_overrides` keys are `model.<field>` (the evaluated model's config; weights
are loaded unchanged) or `eval.<suite>.<option>`.

Run directory names are `<run>[-<leaf><value>...][-s<seed>]` (grid keys in file
order, e.g. `moe-lr0.003-s1`). Every run is an ordinary run directory under the
sweep directory, trained in a worker subprocess (`--parallel N` runs N at once).
A run is complete once its `done.json` marker exists (written atomically after
training and evaluation, with a fingerprint of the run's settings): complete
runs are skipped, interrupted ones resume from their checkpoints, and a failed
run leaves `error.txt` (its traceback) and a `failed` row without stopping the
others. After the last run, results.jsonl, report.md and plots/ are written
(see experiments/report.py) and a summary table is printed.

The sweep process holds the sweep directory's lock, each worker its run directory's
(experiments/runctl.py). SIGTERM or SIGINT to the sweep reaches every worker once: each
saves a checkpoint and stops, its row says `interrupted`, no new run starts, and the
sweep exits 128 + the signal; rerunning the same command resumes them.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import yaml

from experiments import runctl
from experiments.errors import USAGE, exit_status, report, write_failed, write_text_atomic
from experiments.routing_health import KEYS as ROUTING_KEYS

BUILTIN_DIR = Path(__file__).parent / "configs" / "ablations"
_TOP_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "runs",
    "grid",
    "seeds",
    "baseline",
    "parallel",
    "eval",
    "factors",
    "headline",
)
EVAL_SUITES = ("long_context",)  # experiments/evals/<suite>.py
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 safe loading, plus floats without a dot such as `1e-3` (as OmegaConf reads them)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """Parse YAML the way run configs are parsed (so `lr: 1e-3` is a float)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


class SweepError(ValueError):
    """An invalid sweep file; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class RunSpec:
    """One declared run: config overrides, or (eval-only) another run to reuse with eval-time overrides."""

    overrides: dict[str, Any]
    reuse: Optional[str] = None
    eval_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str
    description: str
    base: dict[str, Any]
    overrides: dict[str, Any]
    runs: dict[str, RunSpec]
    grid: dict[str, list[Any]]
    seeds: Optional[list[int]]
    baseline: str
    parallel: int
    eval: dict[str, dict[str, Any]]
    factors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    headline: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedRun:
    """One run directory to produce: the fully expanded settings of one run x grid point x seed."""

    name: str  # run directory name: <label>[-s<seed>]
    label: str  # run name + grid suffix; the report averages a label over its seeds
    seed: Optional[int]
    base: dict[str, Any]  # the base run config mapping
    overrides: dict[str, Any]  # dotted key -> value, in application order
    eval: dict[str, dict[str, Any]]  # evaluation suite -> its options
    reuse: Optional[str] = None  # name of the planned run whose checkpoint this eval-only run uses
    eval_overrides: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of everything that decides this run's outcome; a changed fingerprint means "run again"."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedRun:
        return cls(**data)


# ---------------------------------------------------------------------------- loading and validation
def builtin_sweeps() -> list[str]:
    """Names of the sweeps shipped in experiments/configs/ablations/."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_sweep_path(sweep: str) -> Path:
    """A YAML path as given, or the file of a built-in sweep name."""
    path = Path(sweep)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SweepError("SWEEP", f"no sweep file at {path}")
        return path
    builtin = BUILTIN_DIR / f"{sweep}.yaml"
    if not builtin.is_file():
        raise SweepError(
            "SWEEP", f"{sweep!r} is neither a YAML file nor a built-in sweep ({', '.join(builtin_sweeps())})"
        )
    return builtin


def _flatten(mapping: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    """Nested override mappings become dotted keys: {model: {dim: 64}} -> {"model.dim": 64}."""
    if not isinstance(mapping, dict):
        raise SweepError(key, f"must be a mapping of run-config keys to values, got {type(mapping).__name__}")
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not k:
            raise SweepError(key, f"override keys must be non-empty strings, got {k!r}")
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{key}.{k}", dotted + "."))
        else:
            flat[dotted] = v
    return flat


def _check_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SweepError(key, f"must be a name of letters, digits and _.+- (a directory name), got {value!r}")
    return value


def _load_base(value: Any, sweep_path: Optional[Path]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise SweepError("base", f"must be a run-config YAML path or an inline mapping, got {type(value).__name__}")
    path = Path(value)
    if not path.is_absolute() and sweep_path is not None:
        path = sweep_path.parent / path
    if not path.is_file():
        raise SweepError("base", f"run-config file {path} does not exist (paths are relative to the sweep file)")
    loaded = read_yaml(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise SweepError("base", f"{path} must hold a mapping")
    return loaded


def _parse_eval(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError("eval", f"must map evaluation suites ({', '.join(EVAL_SUITES)}) to their options")
    suites: dict[str, dict[str, Any]] = {}
    for suite, options in value.items():
        if suite not in EVAL_SUITES:
            raise SweepError(f"eval.{suite}", f"unknown evaluation suite; valid suites: {', '.join(EVAL_SUITES)}")
        if options is not None and not isinstance(options, dict):
            raise SweepError(f"eval.{suite}", f"must be a mapping of the suite's options, got {options!r}")
        suites[suite] = dict(options or {})
    return suites


def _parse_runs(value: Any) -> dict[str, RunSpec]:
    if value is None:
        return {"base": RunSpec({})}
    if not isinstance(value, dict) or not value:
        raise SweepError("runs", "must be a non-empty mapping of run name -> overrides")
    runs: dict[str, RunSpec] = {}
    for name, body in value.items():
        key = f"runs.{name}"
        _check_name(name, key)
        if body is not None and not isinstance(body, dict):
            raise SweepError(key, f"must be a mapping of overrides (or empty), got {type(body).__name__}")
        body = dict(body or {})
        reuse = body.pop("reuse", None)
        eval_overrides = _flatten(body.pop("eval_overrides", None) or {}, f"{key}.eval_overrides")
        overrides = _flatten(body, key)
        if reuse is None and eval_overrides:
            raise SweepError(f"{key}.eval_overrides", "only eval-only runs (with `reuse`) take eval_overrides")
        for k in eval_overrides:
            if not k.startswith(("model.", "eval.")):
                raise SweepError(
                    f"{key}.eval_overrides.{k}",
                    "eval-time overrides change the model (model.<field>) or the evaluation (eval.<suite>.<option>)",
                )
        runs[name] = RunSpec(overrides, reuse, eval_overrides)
    for name, spec in runs.items():
        if spec.reuse is None:
            continue
        key = f"runs.{name}.reuse"
        if spec.reuse not in runs:
            raise SweepError(key, f"names no run of this sweep: {spec.reuse!r} (runs: {', '.join(runs)})")
        if runs[spec.reuse].reuse is not None:
            raise SweepError(key, f"{spec.reuse!r} is itself eval-only; reuse a run that trains")
        if spec.overrides:
            raise SweepError(
                f"runs.{name}.{next(iter(spec.overrides))}",
                "an eval-only run trains nothing; put eval-time changes under eval_overrides",
            )
    return runs


def _parse_grid(value: Any) -> dict[str, list[Any]]:
    if value is None:
        return {}
    flat = _flatten(value, "grid")
    for k, values in flat.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{k}", f"must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"grid.{k}", f"values must be distinct, got {values!r}")
    return flat


def _parse_factors(value: Any, runs: dict[str, RunSpec]) -> dict[str, dict[str, list[str]]]:
    """factor -> {level: [run names]}: exactly two levels per factor, disjoint, naming runs of the sweep."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError("factors", "must map a factor name to {level: [run names]} with two levels")
    out: dict[str, dict[str, list[str]]] = {}
    for factor, levels in value.items():
        key = f"factors.{factor}"
        if not isinstance(levels, dict) or len(levels) != 2:
            raise SweepError(key, f"must have exactly two levels, each a list of run names; got {levels!r}")
        seen: set[str] = set()
        for level, names in levels.items():
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise SweepError(f"{key}.{level}", f"must be a non-empty list of run names, got {names!r}")
            unknown = [n for n in names if n not in runs]
            if unknown:
                raise SweepError(f"{key}.{level}", f"names no run of this sweep: {unknown} (runs: {', '.join(runs)})")
            if seen & set(names):
                raise SweepError(key, f"a run is at both levels: {sorted(seen & set(names))}")
            seen |= set(names)
        out[str(factor)] = {str(level): list(names) for level, names in levels.items()}
    return out


def _parse_headline(value: Any) -> tuple[str, ...]:
    """The report's lead keys: one key or a list (eval keys such as `nll@256`, or row fields)."""
    if value is None:
        return ()
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise SweepError(
            "headline", f"must be a key or a non-empty list of keys (e.g. nll@256, val_loss), got {value!r}"
        )
    return tuple(keys)


def _parse_seeds(value: Any) -> Optional[list[int]]:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise SweepError("seeds", f"must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError("seeds", f"seeds must be distinct, got {value!r}")
    return list(value)


def parse_sweep(data: Any, sweep_path: Optional[Path] = None) -> Sweep:
    """Validate a sweep mapping (as loaded from YAML); relative `base` paths resolve against sweep_path."""
    if not isinstance(data, dict):
        raise SweepError("<file>", "a sweep file must hold a mapping")
    for k in data:
        if k not in _TOP_KEYS:
            raise SweepError(str(k), f"unknown key; valid keys: {', '.join(_TOP_KEYS)}")
    if "name" not in data:
        raise SweepError("name", "is required (the sweep directory is runs/<name>)")
    if "base" not in data:
        raise SweepError("base", "is required: a run-config YAML path or an inline mapping")
    name = _check_name(data["name"], "name")
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise SweepError("description", "must be a string")
    runs = _parse_runs(data.get("runs"))
    baseline = data.get("baseline", next(iter(runs)))
    if baseline not in runs:
        raise SweepError("baseline", f"names no run of this sweep: {baseline!r} (runs: {', '.join(runs)})")
    parallel = data.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise SweepError("parallel", f"must be an integer >= 1 (runs trained at once), got {parallel!r}")
    return Sweep(
        name=name,
        description=description,
        base=_load_base(data["base"], sweep_path),
        overrides=_flatten(data.get("overrides") or {}, "overrides"),
        runs=runs,
        grid=_parse_grid(data.get("grid")),
        seeds=_parse_seeds(data.get("seeds")),
        baseline=baseline,
        parallel=parallel,
        eval=_parse_eval(data.get("eval")),
        factors=_parse_factors(data.get("factors"), runs),
        headline=_parse_headline(data.get("headline")),
    )


def load_sweep(sweep: str) -> Sweep:
    """Load and validate a sweep from a YAML path or a built-in sweep name."""
    path = resolve_sweep_path(sweep)
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError("<file>", f"{path} is not valid YAML: {e}") from e
    return parse_sweep(data, path)


# ---------------------------------------------------------------------------- expansion
def _value_tag(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def expand(sweep: Sweep, cli_overrides: Optional[dict[str, Any]] = None) -> list[PlannedRun]:
    """All run directories of a sweep, in file order: runs x grid points x seeds.

    Overrides apply in the order: sweep `overrides`, grid point, the run's own,
    `train.seed`, then the command line's. An eval-only run reuses the run of the
    same grid point and seed.
    """
    cli = dict(cli_overrides or {})
    keys = list(sweep.grid)
    points = list(itertools.product(*(sweep.grid[k] for k in keys))) if keys else [()]
    seeds: list[Optional[int]] = list(sweep.seeds) if sweep.seeds is not None else [None]
    plans: list[PlannedRun] = []
    for run, spec in sweep.runs.items():
        for point in points:
            suffix = "".join(f"-{k.rsplit('.', 1)[-1]}{_value_tag(v)}" for k, v in zip(keys, point))
            label = f"{run}{suffix}"
            for seed in seeds:
                tail = "" if seed is None else f"-s{seed}"
                overrides = {**sweep.overrides, **dict(zip(keys, point)), **spec.overrides}
                if seed is not None:
                    overrides["train.seed"] = seed
                overrides.update(cli)
                reuse = f"{spec.reuse}{suffix}{tail}" if spec.reuse else None
                plans.append(
                    PlannedRun(
                        name=f"{label}{tail}",
                        label=label,
                        seed=seed,
                        base=sweep.base,
                        overrides=overrides,
                        eval=sweep.eval,
                        reuse=reuse,
                        eval_overrides=dict(spec.eval_overrides),
                    )
                )
    names = [p.name for p in plans]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SweepError("runs", f"two runs expand to the same directory name {dup!r}; rename one")
    return plans


def parse_cli_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML scalars/lists) -> dotted-key mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(item, "command-line overrides take the form key=value")
        out[key] = read_yaml(value) if value else ""
    return out


def validate_plans(plans: list[PlannedRun]) -> None:
    """Resolve every run's config and evaluation options without training; SweepError names run and key."""
    from experiments.config import load_run_config
    from experiments.evals.options import load_options

    by_name = {p.name: p for p in plans}
    for plan in plans:
        source = by_name[plan.reuse] if plan.reuse else plan
        try:
            load_run_config(source.base, [*to_dotlist(source.overrides), *_model_overrides(plan.eval_overrides)])
            for suite, options in plan.eval.items():
                load_options(options, _suite_overrides(plan.eval_overrides, suite))
        except ValueError as e:  # ConfigError names the key in its message
            raise SweepError(f"runs.{plan.name}", str(e)) from None
        for key in plan.eval_overrides:
            if key.startswith("eval.") and key.split(".")[1] not in plan.eval:
                raise SweepError(
                    f"runs.{plan.name}.eval_overrides.{key}", "names a suite missing from the eval section"
                )


def _model_overrides(eval_overrides: dict[str, Any]) -> list[str]:
    """The `model.<field>` eval-time overrides as `key=value` strings."""
    return to_dotlist({k: v for k, v in eval_overrides.items() if k.startswith("model.")})


def _suite_overrides(eval_overrides: dict[str, Any], suite: str) -> list[str]:
    """The `eval.<suite>.<option>` eval-time overrides of one suite, as `option=value` strings."""
    prefix = f"eval.{suite}."
    return to_dotlist({k[len(prefix) :]: v for k, v in eval_overrides.items() if k.startswith(prefix)})


# ---------------------------------------------------------------------------- run directories
PLAN_FILE = "plan.json"
DONE_FILE = "done.json"
ERROR_FILE = "error.txt"
LOG_FILE = "sweep.log"
RESULTS_FILE = "results.jsonl"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def completed_row(run_dir: Path, plan: PlannedRun) -> Optional[dict[str, Any]]:
    """The result row of a run completed with exactly these settings, else None (run it, or resume it)."""
    try:
        done = json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return done["row"] if done.get("fingerprint") == plan.fingerprint() else None


def failed_row(plan: PlannedRun, message: str) -> dict[str, Any]:
    """The results row of a run that did not complete."""
    return {"run": plan.label, "seed": plan.seed, "run_dir": plan.name, "status": "failed", "error": message}


def interrupted_row(plan: PlannedRun, status: int) -> dict[str, Any]:
    """The results row of a run stopped on request (it saved a checkpoint; rerunning the sweep resumes it)."""
    return {
        **failed_row(plan, f"stopped by {runctl.describe(status)}; rerun the sweep to resume"),
        "status": "interrupted",
    }


def _stop_status(returncode: int) -> Optional[int]:
    """The stop status of a worker that exited on request (128+N, 124, or killed by SIGTERM/SIGINT), else None."""
    status = 128 - returncode if returncode < 0 else returncode
    return status if status in (130, 143, runctl.TIME_LIMIT) else None


def _error_summary(run_dir: Path, returncode: int) -> str:
    try:
        lines = [ln for ln in (run_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else f"worker exited with status {returncode} (see {run_dir / LOG_FILE})"


def write_results(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """results.jsonl: one JSON row per run, replaced atomically."""
    path = sweep_dir / RESULTS_FILE
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows), "sweep results")
    return path


# ---------------------------------------------------------------------------- scheduling
@dataclass
class _Worker:
    plan: PlannedRun
    proc: subprocess.Popen
    reader: threading.Thread
    started: float


def _launch(plan: PlannedRun, sweep_dir: Path, threads: int, out: TextIO, lock: threading.Lock) -> _Worker:
    """Start a worker subprocess for one run; its output goes to the run's sweep.log and, prefixed, to `out`."""
    run_dir = sweep_dir / plan.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    (run_dir / DONE_FILE).unlink(missing_ok=True)
    write_json_atomic(run_dir / PLAN_FILE, asdict(plan))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "experiments.ablate", "--worker", str(run_dir / PLAN_FILE), "--threads", str(threads)]
    proc = subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches the sweep, which passes it on once
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        with open(run_dir / LOG_FILE, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with lock:
                    out.write(f"[{plan.name}] {line}")
                    out.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return _Worker(plan, proc, reader, time.time())


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    *,
    parallel: int = 1,
    cli_overrides: Optional[dict[str, Any]] = None,
    out: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every planned run (N at a time), skipping complete ones; returns the result rows.

    A run that fails gets a `failed` row and the others go on; an eval-only run
    waits for the run it reuses and fails if that one failed. results.jsonl is
    rewritten after every run, so a sweep in progress can already be inspected.
    SIGTERM/SIGINT are passed on to the running workers; once they saved, this raises
    runctl.Stopped (rows so far are in results.jsonl, stopped runs `interrupted`).
    """
    if parallel < 1:
        raise SweepError("--parallel", f"must be >= 1, got {parallel}")
    plans = expand(sweep, cli_overrides)
    out = out or sys.stdout
    sweep_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    lock = threading.Lock()
    rows: dict[str, dict[str, Any]] = {}
    queue = list(plans)
    running: dict[str, _Worker] = {}
    t0 = time.time()

    def say(msg: str) -> None:
        with lock:
            out.write(f"[sweep {sweep.name} {len(rows)}/{len(plans)} {time.time() - t0:6.0f}s] {msg}\n")
            out.flush()

    def record(plan: PlannedRun, row: dict[str, Any]) -> None:
        rows[plan.name] = row
        write_results(sweep_dir, [rows[p.name] for p in plans if p.name in rows])

    def forward(signum: int) -> None:
        for w in running.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signum)

    say(f"{len(plans)} runs -> {sweep_dir} ({parallel} at a time, {threads} torch thread(s) each)")
    signals = runctl.StopSignals(forward, announce=False)
    try:
        signals.__enter__()
        while queue or running:
            if signals.status and queue:
                say(f"{runctl.describe(signals.status)}: waiting for {len(running)} run(s) to save; starting no more")
                queue.clear()
            for plan in list(queue):
                if len(running) >= parallel:
                    break
                row = completed_row(sweep_dir / plan.name, plan)
                if row is not None:
                    queue.remove(plan)
                    record(plan, row)
                    say(f"{plan.name}: already complete, skipped")
                    continue
                if plan.reuse is not None:
                    dep = rows.get(plan.reuse)
                    if dep is None:
                        continue  # the checkpoint it evaluates is not trained yet
                    if dep["status"] != "done":
                        queue.remove(plan)
                        record(plan, failed_row(plan, f"the reused run {plan.reuse} failed"))
                        say(f"{plan.name}: FAILED, the reused run {plan.reuse} failed")
                        continue
                queue.remove(plan)
                running[plan.name] = _launch(plan, sweep_dir, threads, out, lock)
                say(f"{plan.name}: started" + (f" (evaluating {plan.reuse}'s checkpoint)" if plan.reuse else ""))
            finished = [w for w in running.values() if w.proc.poll() is not None]
            for w in finished:
                w.reader.join()
                del running[w.plan.name]
                run_dir = sweep_dir / w.plan.name
                row = completed_row(run_dir, w.plan) if w.proc.returncode == 0 else None
                took = time.time() - w.started
                stop = _stop_status(w.proc.returncode) if row is None else None
                if stop is not None:
                    record(w.plan, interrupted_row(w.plan, stop))
                    say(
                        f"{w.plan.name}: interrupted after {took:.0f}s ({runctl.describe(stop)}); it resumes on a rerun"
                    )
                elif row is None:
                    message = _error_summary(run_dir, w.proc.returncode)
                    record(w.plan, failed_row(w.plan, message))
                    say(f"{w.plan.name}: FAILED after {took:.0f}s: {message} (traceback in {run_dir / ERROR_FILE})")
                else:
                    record(w.plan, row)
                    say(f"{w.plan.name}: done in {took:.0f}s")
            if not finished:
                time.sleep(0.2)
    finally:
        signals.__exit__()
        for w in running.values():  # only after an error or an abort: the workers abort too
            w.proc.terminate()
        for w in running.values():
            w.proc.wait()
    if signals.status:
        stopped = [p.name for p in plans if rows.get(p.name, {}).get("status") == "interrupted"]
        raise runctl.Stopped(signals.status, f"sweep stopped by {runctl.describe(signals.status)}: "
                             f"{len(stopped)} run(s) saved and interrupted ({', '.join(stopped) or 'none'}), "
                             f"{len(plans) - len(rows)} not started; rerun the same command to resume")  # fmt: skip
    return [rows[p.name] for p in plans]


def to_dotlist(overrides: dict[str, Any]) -> list[str]:
    """Dotted overrides as `key=value` strings whose values parse back (as YAML) to the same values."""
    items = []
    for key, value in overrides.items():
        if isinstance(value, str):
            text = value if read_yaml(value) == value else json.dumps(value)
        else:
            text = json.dumps(value)
        items.append(f"{key}={text}")
    return items


# ---------------------------------------------------------------------------- one run (in a worker process)
def _eval_model(source_dir: Path, model_overrides: list[str]) -> tuple[Any, Any]:
    """The trained model of `source_dir` and its run config, with eval-time model overrides applied.

    The overridden config builds a fresh model that loads the trained weights strictly, so an
    override that changes a parameter shape fails loudly instead of evaluating something else.
    """
    import torch

    from experiments.checkpoint import load_model
    from experiments.config import load_run_config
    from models.transformer import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_model(source_dir, device=device)
    if not model_overrides:
        return model, cfg
    cfg = load_run_config(cfg.to_dict(), model_overrides)
    with torch.device("meta"):
        changed = Transformer(cfg.model)
    changed.to_empty(device=device)
    changed.init_weights()
    changed.load_state_dict(model.state_dict())
    return changed.eval(), cfg


def _evaluate(
    plan: PlannedRun, source_dir: Path, run_dir: Path
) -> tuple[Any, dict[str, float], dict[str, list[float]]]:
    """Run the sweep's evaluation suites on the source run's model; results go to run_dir/eval/<suite>.json.

    Returns (run config, flat eval keys, their 95% intervals).

    Options layer as: the run config's `eval.<suite>` section, the sweep's `eval.<suite>`, then the
    run's `eval_overrides`.
    """
    from omegaconf import OmegaConf

    from experiments.data.corpus import load_corpus
    from experiments.evals import long_context
    from experiments.evals.options import load_options

    model, cfg = _eval_model(source_dir, _model_overrides(plan.eval_overrides))
    flat: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    if not plan.eval:
        return cfg, flat, intervals
    tokenizer = cfg.tokenizer.build()
    heldout = load_corpus(
        cfg.data.source, tokenizer, "val", Path(cfg.data.cache_dir).expanduser(), val_fraction=cfg.data.val_fraction
    )
    for suite, options in plan.eval.items():
        run_options = OmegaConf.structured(getattr(cfg.eval, suite))
        opts = load_options(run_options, [*to_dotlist(options), *_suite_overrides(plan.eval_overrides, suite)])
        print(f"evaluating {suite} at lengths {opts.resolved_lengths(cfg.train.seq_len)}", flush=True)
        result = long_context.evaluate(model, tokenizer, opts, train_len=cfg.train.seq_len, heldout=heldout)
        long_context.write_results(result, run_dir / "eval", plots=opts.plots, suite=suite)
        flat.update({k: v for k, v in result.items() if "@" in k and isinstance(v, (int, float))})
        intervals.update(result.get("ci95", {}))
    return cfg, flat, intervals


_TRAINING_FIELDS = ("tokens", "tokens_per_s", "final_loss", "val_loss")


def _training_fields(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """tokens, tokens_per_s, final_loss, val_loss from the training summary, else the run's metrics.jsonl;
    plus, for MoE runs, the routing-health keys computed from metrics.jsonl."""
    from experiments.report import load_metrics
    from experiments.routing_health import summarize

    metrics = load_metrics(run_dir)
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


def run_one(plan: PlannedRun, run_dir: Path) -> dict[str, Any]:
    """Train (unless eval-only), evaluate, and return the run's results row."""
    if plan.reuse is None:
        from experiments.config import load_run_config
        from experiments.train import train

        cfg = load_run_config(plan.base, [*to_dotlist(plan.overrides), f"run_dir={run_dir}"])
        training = _training_fields(train(cfg), run_dir)
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


# ---------------------------------------------------------------------------- command line
def _print_plan(plans: list[PlannedRun], out: TextIO) -> None:
    for p in plans:
        what = (
            f"eval-only, reuses {p.reuse}: {to_dotlist(p.eval_overrides)}"
            if p.reuse
            else " ".join(to_dotlist(p.overrides))
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
        plans = expand(sweep, parse_cli_overrides(args.overrides))
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
    rows = run_sweep(sweep, sweep_dir, parallel=parallel, cli_overrides=parse_cli_overrides(args.overrides))
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

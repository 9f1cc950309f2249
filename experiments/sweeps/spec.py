"""Sweep files: the schema, its validation, and the expansion into planned run directories.

A sweep is one YAML, one command (`llamoe ablate`, experiments/commands/ablate.py), one results folder.

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
      moe-upcycled:                   # init_from naming a run of the sweep: start from its final weights
        model: llama4-tiny            # (same grid point and seed; it runs after that run); a path is a path
        init_from: dense
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

Overrides are mappings end to end (experiments/overrides.py): a run's settings reach
load_run_config as `{dotted key: value}`, never as text to parse again.

Run directory names are `<run>[-<leaf><value>...][-s<seed>]` (grid keys in file
order, e.g. `moe-lr0.003-s1`). Every run is an ordinary run directory under the
sweep directory, trained in a worker subprocess (`--parallel N` runs N at once).
A run is complete once its `done.json` marker exists (written atomically after
training and evaluation, with a fingerprint of the run's settings): complete
runs are skipped, interrupted ones resume from their checkpoints, and a failed
run leaves `error.txt` (its traceback) and a `failed` row without stopping the
others. After the last run, results.jsonl, report.md and plots/ are written
(see experiments/sweeps/report.py) and a summary table is printed.

The sweep process holds the sweep directory's lock, each worker its run directory's
(experiments/train/runctl.py). SIGTERM or SIGINT to the sweep reaches every worker once: each
saves a checkpoint and stops, its row says `interrupted`, no new run starts, and the
sweep exits 128 + the signal; rerunning the same command resumes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from llamoe.config_error import ConfigError
from llamoe.experiments.overrides import flatten, read_yaml, read_yaml_file

BUILTIN_DIR = Path(__file__).parents[1] / "configs" / "ablations"
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


class SweepError(ConfigError):
    """An invalid sweep file; the message names the offending key (a ConfigError like any other)."""


@dataclass(frozen=True)
class RunSpec:
    """One declared run: config overrides, or (eval-only) another run to reuse with eval-time overrides."""

    overrides: dict[str, Any]
    reuse: Optional[str] = None
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None  # a run of this sweep whose final weights this run starts from


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
    init_from: Optional[str] = None  # name of the planned run whose final weights this run starts from

    @property
    def depends_on(self) -> Optional[str]:
        """The planned run that must finish first (the one reused or started from)."""
        return self.reuse or self.init_from

    def fingerprint(self) -> str:
        """Hash of everything that decides this run's outcome; a changed fingerprint means "run again"."""
        fields = asdict(self)
        if fields["init_from"] is None:  # absent, as before the key existed: finished sweeps stay complete
            del fields["init_from"]
        blob = json.dumps(fields, sort_keys=True, default=str)
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


def _flatten(mapping: Any, key: str) -> dict[str, Any]:
    """Nested override mappings become dotted keys: {model: {dim: 64}} -> {"model.dim": 64}."""
    try:
        return flatten(mapping, key)
    except ConfigError as e:
        raise SweepError(e.key, str(e).split(": ", 1)[1]) from None


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
    try:
        return read_yaml_file(path, "base")
    except ConfigError as e:
        raise SweepError(e.key, str(e).split(": ", 1)[1]) from None


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
        named = body.get("init_from")
        init_from = body.pop("init_from") if isinstance(named, str) and named in value else None
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
        runs[name] = RunSpec(overrides, reuse, eval_overrides, init_from)
    for name, spec in runs.items():
        if spec.init_from is not None:
            if spec.reuse is not None:
                raise SweepError(f"runs.{name}.init_from", "an eval-only run (reuse) trains nothing to start")
            if runs[spec.init_from].reuse is not None:
                raise SweepError(
                    f"runs.{name}.init_from", f"{spec.init_from!r} is eval-only; start from a run that trains"
                )
            if spec.init_from == name:
                raise SweepError(f"runs.{name}.init_from", "a run cannot start from itself")
        chain = [name]  # init_from runs in order: a cycle would wait forever
        while (parent := runs[chain[-1]].init_from) is not None and parent not in chain:
            chain.append(parent)
        if parent == name and len(chain) > 1:
            raise SweepError(f"runs.{name}.init_from", f"circular: {' -> '.join([*chain, name])}")
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
        data = read_yaml(path.read_text(), "<file>")
    except ConfigError as e:
        raise SweepError("<file>", f"{path} {str(e).split(': ', 1)[1]}") from None
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
                init_from = f"{spec.init_from}{suffix}{tail}" if spec.init_from else None
                plans.append(
                    PlannedRun(
                        name=f"{label}{tail}",
                        label=label,
                        seed=seed,
                        base=sweep.base,
                        overrides=overrides,
                        eval=sweep.eval,
                        reuse=reuse,
                        init_from=init_from,
                        eval_overrides=dict(spec.eval_overrides),
                    )
                )
    names = [p.name for p in plans]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SweepError("runs", f"two runs expand to the same directory name {dup!r}; rename one")
    return plans


def validate_plans(plans: list[PlannedRun], world_size: int = 1) -> None:
    """Resolve every run's config (for `world_size` processes) and evaluation options, and check what each needs
    of this machine (experiments/train/preflight.py), without training; SweepError names run and key."""
    from llamoe.experiments.config import load_run_config
    from llamoe.experiments.evals.options import load_options
    from llamoe.experiments.train import preflight

    by_name = {p.name: p for p in plans}
    for plan in plans:
        source = by_name[plan.reuse] if plan.reuse else plan
        try:
            overrides = {**source.overrides, **model_overrides(plan.eval_overrides)}
            preflight.check(load_run_config(source.base, overrides, world_size=world_size))
            for suite, options in plan.eval.items():
                load_options(options, suite_overrides(plan.eval_overrides, suite))
        except ValueError as e:  # ConfigError names the key in its message
            raise SweepError(f"runs.{plan.name}", str(e)) from None
        for key in plan.eval_overrides:
            if key.startswith("eval.") and key.split(".")[1] not in plan.eval:
                raise SweepError(
                    f"runs.{plan.name}.eval_overrides.{key}", "names a suite missing from the eval section"
                )


def model_overrides(eval_overrides: dict[str, Any]) -> dict[str, Any]:
    """The `model.<field>` eval-time overrides."""
    return {k: v for k, v in eval_overrides.items() if k.startswith("model.")}


def suite_overrides(eval_overrides: dict[str, Any], suite: str) -> dict[str, Any]:
    """The `eval.<suite>.<option>` eval-time overrides of one suite, keyed by option."""
    prefix = f"eval.{suite}."
    return {k[len(prefix) :]: v for k, v in eval_overrides.items() if k.startswith(prefix)}

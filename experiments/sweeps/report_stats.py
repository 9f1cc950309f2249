"""Intervals in sweep reports: table cells "mean [low, high]", the headline comparison, NLL by position bucket.

One run (one seed): the 95% bootstrap interval its evaluation wrote (`eval_ci95` in results.jsonl,
experiments/evals/stats.py). Several seeds: a Student-t interval over the per-seed values, which
holds the training noise as well as the evaluation noise. A difference between two runs gets the
interval sqrt(h_a^2 + h_b^2) around it (h: half-widths; the runs are independent), and counts as a
result only when that interval excludes 0. Factor effects and differences from the baseline between
single-seed runs scored on the same held-out windows are paired by window instead: the contrast is computed per window and bootstrapped,
which removes the window-to-window variance every run shares.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from llamoe.experiments.evals.stats import bootstrap_mean, t_interval
from llamoe.experiments.train.metrics_log import number

Estimate = tuple[float, float, float]  # mean, low, high


def value(row: dict[str, Any], key: str) -> float | None:
    """A row's value of `key`: its evaluation key when the evaluation wrote one, else its training field
    (val_loss, final_loss, routing_imbalance, ...)."""
    evals = row.get("eval") or {}
    return number(evals[key]) if key in evals else number(row.get(key))


def train_length(rows: Sequence[dict[str, Any]]) -> int | None:
    """The training length of the first row that records one."""
    return next((r["train_seq_len"] for r in rows if r.get("train_seq_len")), None)


def ratio(x: float | None, base: float | None) -> str:
    """x / base as a cell such as '1.02x'; '-' when either is missing or base is 0."""
    return "-" if x is None or not base else f"{x / base:.2f}x"


def _over_seeds(values: Sequence[float]) -> Estimate:
    """Mean and 95% t-interval of per-seed values (two or more)."""
    mean = statistics.fmean(values)
    lo, hi = t_interval(values) or (mean, mean)
    return mean, lo, hi


def estimate(rows: Sequence[dict[str, Any]], key: str) -> Estimate | None:
    """Mean and 95% interval of `key` over the done rows of one run label (one row per seed): a t-interval
    over seeds, or for one seed the bootstrap interval its evaluation wrote (none for a training field)."""
    pairs = [(v, (r.get("eval_ci95") or {}).get(key)) for r in rows if (v := value(r, key)) is not None]
    if not pairs:
        return None
    if len(pairs) > 1:
        return _over_seeds([v for v, _ in pairs])
    mean, ci = pairs[0]
    return (mean, math.nan, math.nan) if ci is None else (mean, float(ci[0]), float(ci[1]))


def paired_difference(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]], key: str) -> Estimate | None:
    """a - b for one key. When both runs have two or more seeds in common, the t-interval of the per-seed
    differences (runs of one seed share data order and evaluation windows, so their difference cancels that
    noise); otherwise the difference of two independent estimates."""
    by_seed_b = {r.get("seed"): value(r, key) for r in rows_b}
    diffs = [
        va - vb
        for r in rows_a
        if r.get("seed") is not None
        and (va := value(r, key)) is not None
        and (vb := by_seed_b.get(r.get("seed"))) is not None
    ]
    if len(diffs) >= 2:
        return _over_seeds(diffs)
    a, b = estimate(rows_a, key), estimate(rows_b, key)
    return difference(a, b) if a is not None and b is not None else None


def fmt(est: Estimate | None, digits: int = 3) -> str:
    """'mean [low, high]', or the mean alone when there is no interval."""
    if est is None:
        return "-"
    mean, lo, hi = est
    if math.isnan(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def combine(terms: Sequence[tuple[float, Estimate | None]]) -> Estimate | None:
    """sum(c * e) of independent estimates, with half-width sqrt(sum((c * h)^2)) (normal approximation
    of each half-width h); None when any estimate is missing or has no interval."""
    known = [(c, e) for c, e in terms if e is not None and not math.isnan(e[1])]
    if len(known) < len(terms):
        return None
    value = sum(c * e[0] for c, e in known)
    half = math.sqrt(sum((c * (e[2] - e[1]) / 2) ** 2 for c, e in known))
    return value, value - half, value + half


def difference(a: Estimate, b: Estimate) -> Estimate | None:
    """a - b with the interval of two independent estimates."""
    return combine([(1.0, a), (-1.0, b)])


def _effect_cell(diff: Estimate | None, one_seed: bool = False) -> str:
    return f"{fmt(diff)} ({verdict(diff, one_seed)})" if diff is not None else "-"


def verdict(diff: Estimate | None, one_seed: bool = False) -> str:
    """Whether a difference is a result. With `one_seed` (a run in it has a single seed) its interval holds
    evaluation noise only: it says these trained weights differ, not that the configurations do."""
    if diff is None:
        return "no interval"
    if diff[1] <= 0 <= diff[2]:
        return "inside its interval: not a result"
    return "excludes 0 for these weights; one seed, training noise not measured" if one_seed else "interval excludes 0"


def metric_keys(rows: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """The rows' eval keys "<metric>@<length>" (or "bucket_nll@<start>-<end>"), by length (bucket start);
    variants such as "ppl@256:off" (another temperature setting) left out."""
    keys = {k for r in rows for k in (r.get("eval") or {}) if k.startswith(f"{metric}@") and ":" not in k}
    return sorted(keys, key=lambda k: int(k.split("@")[1].split("-")[0]))


def headline_key(rows: Sequence[dict[str, Any]]) -> str | None:
    """`delta_tail_nll@<8 x train length>` when the rows have it, else the longest delta_tail_nll key."""
    keys = metric_keys(rows, "delta_tail_nll")
    if not keys:
        return None
    train_len = train_length(rows)
    preferred = f"delta_tail_nll@{8 * train_len}" if train_len else None
    return preferred if preferred in keys else keys[-1]


def baseline_difference(
    g: Any, baseline: Any, key: str, per_window: dict[str, dict[str, Any]] | None = None
) -> tuple[Estimate | None, bool]:
    """(g - baseline for one key, whether a run in it has a single seed): paired by held-out window when
    both are single-seed runs scored on the same windows (`per_window`, see factor_lines), else
    `paired_difference` (by seed, or independent); (None, False) for the baseline itself."""
    if baseline is None or g is baseline:
        return None, False
    per_window = per_window or {}
    paired = paired_by_window([(1.0, per_window.get(g.run)), (-1.0, per_window.get(baseline.run))], key)
    diff = paired if paired is not None else paired_difference(g.ok, baseline.ok, key)
    return diff, min(len(g.ok), len(baseline.ok)) < 2


def headline_lines(
    groups: Sequence[Any], baseline: Any, keys: Sequence[str] = (), per_window: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """The study's lead. With `keys` (a sweep's `headline:`), each key per run with its interval and its
    difference from the baseline (paired over seeds or held-out windows where it can be), beside the
    active parameters and FLOPs/token each run paid. Without, the long-context lead: `delta_tail_nll@8L`
    and retrieval at 8L. `per_window`: as for factor_lines."""
    if keys:
        return _compare_lines(groups, baseline, list(keys), per_window)
    rows = [r for g in groups for r in g.ok]
    key = headline_key(rows)
    if key is None:
        return []
    length = key.split("@")[1]
    retrieval = [
        f"{m}@{length}"
        for m in ("passkey", "needle", "mqar")
        if any(f"{m}@{length}" in (r.get("eval") or {}) for r in rows)
    ]
    lines = [
        f"## Headline: `{key}`",
        "",
        "Change of the mean NLL over positions [N/2, N) from the training length (nats; lower is better), "
        "its difference from the baseline (paired by seed, or for single-seed runs scored on the same "
        "held-out windows by window), and retrieval at the same length (exact-match fraction); "
        "95% intervals.",
        "",
        f"| run | {key} | vs `{baseline.run if baseline else '-'}` | | " + " | ".join(retrieval) + " |",
        "|---|---:|---:|---|" + "---:|" * len(retrieval),
    ]
    for g in groups:
        cells = " | ".join(fmt(estimate(g.ok, k)) for k in retrieval)
        diff, one_seed = baseline_difference(g, baseline, key, per_window)
        vs, why = (fmt(diff), verdict(diff, one_seed)) if diff is not None else ("-", "")
        lines.append(f"| {g.run} | {fmt(estimate(g.ok, key))} | {vs} | {why} | {cells} |")
    return [*lines, ""]


def _compare_lines(
    groups: Sequence[Any], baseline: Any, keys: list[str], per_window: dict[str, dict[str, Any]] | None
) -> list[str]:
    """One row per run: seeds, active params and FLOPs/token against the baseline, then per key the
    run's estimate, its difference from the baseline and whether that difference is a result."""
    base_name = baseline.run if baseline is not None else "-"
    lines = [
        "## Headline: " + ", ".join(f"`{k}`" for k in keys),
        "",
        f"Each key per run and its difference from `{base_name}`, 95% intervals: a t-interval over seeds, "
        "and for a difference the t-interval of the per-seed differences (runs of one seed share data "
        "order and evaluation windows), or for single-seed runs scored on the same held-out windows the "
        "bootstrap of the per-window differences (else the two runs' intervals as independent). "
        "A difference whose interval holds 0 is not a result.",
        "",
        "| run | seeds | active/base | FLOPs/base | " + " | ".join(f"{k} | vs `{base_name}`" for k in keys) + " |",
        "|---|---:|---:|---:|" + "---:|---:|" * len(keys),
    ]

    def vs_base(g: Any, key: str) -> str:
        return ratio(g.mean(key), baseline.mean(key) if baseline is not None else None)

    for g in groups:
        cells = [str(len(g.ok)), vs_base(g, "active_params"), vs_base(g, "flops_per_token")]
        for k in keys:
            cells += [fmt(estimate(g.ok, k)), _effect_cell(*baseline_difference(g, baseline, k, per_window))]
        lines.append(f"| {g.run} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def bucket_lines(groups: Sequence[Any]) -> list[str]:
    """A table of NLL by position bucket ([0, L), [L, 2L), ...) per run, with intervals."""
    keys = metric_keys([r for g in groups for r in g.ok], "bucket_nll")
    if not keys:
        return []
    heads = [f"[{k.split('@')[1].replace('-', ', ')})" for k in keys]
    lines = [
        "## NLL by position bucket",
        "",
        "Mean NLL (nats) of the tokens at positions in each bucket, on the longest evaluation length; 95% intervals.",
        "",
        "| run | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for g in groups:
        lines.append(f"| {g.run} | " + " | ".join(fmt(estimate(g.ok, k)) for k in keys) + " |")
    return [*lines, ""]


def draw_bucket_nll(ax: Any, groups: Sequence[Any]) -> bool:
    """Draw NLL by position bucket (x: bucket end, log2) for every run, with 95% interval bars, on `ax`;
    False when the rows hold no bucket keys."""
    keys = metric_keys([r for g in groups for r in g.ok], "bucket_nll")
    if not keys:
        return False
    for i, g in enumerate(groups):
        pts = [(int(k.split("-")[1]), estimate(g.ok, k)) for k in keys]
        pts = [(x, e) for x, e in pts if e is not None]
        if not pts:
            continue
        ys = [e[0] for _, e in pts]
        err = [
            [0 if math.isnan(e[1]) else e[0] - e[1] for _, e in pts],
            [0 if math.isnan(e[2]) else e[2] - e[0] for _, e in pts],
        ]
        ax.errorbar([x for x, _ in pts], ys, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=g.run)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position bucket end (tokens)")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("NLL by position bucket")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return True


def paired_by_window(terms: Sequence[tuple[float, dict[str, Any] | None]], key: str) -> Estimate | None:
    """sum(c * run) computed per held-out window and bootstrapped over windows, from each run's
    `per_window` evaluation result (experiments/evals/long_context.py); None unless every run has `key`
    on the same windows (equal windows_sha256 and count)."""
    if not terms or any(w is None or key not in w for _, w in terms):
        return None
    if len({w["windows_sha256"] for _, w in terms}) != 1 or len({len(w[key]) for _, w in terms}) != 1:
        return None
    contrast = sum(c * np.asarray(w[key], dtype=np.float64) for c, w in terms)
    lo, hi = bootstrap_mean(contrast)
    return float(contrast.mean()), lo, hi


def factor_lines(
    groups: Sequence[Any],
    factors: dict[str, dict[str, list[str]]],
    per_window: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Attribution in a two-level factorial design: each factor's effect (second level minus first,
    averaged over the other factors' runs) on held-out NLL at the training length and on the headline
    key, with intervals; for two factors over four runs, also their interaction.

    `per_window` maps a single-seed run to its evaluation's per-window values: an effect whose runs all
    have them on the same windows is paired by window (`paired_by_window`), else the runs' intervals
    are combined as independent (`combine`)."""
    if not factors:
        return []
    per_window = per_window or {}
    by_run = {g.run: g for g in groups}
    cells_seen: list[tuple[bool, bool]] = []  # (paired by window, a run has one seed) of every cell

    def contrast(terms: list[tuple[float, str]], key: str) -> str:
        """sum(c * run) as a table cell with its verdict."""
        paired = paired_by_window([(c, per_window.get(n)) for c, n in terms], key)
        one_seed = any(len(by_run[n].ok) < 2 for _, n in terms if n in by_run)
        cells_seen.append((paired is not None, one_seed))
        if paired is None:
            paired = combine([(c, estimate(by_run[n].ok, key) if n in by_run else None) for c, n in terms])
        return _effect_cell(paired, one_seed)

    rows = [r for g in groups for r in g.ok]
    train_len = train_length(rows)
    keys = [k for k in (f"nll@{train_len}" if train_len else None, headline_key(rows)) if k]
    if not keys:
        return []
    lines = [
        "## Factor attribution",
        "",
        "Effect of each factor: mean over its second level's runs minus mean over its first level's "
        "(95% intervals; an effect whose interval holds 0 is not a result). "
        f"`nll@{train_len}` is the held-out NLL at the training length.",
        "",
        "| factor | levels | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]

    def effect(key: str, low: list[str], high: list[str]) -> str:
        """mean over `high`'s runs minus mean over `low`'s, as a table cell."""
        return contrast([(1 / len(high), n) for n in high] + [(-1 / len(low), n) for n in low], key)

    for factor, levels in factors.items():
        (first, a), (second, b) = levels.items()
        lines.append(f"| {factor} | {second} − {first} | " + " | ".join(effect(k, a, b) for k in keys) + " |")
    if len(factors) == 2:  # interaction: (high-high - high-low) - (low-high - low-low), one run per corner
        (f1, l1), (f2, l2) = factors.items()
        corners = {
            (i, j): [n for n in n1 if n in n2] for i, n1 in enumerate(l1.values()) for j, n2 in enumerate(l2.values())
        }
        if all(len(runs) == 1 and runs[0] in by_run for runs in corners.values()):
            sign = {(1, 1): 1.0, (0, 0): 1.0, (1, 0): -1.0, (0, 1): -1.0}
            cells = [contrast([(sign[c], runs[0]) for c, runs in corners.items()], key) for key in keys]
            if "-" not in cells:
                lines.append(f"| {f1} × {f2} | interaction | " + " | ".join(cells) + " |")
    paired_cells = [paired for paired, _ in cells_seen]
    if paired_cells and all(paired_cells):
        how = "Every interval is paired by held-out window: all runs were scored on the same windows"
    elif any(paired_cells):
        how = "Intervals are paired by held-out window where the runs share their windows, else combined as independent"
    else:
        how = "Intervals combine the runs' own intervals as independent estimates"
    how += "."
    if any(one_seed for _, one_seed in cells_seen):
        how += (
            " With one seed per run an interval holds evaluation noise only: an effect outside it shows that "
            "these trained weights differ, not that the configurations do; `seeds: [0, 1, 2]` measures that."
        )
    return [*lines, "", how, ""]

"""Sweep reports: a comparison table (Markdown and terminal) and plots, built from a sweep directory alone.

Inputs: `results.jsonl` (one row per run, see experiments/commands/ablate.py), the
optional `sweep.json` (name, description, baseline) and each run directory's
`metrics.jsonl`. Outputs: `report.md` and `plots/*.png`. Re-run any time:

    python -m llamoe.experiments.sweeps.report runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from llamoe.experiments.errors import write_text_atomic  # noqa: E402
from llamoe.experiments.evals import plots as figures  # noqa: E402
from llamoe.experiments.sweeps import report_stats  # noqa: E402
from llamoe.experiments.train import routing_health
from llamoe.experiments.train.metrics_log import number, read_metrics  # noqa: E402

MATCH_TOLERANCE = 0.05  # ratios within 5% of 1 count as "matched"
# Eval metrics shown in the tables, with 95% intervals. ppl and nll average over [0, N) and so hide
# where length generalisation breaks; they stay in the eval JSON and the ppl plot. Entropy is a diagnostic.
TABLE_METRICS = ("delta_tail_nll", "tail_nll", "passkey", "needle", "mqar")


# ---------------------------------------------------------------------------- loading
def load_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows of results.jsonl (an empty list if the sweep has none yet)."""
    path = sweep_dir / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sweep_info(sweep_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    path = sweep_dir / "sweep.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.setdefault("name", sweep_dir.name)
    info.setdefault("description", "")
    if not info.get("baseline") and rows:
        info["baseline"] = rows[0]["run"]
    return info


# ---------------------------------------------------------------------------- aggregation
@dataclass
class Group:
    """All seeds of one run label: per-field values for mean ± std."""

    run: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "done"]

    def values(self, key: str) -> list[float]:
        """The done seeds' values of an eval key ("ppl@256") or a training field (report_stats.value)."""
        return [v for r in self.ok if (v := report_stats.value(r, key)) is not None]

    def mean(self, key: str) -> Optional[float]:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None


def group_rows(rows: Iterable[dict[str, Any]]) -> list[Group]:
    """Rows grouped by run label, in first-appearance order."""
    groups: dict[str, Group] = {}
    for r in rows:
        groups.setdefault(r["run"], Group(r["run"])).rows.append(r)
    return list(groups.values())


def _baseline(groups: list[Group], name: Optional[str]) -> Optional[Group]:
    """The group named `name`, else the first one (None when there are no groups)."""
    return next((g for g in groups if g.run == name), groups[0] if groups else None)


def eval_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The "<metric>@<length>" eval keys of TABLE_METRICS present, ordered by metric then length."""
    return [k for metric in TABLE_METRICS for k in report_stats.metric_keys(rows, metric)]


def _lengths(rows: Sequence[dict[str, Any]], metric: str) -> list[int]:
    """The lengths N of the rows' "<metric>@N" eval keys, ascending."""
    return [int(k.split("@")[1]) for k in report_stats.metric_keys(rows, metric)]


# ---------------------------------------------------------------------------- formatting
def _si(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _columns(groups: list[Group], baseline: Optional[Group], evals: list[str]) -> list[tuple[str, list[str]]]:
    """(header, cells) per column of the comparison table."""
    base_active = baseline.mean("active_params") if baseline else None
    base_flops = baseline.mean("flops_per_token") if baseline else None
    cols: list[tuple[str, list[str]]] = [
        ("run", [g.run for g in groups]),
        ("seeds", [f"{len(g.ok)}/{len(g.rows)}" for g in groups]),
        ("params", [_si(g.mean("params")) for g in groups]),
        ("active", [_si(g.mean("active_params")) for g in groups]),
        ("active/base", [report_stats.ratio(g.mean("active_params"), base_active) for g in groups]),
        ("FLOPs/tok", [_si(g.mean("flops_per_token")) for g in groups]),
        ("FLOPs/base", [report_stats.ratio(g.mean("flops_per_token"), base_flops) for g in groups]),
        ("train len", [_si(g.mean("train_seq_len")) for g in groups]),
        ("tokens", [_si(g.mean("tokens")) for g in groups]),
        ("tok/s", [_si(g.mean("tokens_per_s")) for g in groups]),
        ("final loss", [report_stats.fmt(report_stats.estimate(g.ok, "final_loss")) for g in groups]),
        ("val loss", [report_stats.fmt(report_stats.estimate(g.ok, "val_loss")) for g in groups]),
    ]
    cols += [(k, [report_stats.fmt(report_stats.estimate(g.ok, k)) for g in groups]) for k in evals]
    cols += routing_health.table_columns([g.ok for g in groups])  # MoE runs only
    return cols


def markdown_table(cols: list[tuple[str, list[str]]]) -> str:
    """A GitHub Markdown table from (header, cells) columns."""
    head = "| " + " | ".join(h for h, _ in cols) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"
    body = ["| " + " | ".join(c[i] for _, c in cols) + " |" for i in range(len(cols[0][1]))]
    return "\n".join([head, rule, *body])


def text_table(cols: list[tuple[str, list[str]]]) -> str:
    """A fixed-width table for the terminal."""
    widths = [max(len(h), *(len(c) for c in cells)) for h, cells in cols]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((h, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in range(len(cols[0][1])):
        lines.append(
            "  ".join(c[r].ljust(w) if i == 0 else c[r].rjust(w) for i, ((_, c), w) in enumerate(zip(cols, widths)))
        )
    return "\n".join(lines)


def matching_notes(groups: list[Group], baseline: Optional[Group]) -> list[str]:
    """One line per run saying how it compares with the baseline in active params, total params and FLOPs."""
    if baseline is None:
        return []
    notes = []
    for g in groups:
        if g is baseline:
            continue
        parts, matched = [], []
        for key, what in (
            ("active_params", "active params"),
            ("params", "total params"),
            ("flops_per_token", "FLOPs/token"),
        ):
            x, b = g.mean(key), baseline.mean(key)
            if x is None or not b:
                continue
            parts.append(f"{report_stats.ratio(x, b)} {what}")
            if abs(x / b - 1) <= MATCH_TOLERANCE:
                matched.append(what)
        if parts:
            verdict = f"matched {', '.join(matched)}" if matched else "no size matched"
            notes.append(f"- **{g.run}** vs **{baseline.run}**: {', '.join(parts)} → {verdict}")
    return notes


def summary_columns(rows: list[dict[str, Any]], baseline: Optional[str] = None) -> list[tuple[str, list[str]]]:
    """The comparison-table columns for a list of result rows."""
    groups = group_rows(rows)
    return _columns(groups, _baseline(groups, baseline), eval_keys(rows))


_TERMINAL_DROPS = ("FLOPs/tok", "train len", "tokens")  # in report.md; left out to fit a terminal


def terminal_table(rows: list[dict[str, Any]], baseline: Optional[str] = None) -> str:
    """The end-of-sweep summary printed to the terminal (report.md has every column)."""
    if not rows:
        return "(no results)"
    return text_table([c for c in summary_columns(rows, baseline) if c[0] not in _TERMINAL_DROPS])


# ---------------------------------------------------------------------------- plots
def _metric_series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(tokens, value) pairs of the logged rows that carry `key`."""
    xs, ys = [], []
    for m in metrics:
        v, t = number(m.get(key)), number(m.get("tokens"))
        if v is not None and t is not None:
            xs.append(t)
            ys.append(v)
    return xs, ys


def plot_loss(sweep_dir: Path, groups: list[Group], plots: Path) -> list[Path]:
    """Training (and validation) loss against tokens seen and against training FLOPs; a run started from
    another run's weights (init_from) is shifted by the tokens and FLOPs those weights cost."""
    figs = {"tokens": plt.subplots(figsize=(7, 4.5)), "flops": plt.subplots(figsize=(7, 4.5))}
    drawn = False
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        for j, row in enumerate(g.ok):
            metrics = read_metrics(sweep_dir / row.get("source_run_dir", row["run_dir"]))
            flops = row.get("flops_per_token") or 0.0
            # a run started from another run's weights: its curve starts at what those weights cost
            tokens0, flops0 = row.get("init_tokens") or 0, row.get("init_flops") or 0.0
            for key, style in (("loss", "-"), ("val_loss", "o--")):
                xs, ys = _metric_series(metrics, key)
                if not xs:
                    continue
                drawn = True
                label = (g.run if key == "loss" else f"{g.run} (val)") if j == 0 else None
                figs["tokens"][1].plot(
                    [tokens0 + x for x in xs], ys, style, color=color, alpha=0.85, label=label, markersize=3
                )
                figs["flops"][1].plot(
                    [flops0 + x * flops for x in xs], ys, style, color=color, alpha=0.85, label=label, markersize=3
                )
    if not drawn:
        for fig, _ in figs.values():
            plt.close(fig)
        return []
    out = []
    for name, xlabel in (("tokens", "training tokens"), ("flops", "training FLOPs (3 x forward)")):
        fig, ax = figs[name]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"loss vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append(figures.save(fig, plots / f"loss_vs_{name}.png"))
    return out


def plot_bucket_nll(groups: list[Group], plots: Path) -> list[Path]:
    """NLL by position bucket for every run, with 95% interval bars (experiments/sweeps/report_stats.py)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not report_stats.draw_bucket_nll(ax, groups):
        plt.close(fig)
        return []
    return [figures.save(fig, plots / "nll_by_position.png")]


def plot_ppl_vs_length(groups: list[Group], rows: list[dict[str, Any]], plots: Path) -> list[Path]:
    """Perplexity against evaluation length (mean ± std over seeds), with the training length marked."""
    lengths = _lengths(rows, "ppl")
    if not lengths:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        pts = [(n, g.values(f"ppl@{n}")) for n in lengths]
        pts = [(n, v) for n, v in pts if v]
        if not pts:
            continue
        mean = [statistics.fmean(v) for _, v in pts]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
        ax.errorbar([n for n, _ in pts], mean, yerr=std, marker="o", capsize=3, color=f"C{i % 10}", label=g.run)
    figures.ppl_axes(ax, report_stats.train_length(rows))
    return [figures.save(fig, plots / "ppl_vs_length.png")]


def plot_passkey(groups: list[Group], rows: list[dict[str, Any]], plots: Path) -> list[Path]:
    """Passkey accuracy heatmap: runs x lengths, mean over seeds (eval/*.json holds each run's depths x lengths)."""
    lengths = _lengths(rows, "passkey")
    if not lengths:
        return []
    grid = [[g.mean(f"passkey@{n}") for n in lengths] for g in groups]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(groups)))
    image = figures.accuracy_heatmap(ax, grid, [str(n) for n in lengths], [g.run for g in groups])
    ax.set_xlabel("context length (tokens)")
    ax.set_title("passkey retrieval accuracy")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return [figures.save(fig, plots / "passkey_heatmap.png")]


def router_loads(metrics: list[dict[str, Any]]) -> dict[int, tuple[list[float], list[list[float]]]]:
    """Per MoE layer: (tokens seen, each expert's share of the logging window's tokens) at every logged row
    that carries router stats (routing_health.expert_counts) and the tokens seen."""
    out: dict[int, tuple[list[float], list[list[float]]]] = {}
    for m in metrics:
        tokens = number(m.get("tokens"))
        if tokens is None:
            continue
        for layer, counts in routing_health.expert_counts(m).items():
            total = sum(counts) or 1.0
            xs, loads = out.setdefault(layer, ([], []))
            xs.append(tokens)
            loads.append([c / total for c in counts])
    return out


def plot_expert_load(sweep_dir: Path, groups: list[Group], plots: Path) -> list[Path]:
    """For each MoE run (first seed): per-layer heatmaps of the share of tokens each expert got, over training."""
    out = []
    for g in groups:
        row = next((r for r in g.ok if not r.get("source_run_dir")), None)
        if row is None:
            continue
        loads = router_loads(read_metrics(sweep_dir / row["run_dir"]))
        if not loads:
            continue
        layers = sorted(loads)
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.2 + 1.6 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            xs, fractions = loads[layer]
            n_experts = len(fractions[0])
            data = [[f[e] if e < len(f) else math.nan for f in fractions] for e in range(n_experts)]
            im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0.0, extent=(xs[0], xs[-1], n_experts - 0.5, -0.5))
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, fraction=0.03)
        axes[-1, 0].set_xlabel("training tokens")
        axes[0, 0].set_title(f"{g.run}: share of tokens per expert (uniform = {1 / n_experts:.3f})")
        out.append(figures.save(fig, plots / f"expert_load_{re.sub(r'[^A-Za-z0-9_.-]', '_', g.run)}.png"))
    return out


# ---------------------------------------------------------------------------- report
def _per_window(sweep_dir: Path, groups: list[Group]) -> dict[str, dict[str, Any]]:
    """Each single-seed run's per-window evaluation values (`per_window` in its eval/long_context.json),
    for factor effects paired by window; runs without them (older results, several seeds) are left out."""
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        if len(g.ok) != 1:
            continue
        path = sweep_dir / g.ok[0]["run_dir"] / "eval" / "long_context.json"
        try:
            values = json.loads(path.read_text()).get("per_window")
        except (OSError, ValueError):
            continue
        if values:
            out[g.run] = values
    return out


def build_report(sweep_dir: Path) -> Path:
    """Write report.md and plots/*.png for a sweep directory; returns the report path."""
    sweep_dir = Path(sweep_dir)
    rows = load_results(sweep_dir)
    info = _sweep_info(sweep_dir, rows)
    groups = group_rows(rows)
    baseline = _baseline(groups, info.get("baseline"))
    keys = eval_keys(rows)
    per_window = _per_window(sweep_dir, groups)
    plots = sweep_dir / "plots"
    plots.mkdir(exist_ok=True)
    images = plot_loss(sweep_dir, groups, plots)
    images += plot_bucket_nll(groups, plots)
    images += plot_ppl_vs_length(groups, rows, plots)
    images += plot_passkey(groups, rows, plots)
    images += plot_expert_load(sweep_dir, groups, plots)

    n_failed = sum(r.get("status") != "done" for r in rows)
    lines = [f"# Sweep `{info['name']}`", ""]
    if info["description"]:
        lines += [info["description"].strip(), ""]
    lines += [
        f"{len(rows)} runs, {len(groups)} configurations, {n_failed} failed. "
        f"Baseline for the ratio columns: `{baseline.run if baseline else '-'}`. "
        "Values are `mean [95% interval]`: a bootstrap over evaluation sequences and keys for one seed, "
        "a t-interval over seeds for several (experiments/sweeps/report_stats.py). `params` counts all parameters, "
        "`active` those used per token, FLOPs/tok is training FLOPs per token at the training length. "
        "`tail_nll@N` is the mean NLL over positions [N/2, N); `delta_tail_nll@N` its change from the "
        "training length.",
        "",
        *report_stats.headline_lines(groups, baseline, info.get("headline") or (), per_window),
        "## Results",
        "",
        markdown_table(_columns(groups, baseline, keys)) if groups else "(no results yet)",
        "",
    ]
    lines += routing_health.report_lines(rows)  # routing columns explained, collapse warnings
    lines += report_stats.factor_lines(groups, info.get("factors") or {}, per_window)
    lines += report_stats.bucket_lines(groups)
    notes = matching_notes(groups, baseline)
    if notes:
        lines += ["## Dense vs MoE: what is matched", "", *notes, ""]
    failed = [r for r in rows if r.get("status") != "done"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- `{r['run_dir']}`: {r.get('error', 'unknown error')} (see `{r['run_dir']}/error.txt`)" for r in failed
        ]
        lines.append("")
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in images]
        lines.append("")
    path = sweep_dir / "report.md"
    write_text_atomic(path, "\n".join(lines), "the sweep report")  # a failed write keeps the old report
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m llamoe.experiments.sweeps.report SWEEP_DIR`: rebuild report.md and plots, print the summary table."""
    parser = argparse.ArgumentParser(prog="python -m llamoe.experiments.sweeps.report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory holding results.jsonl")
    args = parser.parse_args(argv)
    if not (args.sweep_dir / "results.jsonl").is_file():
        print(f"error: {args.sweep_dir / 'results.jsonl'} does not exist; is this a sweep directory?", file=sys.stderr)
        return 2
    path = build_report(args.sweep_dir)
    rows = load_results(args.sweep_dir)
    print(terminal_table(rows, _sweep_info(args.sweep_dir, rows).get("baseline")))
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

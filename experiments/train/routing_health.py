"""Routing health of an MoE run, from its metrics.jsonl rows: is the router using its experts?

A collapsed router sends most tokens to a few experts, so the "MoE" being compared is close to
a dense model. Three numbers over the tail of training (the last 10% of logged steps) show it:

- `routing_imbalance`: mean logged load imbalance (max/mean tokens per expert, mean over MoE
  layers); 1 is uniform, `num_experts` is every token on one expert.
- `routing_dead_frac`: fraction of experts that received under 10% of their fair share of the
  tail's tokens, per layer, then averaged over layers.
- `routing_entropy`: mean logged router entropy (nats per token; at most ln(num_experts)).

A run is flagged as collapsed when its imbalance exceeds 2.0 or its dead fraction exceeds 0.25.
Training prints the summary at the end of a run, sweeps put it in `results.jsonl` and the
report shows it as columns plus a warning line per collapsed run.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

TAIL_FRACTION = 0.1  # the last 10% of logged steps
DEAD_SHARE = 0.1  # an expert with under 10% of its fair share of tokens counts as dead
IMBALANCE_LIMIT = 2.0
DEAD_FRAC_LIMIT = 0.25
KEYS = ("routing_imbalance", "routing_dead_frac", "routing_entropy")
_HEADERS = {"routing_imbalance": "imbalance", "routing_dead_frac": "dead experts", "routing_entropy": "router H"}


def tail_rows(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MoE rows (those with `load_imbalance`) logged after 90% of the last logged step."""
    moe = [m for m in metrics if isinstance(m.get("load_imbalance"), (int, float)) and "step" in m]
    if not moe:
        return []
    last = max(m["step"] for m in moe)
    return [m for m in moe if m["step"] > (1.0 - TAIL_FRACTION) * last]


def dead_expert_fraction(tokens_per_expert: Sequence[float]) -> float:
    """Fraction of experts with fewer than DEAD_SHARE x (total / num_experts) tokens."""
    total = float(sum(tokens_per_expert))
    fair = total / len(tokens_per_expert)
    return sum(float(n) < DEAD_SHARE * fair for n in tokens_per_expert) / len(tokens_per_expert)


def expert_counts(row: dict[str, Any]) -> dict[int, list[float]]:
    """Tokens per expert by MoE layer id in one metrics row, whose `router` field train.py logs as
    {"<layer>": {"tokens_per_expert": [...], ...}} (counts summed over the row's logging window)."""
    return {
        int(layer): [float(c) for c in stats["tokens_per_expert"]]
        for layer, stats in (row.get("router") or {}).items()
        if stats.get("tokens_per_expert")
    }


def summarize(metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The routing-health KEYS of a run from its metrics rows; empty for a dense run.

    Imbalance and entropy average the logged per-row values over the tail; the dead fraction
    sums each layer's `expert_counts` over the tail rows first.
    """
    tail = tail_rows(metrics)
    if not tail:
        return {}
    out = {"routing_imbalance": statistics.fmean(float(m["load_imbalance"]) for m in tail)}
    per_layer: dict[int, list[float]] = {}
    for m in tail:
        for layer, counts in expert_counts(m).items():
            acc = per_layer.setdefault(layer, [0.0] * len(counts))
            per_layer[layer] = [a + c for a, c in zip(acc, counts)]
    if per_layer:
        out["routing_dead_frac"] = statistics.fmean(dead_expert_fraction(c) for c in per_layer.values())
    entropies = [float(m["router_entropy"]) for m in tail if isinstance(m.get("router_entropy"), (int, float))]
    if entropies:
        out["routing_entropy"] = statistics.fmean(entropies)
    return out


def collapse_reasons(health: dict[str, Any]) -> list[str]:
    """Why a run counts as collapsed (empty when healthy or not MoE)."""
    reasons = []
    imbalance, dead = health.get("routing_imbalance"), health.get("routing_dead_frac")
    if isinstance(imbalance, (int, float)) and imbalance > IMBALANCE_LIMIT:
        reasons.append(f"imbalance {imbalance:.2f} > {IMBALANCE_LIMIT}")
    if isinstance(dead, (int, float)) and dead > DEAD_FRAC_LIMIT:
        reasons.append(f"dead-expert fraction {dead:.2f} > {DEAD_FRAC_LIMIT}")
    return reasons


def describe(health: dict[str, float]) -> str:
    """One log line, e.g. `routing health (last 10% of steps): imbalance 1.31 | dead experts 0.00 | ...`."""
    parts = [f"{_HEADERS[k]} {health[k]:.2f}" for k in KEYS if k in health]
    reasons = collapse_reasons(health)
    verdict = f" | WARNING: router collapse ({'; '.join(reasons)})" if reasons else ""
    return f"routing health (last {TAIL_FRACTION:.0%} of steps): {' | '.join(parts)}{verdict}"


def table_columns(runs: Sequence[Sequence[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """Report columns (header, cells): per group of results rows (the seeds of one run), the mean of
    each routing-health key; "-" for dense runs. No columns when no run is MoE."""
    cols = []
    for key in KEYS:
        cells = [_mean_cell([r.get(key) for r in rows]) for rows in runs]
        if any(c != "-" for c in cells):
            cols.append((_HEADERS[key], cells))
    return cols


def _mean_cell(values: Sequence[Any]) -> str:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return f"{statistics.fmean(nums):.2f}" if nums else "-"


def warning_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One Markdown warning line per results row whose routing collapsed."""
    lines = []
    for r in rows:
        reasons = collapse_reasons(r)
        if reasons:
            seed = f" (seed {r['seed']})" if r.get("seed") is not None else ""
            lines.append(
                f"- **WARNING: router collapse in `{r.get('run', '?')}`{seed}**: {'; '.join(reasons)} "
                f"over the last {TAIL_FRACTION:.0%} of training steps; its MoE comparison is not meaningful."
            )
    return lines


def report_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """report.md's routing-health section: what the columns mean, then the collapse warnings;
    empty when no run is MoE."""
    if not any(k in r for r in rows for k in KEYS):
        return []
    legend = (
        f"`imbalance`: mean max/mean tokens per expert over the last {TAIL_FRACTION:.0%} of training steps "
        f"(1 = uniform); `dead experts`: fraction of experts with under {DEAD_SHARE:.0%} of their fair share "
        "there; `router H`: mean router entropy (nats per token). A run is flagged when imbalance > "
        f"{IMBALANCE_LIMIT} or dead experts > {DEAD_FRAC_LIMIT}."
    )
    warnings = warning_lines([r for r in rows if r.get("status", "done") == "done"])
    return ["## Routing health", "", legend, "", *(warnings or ["No MoE run shows router collapse."]), ""]

"""Eval-time attention temperature: settings, applying one to a model, sweep grids, calibration.

Llama 4 scales NoPE-layer queries by s(p) = 1 + attn_scale·ln(1 + ⌊(p+1)/floor_scale⌋)
(shared/REFERENCE.md). The scaling belongs to the attention computation, not to the weights,
so evaluation can switch it on or off or re-parameterise it without retraining
(`Transformer.set_attention`). `calibrate` picks the setting that scores best on held-out data
kept apart from the evaluation data: what a researcher would tune instead of guessing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from llamoe.models.transformer import Transformer


@dataclass(frozen=True)
class TemperatureSetting:
    """One choice of NoPE query temperature; attn_scale 0 or tuning off leave attention unchanged."""

    temperature_tuning: bool
    floor_scale: float
    attn_scale: float

    @property
    def label(self) -> str:
        """Short name used in result keys: "off" or "fs<floor_scale>_as<attn_scale>"."""
        if not self.temperature_tuning:
            return "off"
        return f"fs{self.floor_scale:g}_as{self.attn_scale:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "temperature_tuning": self.temperature_tuning,
            "floor_scale": self.floor_scale,
            "attn_scale": self.attn_scale,
        }

    @classmethod
    def of(cls, model: Transformer) -> TemperatureSetting:
        """The setting the model uses now (its eval-time state, not necessarily `model.cfg`)."""
        att = model.attention_settings
        return cls(bool(att.temperature_tuning), float(att.floor_scale), float(att.attn_scale))

    def switched(self, on: bool) -> TemperatureSetting:
        """The same floor_scale and attn_scale with tuning on or off."""
        return TemperatureSetting(on, self.floor_scale, self.attn_scale)


@contextmanager
def applied(model: Transformer, setting: TemperatureSetting) -> Iterator[None]:
    """Run the block with `setting` on every layer, then restore the model's previous setting."""
    before = TemperatureSetting.of(model)
    model.set_attention(
        temperature_tuning=setting.temperature_tuning, floor_scale=setting.floor_scale, attn_scale=setting.attn_scale
    )
    try:
        yield
    finally:
        model.set_attention(
            temperature_tuning=before.temperature_tuning, floor_scale=before.floor_scale, attn_scale=before.attn_scale
        )


def grid(floor_scales: Sequence[float], attn_scales: Sequence[float]) -> list[TemperatureSetting]:
    """Every (floor_scale, attn_scale) pair with tuning on, floor_scale-major."""
    return [TemperatureSetting(True, float(f), float(a)) for f in floor_scales for a in attn_scales]


def calibrate(
    model: Transformer,
    candidates: Sequence[TemperatureSetting],
    score: Callable[[], float],
    *,
    maximize: bool,
) -> dict[str, Any]:
    """Score each candidate (score() runs with it applied) and pick the best; ties go to the earlier one.

    A NaN score counts as the worst. Returns {"best": TemperatureSetting, "scores": [setting dict +
    "score", ...], "maximize": bool}.
    """
    if not candidates:
        raise ValueError("calibrate needs at least one candidate setting")
    rows = []
    for candidate in candidates:
        with applied(model, candidate):
            rows.append(dict(candidate.to_dict(), score=float(score())))
    worst = float("-inf") if maximize else float("inf")
    values = [worst if math.isnan(r["score"]) else r["score"] for r in rows]
    best = values.index(max(values) if maximize else min(values))
    return {"best": candidates[best], "scores": rows, "maximize": maximize}

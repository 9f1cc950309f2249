"""`init_from`: start a fresh run from existing weights, with architecture surgery where the models differ.

`init_from: PATH` takes a run directory, a checkpoint (a `checkpoints/step_N` directory or its
model.pt, or a `llamoe convert` file) or a local Hugging Face directory (experiments/train/model_source.py).
Only weights travel: the optimizer, the learning-rate schedule, the data position and the step start
fresh. A run that resumes from its own checkpoint ignores init_from (and no longer needs the source).

- Config time (`check`, called by experiments/config.py's validation): the source's config is read,
  never its weights, and the mapping is planned (models/surgery.py), so a tensor that cannot be made
  fails before training, exit 2, naming the tensor.
- Run start (`load`, called by experiments/train/loop.py on a fresh run): the model was built with its own
  init; the plan's copied and transformed tensors overwrite it one at a time from the lazily read
  source, and the summary says which tensors were copied, transformed or freshly initialised.

The `upcycle` section chooses how a dense FFN becomes an MoE layer (models/surgery.py): `experts: copy`
(every expert is the dense FFN) or `partition` (experts split its hidden units), and `noise`.
"""

from __future__ import annotations

import re

from llamoe.experiments.config import RunConfig
from llamoe.experiments.errors import UserError
from llamoe.experiments.train.checkpoint import latest_checkpoint
from llamoe.experiments.train.model_source import ModelSource, open_source
from llamoe.models import surgery
from llamoe.models.config import ConfigError
from llamoe.models.transformer import Transformer

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def plan_for(cfg: RunConfig) -> tuple[ModelSource, surgery.Plan]:
    """The source `cfg.init_from` names and the plan mapping it onto `cfg.model`; ConfigError naming the problem."""
    assert cfg.init_from
    try:
        source = open_source(cfg.init_from)
    except UserError as e:  # no such path, no checkpoint, an unreadable one
        raise ConfigError("init_from", str(e)) from None
    except ConfigError as e:
        raise ConfigError("init_from", f"{cfg.init_from}: {e}") from None
    return source, surgery.plan(source.model, cfg.model, cfg.upcycle.experts)


def check(cfg: RunConfig) -> None:
    """Plan `cfg.init_from` onto the run's model without reading weights (nothing to do for a run that resumes)."""
    if cfg.init_from and latest_checkpoint(cfg.run_dir) is None:
        plan_for(cfg)


def load(model: Transformer, cfg: RunConfig) -> str:
    """Fill the freshly built `model` (this rank's share of it) from `cfg.init_from`; returns the summary."""
    source, plan = plan_for(cfg)
    surgery.apply(plan, source.weights(), model, noise=cfg.upcycle.noise, seed=cfg.train.seed)
    return summary(source, plan, cfg.upcycle.noise)


def _compact(names: list[str]) -> list[str]:
    """Names with the layer index folded: layers.0.x, layers.1.x -> layers.[0-1].x (first appearance order)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = _LAYER.match(name)
        key = f"layers.{{}}.{match.group(2)}" if match else name
        groups.setdefault(key, []).append(int(match.group(1)) if match else -1)
    out = []
    for key, layers in groups.items():
        if "{}" not in key:
            out.append(key)
            continue
        span = (
            f"{layers[0]}-{layers[-1]}"
            if layers == list(range(layers[0], layers[-1] + 1))
            else ",".join(map(str, layers))
        )
        out.append(key.format(f"[{span}]" if len(layers) > 1 else layers[0]))
    return out


def summary(source: ModelSource, plan: surgery.Plan, noise: float) -> str:
    """Which tensors were copied, transformed (and from what) or freshly initialised, and what changed without weights."""
    copied, fresh = plan.names(surgery.COPY), plan.names(surgery.INIT)
    moved = [s for s in plan.steps if s.action == surgery.TRANSFORM]
    lines = [
        f"init_from {source.describe()}: {len(copied)} tensors copied, {len(moved)} transformed, "
        f"{len(fresh)} freshly initialised"
    ]
    lines += [f"  changed without weights: {note}" for note in plan.notes]
    lines.append(f"  copied: {', '.join(_compact(copied)) or '-'}")
    if moved:
        sources = _compact(list(dict.fromkeys(s.source for s in moved if s.source is not None)))
        halved = ", w2 halved beside the shared expert" if any(s.cut and s.cut.scale != 1.0 for s in moved) else ""
        lines.append(
            f"  transformed ({plan.upcycle} upcycling{halved}, noise {noise}): "
            f"{', '.join(_compact([s.target for s in moved]))} <- {', '.join(sources)}"
        )
    lines.append(f"  freshly initialised: {', '.join(_compact(fresh)) or '-'}")
    return "\n".join(lines)


__all__ = ["check", "load", "plan_for", "summary"]

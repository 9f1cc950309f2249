"""Architecture surgery: one model's weights mapped onto another architecture (upcycling, RoPE -> iRoPE).

Pure tensor mapping between two ModelConfigs; reading sources and printing the plan is
experiments/train/init_from.py's job. `plan(source, target, upcycle)` decides, for every tensor of the
target model, one step:

    copy       the source tensor of the same name and shape (embeddings, attention, norms, head, a dense
               FFN into a dense layer, an MoE layer into an MoE layer of the same sizes)
    transform  cut from a dense FFN matrix of the source (dense -> MoE upcycling, below)
    init       freshly initialised: the router of an upcycled layer, and the aux-loss-free balancing
               buffers (balancing state, not weights)

and fails with ConfigError("init_from", ...) naming the first tensor that cannot be made: a shape
that differs, an MoE layer where the target has a dense one, a tied target head from an untied
source, or a source tensor the target has no place for (fewer layers). `apply(plan, weights, model)`
then fills a model built with its fresh init (models/build.py), one tensor at a time.

Dense -> MoE upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling"). A dense SwiGLU is a sum over
its F hidden units: ffn(x) = sum_h w2[:, h] silu(w1[h]·x) (w3[h]·x). Each expert is cut from it:
- "copy": every routed expert is the whole dense FFN (needs moe.expert_hidden_dim == F). With a shared
  expert (hidden F too) it is a copy as well, and the output projection w2 of every copy is halved.
  Guarantee (noise 0): every expert computes ffn(x) (halved with a shared expert), so for every token
  whose routed gates g_e sum to 1 with the gate on the output (moe.score_on=output, e.g. softmax with
  renormalize and moe.top_k >= 2; top-1 renormalised is refused: its router gets no gradient) the MoE
  layer outputs exactly ffn(x): sum_e g_e ffn(x) (+ the shared half).
- "partition" (fine-grained upcycling): the hidden units are split, the shared expert taking units
  [0, S) and routed expert e units [S + e·Fe, S + (e+1)·Fe) (S the shared hidden size, Fe
  moe.expert_hidden_dim); needs S + E·Fe == F. Guarantee: with every expert active (top_k = E) and
  every gate exactly 1, the MoE layer outputs ffn(x): the same sum over hidden units, regrouped.
- `noise` > 0 adds independent Gaussian noise of std noise × std(weight) to every routed expert's
  w1, w3 and w2 (seeded by `seed`, the layer and the expert, so an expert-parallel shard gets its slice
  of the same experts); the guarantees hold at noise 0 only. The shared expert gets no noise.
- The router starts fresh (its init), so the gates are whatever it computes: the guarantees say what
  the experts hold, not that training starts from the dense model's loss.

RoPE -> iRoPE conversion needs no tensor changes: the NoPE/chunk schedule, QK-norm (weightless) and
attention temperature are attention settings, taken from the target config; RoPE theta and scaling
too. Every tensor is copied unchanged, so what the converted model computes differs from the source
only where those settings act: given the same input, a RoPE layer without QK-norm computes exactly
what it computed before on any sequence of at most chunk_size tokens (the chunked mask is the causal
mask inside the first chunk); NoPE layers drop the rotation; QK-norm rescales q and k; the temperature
multiplies NoPE queries by 1 + attn_scale·ln(1 + floor((p+1)/floor_scale)), which is 1 for positions
p < floor_scale - 1. `plan` lists these setting differences as notes.

Shapes: D model dim, F dense FFN hidden, E routed experts, Fe expert hidden, S shared-expert hidden.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from typing import Mapping, Optional

import torch

from llamoe.models.config import ConfigError, ModelConfig
from llamoe.models.transformer import Transformer
from llamoe.moe.experts.base import Experts

COPY, TRANSFORM, INIT = "copy", "transform", "init"
UPCYCLE_MODES = ("copy", "partition")
_BALANCING_BUFFERS = ("router.expert_bias", "router.expert_load")
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class Cut:
    """How one expert tensor is cut from the dense FFN matrix `matrix` (w1 | w3 | w2) of its layer."""

    matrix: str
    ranges: tuple[tuple[int, int], ...]  # hidden units [a, b) per routed expert, or one range for the shared expert
    routed: bool  # experts layout [E, D, Fe] / [E, Fe, D] (transposed) or the shared FeedForward's [S, D] / [D, S]
    scale: float = 1.0  # on w2 (copy upcycling with a shared expert halves every copy)


@dataclass(frozen=True)
class Step:
    """What one target tensor is made of."""

    target: str
    action: str  # copy | transform | init
    source: Optional[str] = None
    cut: Optional[Cut] = None


@dataclass(frozen=True)
class Plan:
    """Every target tensor's step, in the target's state-dict order, plus what changes without weights."""

    steps: tuple[Step, ...]
    notes: tuple[str, ...]  # settings that differ without any weight changing (RoPE -> iRoPE)
    upcycle: str

    def names(self, action: str) -> list[str]:
        return [s.target for s in self.steps if s.action == action]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of `Transformer(cfg)`, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _fail(tensor: str, why: str) -> ConfigError:
    return ConfigError("init_from", f"cannot map {tensor}: {why}")


def _upcycle_cuts(layer: int, source: ModelConfig, target: ModelConfig, mode: str) -> dict[str, Cut]:
    """The expert tensors of target layer `layer` (relative names) and how each is cut from the dense FFN."""
    moe = target.moe
    assert moe is not None
    f, e, fe, s = source.ffn_hidden, moe.num_experts, moe.expert_hidden_dim, moe.shared_expert_hidden
    name = f"layers.{layer}.feed_forward.experts.w1"
    if mode == "copy":
        if fe != f:
            raise _fail(name, f"copy upcycling needs model.moe.expert_hidden_dim == the dense FFN hidden {f}, got {fe}")
        if s not in (0, f):
            raise _fail(
                f"layers.{layer}.feed_forward.shared_expert.w1.weight",
                f"copy upcycling needs the shared expert's hidden size == {f} (or no shared expert), got {s}",
            )
        routed, shared, scale = ((0, f),) * e, (0, f), 0.5 if s else 1.0
    else:
        if s + e * fe != f:
            raise _fail(
                name,
                f"partition upcycling splits the dense FFN's {f} hidden units into the shared expert ({s}) and "
                f"{e} experts of {fe}: {s} + {e} x {fe} = {s + e * fe} != {f}; choose sizes that add up to {f}",
            )
        routed, shared, scale = tuple((s + i * fe, s + (i + 1) * fe) for i in range(e)), (0, s), 1.0
    cuts = {f"experts.{m}": Cut(m, routed, True, scale if m == "w2" else 1.0) for m in ("w1", "w3", "w2")}
    if s:
        cuts.update(
            {
                f"shared_expert.{m}.weight": Cut(m, (shared,), False, scale if m == "w2" else 1.0)
                for m in ("w1", "w3", "w2")
            }
        )
    return cuts


def _attention_notes(source: ModelConfig, target: ModelConfig) -> list[str]:
    """The attention and RoPE settings that change without touching a weight (RoPE -> iRoPE conversion)."""
    notes = []
    for section in ("attention", "rope"):
        a, b = getattr(source, section), getattr(target, section)
        for field in fields(a):
            if field.name != "backend" and getattr(a, field.name) != getattr(b, field.name):
                notes.append(f"{section}.{field.name}: {getattr(a, field.name)} -> {getattr(b, field.name)}")
    return notes


def _layer(key: str) -> Optional[int]:
    match = _LAYER.match(key)
    return int(match.group(1)) if match else None


def _no_place(key: str, cfg: ModelConfig, what: str) -> str:
    layers = f" ({what} has {cfg.n_layers} layers)" if key.startswith("layers.") else ""
    return f"the {what} has no such tensor{layers}"


def plan(source: ModelConfig, target: ModelConfig, upcycle: str = "copy") -> Plan:
    """How to make every tensor of `target` from a model of config `source` (see the module docstring);
    ConfigError("init_from", ...) naming the first tensor that cannot be made."""
    if upcycle not in UPCYCLE_MODES:
        raise ConfigError("upcycle.experts", f"must be one of {'|'.join(UPCYCLE_MODES)}, got {upcycle!r}")
    if target.tie_embeddings and not source.tie_embeddings:
        raise _fail("output.weight", "the target ties its head to the embedding, the source has its own head; "
                    "set model.tie_embeddings=false")  # fmt: skip
    have, want = _shapes(source), _shapes(target)
    upcycled = [i for i in range(min(source.n_layers, target.n_layers)) if target.is_moe(i) and not source.is_moe(i)]
    cuts: dict[str, Cut] = {}
    for i in upcycled:
        cuts.update(
            {f"layers.{i}.feed_forward.{k}": cut for k, cut in _upcycle_cuts(i, source, target, upcycle).items()}
        )
    steps, used = [], set()
    for key, shape in want.items():
        layer = _layer(key)
        if key.endswith(_BALANCING_BUFFERS) or (layer in upcycled and key.endswith(".feed_forward.router.gate.weight")):
            steps.append(Step(key, INIT))
        elif key in cuts:
            dense = f"layers.{layer}.feed_forward.{cuts[key].matrix}.weight"
            steps.append(Step(key, TRANSFORM, dense, cuts[key]))
            used.add(dense)
        elif key in have and have[key] == shape:
            steps.append(Step(key, COPY, key))
            used.add(key)
        elif key in have:
            raise _fail(key, f"the source has shape {list(have[key])}, the target {list(shape)}")
        elif layer is not None and layer < source.n_layers and source.is_moe(layer) and not target.is_moe(layer):
            raise _fail(key, f"layer {layer} is an MoE layer in the source and dense in the target; experts do not "
                        "merge back into a dense FFN")  # fmt: skip
        else:
            raise _fail(key, _no_place(key, source, "source"))
    unused = [k for k in have if k not in used and not k.endswith(_BALANCING_BUFFERS)]
    if unused:
        raise _fail(unused[0], f"it is in the source but {_no_place(unused[0], target, 'target')}")
    return Plan(tuple(steps), tuple(_attention_notes(source, target)), upcycle)


def _generator(seed: int, target: str, expert: int) -> torch.Generator:
    digest = hashlib.sha1(f"{seed}:{target}:{expert}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def cut_expert(dense: torch.Tensor, cut: Cut, index: int) -> torch.Tensor:
    """Expert `index`'s (or the shared expert's, index 0) tensor cut from a dense matrix (w1/w3 [F, D], w2 [D, F])."""
    a, b = cut.ranges[index]
    part = dense[a:b] if cut.matrix != "w2" else dense[:, a:b]  # [Fe, D] or [D, Fe]
    if cut.routed:
        part = part.t()  # experts hold [D, Fe] (w1, w3) and [Fe, D] (w2)
    return part * cut.scale if cut.scale != 1.0 else part


@torch.no_grad()
def apply(
    plan: Plan, weights: Mapping[str, torch.Tensor], model: Transformer, *, noise: float = 0.0, seed: int = 0
) -> None:
    """Fill `model` (built with its fresh init, possibly an expert-parallel shard) from the source `weights`
    by `plan`, one tensor at a time; `init` steps keep the model's own init."""
    targets = model.state_dict(keep_vars=True)
    experts = {f"{p}.{n}": m for p, m in model.named_modules() if isinstance(m, Experts) for n in ("w1", "w3", "w2")}
    for step in plan.steps:
        if step.action == INIT:
            continue
        target, value = targets[step.target], weights[step.source]
        module = experts.get(step.target)
        if step.action == COPY:
            if module is not None and value.size(0) != target.size(0):  # this rank's experts of the whole layer
                value = value[module.first_expert : module.first_expert + module.num_experts]
            if value.shape != target.shape:
                raise _fail(
                    step.target, f"the source file holds {list(value.shape)}, its config says {list(target.shape)}"
                )
            target.copy_(value)
            continue
        assert step.cut is not None
        if module is None:  # the shared expert
            target.copy_(cut_expert(value, step.cut, 0))
            continue
        for local, index in enumerate(range(module.first_expert, module.first_expert + module.num_experts)):
            part = cut_expert(value, step.cut, index).float()
            if noise > 0:
                gen = _generator(seed, step.target, index)
                part = part + noise * part.std() * torch.randn(part.shape, generator=gen)
            target[local].copy_(part)


__all__ = ["COPY", "INIT", "TRANSFORM", "UPCYCLE_MODES", "Cut", "Plan", "Step", "apply", "cut_expert", "plan"]

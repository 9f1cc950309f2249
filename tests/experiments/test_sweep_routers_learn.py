"""The routers of every built-in sweep and MoE preset learn from the LM loss; `llamoe train` refuses one that cannot.

Each distinct MoE layout of a sweep's runs (the routing switches as the sweep resolves them) is put on a
tiny backbone and trained a few steps on the LM loss alone (no aux loss): the router's gradient must
stay above REL_GRAD. The broken layout (top-1 renormalised, the gate exactly 1) measured ~1e-9.
"""

import functools
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from llamoe.experiments.cli import main as llamoe
from llamoe.experiments.config import load_run_config
from llamoe.experiments.sweeps.spec import PlannedRun, builtin_sweeps, expand, load_sweep
from llamoe.models import presets
from llamoe.models.build import build_model
from llamoe.models.config import ModelConfig
from llamoe.models.surgery import apply, plan
from llamoe.models.transformer import Transformer
from llamoe.moe.config import MoEConfig
from llamoe.moe.layer import MoE

REL_GRAD = 1e-4  # |dL/dW| / |W| of the routers; learning layouts measure 1e-3..3e-2
STEPS = 3
BASE_YAML = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "base.yaml"
TINY_DENSE = replace(presets.get("llama3.1-tiny"), dim=64, n_heads=4, n_kv_heads=2, n_layers=2, multiple_of=16)


def tiny(moe: MoEConfig, expert_hidden_dim: int = 32) -> ModelConfig:
    """The tiny dense backbone with `moe`'s routing on both layers, every expert `expert_hidden_dim` wide."""
    shared = expert_hidden_dim if moe.num_shared_experts > 0 else None
    moe = replace(moe, expert_hidden_dim=expert_hidden_dim, shared_expert_hidden_dim=shared, interleave_step=1)
    return replace(TINY_DENSE, moe=moe)


def router_rel_grads(model: Transformer, optimizer: torch.optim.Optimizer) -> list[float]:
    """Train STEPS steps on the LM loss alone; the routers' relative gradient norm at each step."""
    data = torch.Generator().manual_seed(0)
    routers = [m.router.gate.weight for m in model.modules() if isinstance(m, MoE)]
    assert routers
    rel = []
    for _ in range(STEPS):
        tokens = torch.randint(0, TINY_DENSE.vocab_size, (4, 33), generator=data)
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        rel.append((torch.stack([w.grad.norm() for w in routers]).norm() / torch.stack(routers).norm()).item())
        optimizer.step()
    return rel


@functools.lru_cache(maxsize=None)
def scratch_rel_grads(moe: MoEConfig) -> list[float]:
    model = build_model(tiny(moe), seed=0)
    return router_rel_grads(model, torch.optim.SGD(model.parameters(), lr=0.1))


@functools.lru_cache(maxsize=None)
def upcycled_rel_grads(moe: MoEConfig) -> list[float]:
    """Copy-upcycled from a tiny dense model, trained with AdamW at the sweeps' lr."""
    target = tiny(moe, expert_hidden_dim=TINY_DENSE.ffn_hidden)
    model = build_model(target, seed=0)
    apply(plan(TINY_DENSE, target, "copy"), build_model(TINY_DENSE, seed=1).state_dict(), model)
    return router_rel_grads(model, torch.optim.AdamW(model.parameters(), lr=3e-3))


def moe_runs(sweep: str) -> list[tuple[PlannedRun, MoEConfig, Optional[str]]]:
    """(run, its MoE config, its upcycling mode if it starts from another run) for every trained MoE run."""
    runs = []
    for run in expand(load_sweep(sweep)):
        if run.reuse is None:
            cfg = load_run_config(run.base, run.overrides)
            if cfg.model.moe is not None:
                runs.append((run, cfg.model.moe, cfg.upcycle.experts if run.init_from else None))
    return runs


@pytest.mark.parametrize("sweep", builtin_sweeps())
def test_every_builtin_sweeps_routers_learn_from_the_lm_loss(sweep: str) -> None:
    for run, moe, upcycle in moe_runs(sweep):
        if upcycle is None:
            rel = scratch_rel_grads(moe)
        else:  # identical copies can give 0 at step 0 (top-2 renormalised: the gates sum to 1); then they diverge
            assert upcycle == "copy", f"{sweep}/{run.name}: this test shrinks copy upcycling only"
            rel = upcycled_rel_grads(moe)[1:]
        assert min(rel) > REL_GRAD, f"{sweep}/{run.name}: router gradient {rel} from the LM loss"


@pytest.mark.parametrize("preset", [n for n in presets.names() if presets.get(n).moe is not None])
def test_every_moe_presets_routers_learn_from_the_lm_loss(preset: str) -> None:
    """Llama 4's top-1 sigmoid gate on the input is the router's score itself, so it passes the gradient."""
    moe = presets.get(preset).moe
    assert moe is not None
    assert min(scratch_rel_grads(moe)) > REL_GRAD


def test_train_refuses_a_router_without_gradient_naming_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["model=llama4-tiny", "model.moe.top_k=1", "model.moe.renormalize=true", f"run_dir={tmp_path / 'run'}"]
    assert llamoe(["train", str(BASE_YAML), *args]) == 2
    err = capsys.readouterr().err
    assert "invalid config: model.moe.renormalize:" in err and "Traceback" not in err
    assert "moe.top_k=1" in err and "no gradient" in err
    assert "moe.renormalize=false" in err and "moe.top_k>=2" in err  # the fix
    assert not (tmp_path / "run").exists()

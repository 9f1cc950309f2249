"""Run by test_plan.py under DeepSpeed's launcher: what each rank really allocates for a training layout.

Usage: plan_worker.py PLAN.json OUT_DIR. The plan is a list of runs, each a list of key=value run-config
overrides. For each, the worker builds the model, optimizer and DeepSpeed engine the way
experiments/train/loop.py does, runs one forward, backward and optimizer step on random tokens, and writes
OUT_DIR/<run>_rank<rank>.json with element counts of the tensors it finds:

- params: the rank's model parameters;
- peak_grads: the most parameter gradients alive at once during backward (summed over the parameters
  each time one of them accumulates a gradient, and once more after backward);
- partition: the ZeRO gradient partition DeepSpeed keeps after backward (stages 1-2);
- masters: the optimizer's own parameters that are not model parameters (ZeRO's flat fp32 partitions);
- moments: the optimizer's state tensors (AdamW's exp_avg and exp_avg_sq; the scalar step counters
  are left out);
- buckets: DeepSpeed's gradient reduce-bucket buffers (the most seen at a gradient accumulation; they are
  released at the end of backward).
"""

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F

from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.distributed import DeepSpeedStepper, init_world, mark_expert_params
from llamoe.experiments.train.optim import build_optimizer
from llamoe.models.build import build_model


def numel(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() for t in tensors if t is not None)


def nested(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) list or dict of tensors."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in nested(item)]


def measure(overrides: list[str]) -> dict[str, int]:
    cfg = load_run_config(None, overrides, world_size=2)
    world = init_world(cfg)
    model = build_model(cfg.model, seed=0, ep_rank=world.ep_rank, ep_size=world.ep_size, ep_group=world.ep_group)
    mark_expert_params(model, world)
    optimizer = build_optimizer(model, cfg, world)
    stepper = DeepSpeedStepper(model, optimizer, cfg, world)
    params = list(model.parameters())
    zero = stepper.engine.optimizer  # DeepSpeed's ZeRO optimizer at stages 1-2, the AdamW itself at 0
    peak = {"grads": 0, "buckets": 0}

    def track(_: torch.Tensor) -> None:
        peak["grads"] = max(peak["grads"], numel(p.grad for p in params))
        buckets = numel(t for b in getattr(zero, "ipg_buckets", {}).values() for t in b.buffer)
        peak["buckets"] = max(peak["buckets"], buckets)  # allocated for the backward only

    hooks = [p.register_post_accumulate_grad_hook(track) for p in params]
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch(world.size), cfg.train.seq_len + 1))
    out = stepper.forward(tokens[:, :-1])
    stepper.backward(F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss)
    track(tokens)
    for hook in hooks:
        hook.remove()
    result = {
        "rank": world.rank,
        "params": numel(params),
        "peak_grads": peak["grads"],
        "partition": numel(nested(getattr(zero, "averaged_gradients", []))),
        "buckets": peak["buckets"],
    }
    stepper.step()
    model_params = {id(p) for p in params}
    result["masters"] = numel(p for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params)
    result["moments"] = numel(t for s in optimizer.state.values() for t in s.values() if t.ndim > 0)
    return result


def main(plan_path: str, out_dir: str) -> int:
    for i, overrides in enumerate(json.loads(Path(plan_path).read_text())):
        result = measure(overrides)
        Path(out_dir, f"{i}_rank{result['rank']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

"""No host sync in an MoE forward + backward on the grouped_mm path (counted as CUDA would pay them)."""

import dataclasses

import pytest
import torch

from benchmarks.host_syncs import HostSyncs, moe_layer_syncs
from llamoe.models import presets
from llamoe.models.transformer import Transformer


def test_the_counter_sees_each_kind_of_sync() -> None:
    x = torch.arange(6)
    cases = [
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: bool(x[0] > 0),
        lambda: x[x > 2],
        lambda: x.nonzero(),
        lambda: torch.repeat_interleave(x, x),
    ]
    for case in cases:
        with HostSyncs() as syncs:
            case()
        assert syncs.count == 1
    with HostSyncs() as syncs:  # the same work, sized on the host: nothing to count
        x[torch.tensor([1, 2])]
        torch.repeat_interleave(x, x, output_size=15)
    assert syncs.count == 0


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_mm_layer_forward_and_backward_never_sync(capacity_factor: float | None, bf16: bool) -> None:
    assert moe_layer_syncs("grouped_mm", capacity_factor, bf16).calls == []


def test_torch_reference_syncs_once_per_forward() -> None:
    assert moe_layer_syncs("torch", 1.0).calls == ["tolist"]  # the group sizes for its per-expert loop


def test_model_training_step_with_recompute_never_syncs() -> None:
    cfg = presets.get("llama4-tiny")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend="grouped_mm", capacity_factor=1.25))
    model = Transformer(cfg)
    model.set_activation_checkpointing("full")
    tokens = torch.randint(0, cfg.vocab_size, (2, 96))
    with HostSyncs() as syncs:
        out = model(tokens)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    assert syncs.calls == []

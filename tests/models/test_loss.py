"""The chunked cross-entropy (models/loss.py) equals F.cross_entropy, and never holds [N, V] logits."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from llamoe.models import presets
from llamoe.models.loss import IGNORE_INDEX, chunk_positions, chunked_cross_entropy, lm_cross_entropy
from llamoe.models.transformer import ModelOutput, Transformer

N, D, V = 37, 12, 50


def problem(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    hidden = torch.randn(N, D, dtype=dtype, requires_grad=True)
    head = nn.Linear(D, V, bias=False, dtype=dtype)
    targets = torch.randint(0, V, (N,))
    targets[::3] = IGNORE_INDEX  # task batches train on their answers only
    return hidden, head, targets


@pytest.mark.parametrize("chunk_logits", [V, 4 * V, 10 * V, 100 * V])  # 1, 4, 10 positions a chunk, or all
def test_loss_and_gradients_equal_plain_cross_entropy(chunk_logits: int) -> None:
    hidden, head, targets = problem(torch.float64)
    ref = F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX)
    grads_ref = torch.autograd.grad(ref, (hidden, head.weight))
    got = chunked_cross_entropy(hidden, head, targets, V, chunk_logits=chunk_logits)
    grads = torch.autograd.grad(got, (hidden, head.weight))
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-15)


def test_fp32_loss_and_gradients_equal_plain_cross_entropy() -> None:
    hidden, head, targets = problem()
    ref = F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX)
    grads_ref = torch.autograd.grad(ref, (hidden, head.weight))
    got = chunked_cross_entropy(hidden, head, targets, V, chunk_logits=4 * V)
    grads = torch.autograd.grad(got, (hidden, head.weight))
    torch.testing.assert_close(got, ref)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_every_target_ignored_is_nan_like_cross_entropy() -> None:
    hidden, head, targets = problem()
    targets.fill_(IGNORE_INDEX)
    assert F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX).isnan()
    assert chunked_cross_entropy(hidden, head, targets, V, chunk_logits=4 * V).isnan()


class LargestLogits(TorchDispatchMode):
    """The most rows of any [rows, V] tensor an op produces; [D, V] (the head's weight and its
    gradient, transposed) aside."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == V and t.shape[0] != D:
                self.rows = max(self.rows, t.shape[0])
        return out


def test_no_op_ever_produces_more_than_one_chunk_of_logits() -> None:
    hidden, head, targets = problem()
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with LargestLogits() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_cross_entropy(hidden, head, targets, V, chunk_logits=4 * V)
        loss.backward()
    assert largest.rows == chunk_positions(V, 4 * V) == 4
    assert not [s for s in saved if len(s) == 2 and s[-1] == V]  # the forward keeps no logits for the backward
    with LargestLogits() as plain:
        F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX).backward()
    assert plain.rows == N


@pytest.mark.parametrize("bf16", [False, True])
def test_model_loss_equals_plain_loss_over_its_logits(bf16: bool) -> None:
    torch.manual_seed(0)
    model = Transformer(presets.get("llama4-tiny"))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    targets = torch.randint(0, model.cfg.vocab_size, (2, 40))
    targets[:, :7] = IGNORE_INDEX

    def loss_and_grads(chunked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(tokens)
        if chunked:
            loss = lm_cross_entropy(out, targets)
        else:
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    ref, grads_ref = loss_and_grads(chunked=False)
    got, grads = loss_and_grads(chunked=True)
    torch.testing.assert_close(got, ref)  # one chunk here (320-token vocabulary): the same products
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_logits_are_computed_on_first_read_under_the_forward_autocast() -> None:
    model = Transformer(presets.get("llama3.1-tiny"))
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
        expected = model.output(out.hidden)
    assert out.logits.dtype == torch.bfloat16  # read outside the autocast region
    assert torch.equal(out.logits, expected) and out.logits is out.logits


def test_an_output_built_from_logits_is_chunked_over_them() -> None:
    logits = torch.randn(2, 9, V, requires_grad=True)
    targets = torch.randint(0, V, (2, 9))
    out = ModelOutput(logits=logits, aux_loss=torch.zeros(()))
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(lm_cross_entropy(out, targets), ref)

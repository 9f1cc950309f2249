"""Next-token cross-entropy in bounded memory: the output head and the loss, applied chunk by chunk.

Shapes: N = B·L positions, D model dim, V vocab, C positions per chunk.

The plain loss, `F.cross_entropy(logits.float(), ...)` over [N, V] logits, holds the bf16 logits,
their fp32 copy, the fp32 log-softmax and, in the backward, two fp32 [N, V] gradients: 22 GB at
Llama 4's 202,048-token vocabulary and 8K positions. Here each chunk of C positions runs the head
(under the forward's autocast state), the fp32 cross-entropy and its sum, inside an activation
checkpoint: the forward keeps only the chunk's hidden states (views of the model's output), and the
backward recomputes one chunk's logits at a time. So at most one chunk's [C, V] tensors exist, C
chosen so that a chunk's logits have about `chunk_logits` elements (2^25: 128 MiB in fp32, so about
half a GiB of working set whatever the vocabulary). The cost is the head's forward a second time.

The result is the mean over the positions whose target is not `ignore_index`, as F.cross_entropy's
(NaN when there are none), equal to it up to fp32 summation order (tests/models/test_loss.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llamoe.models.transformer import ModelOutput

IGNORE_INDEX = -100  # F.cross_entropy's default
CHUNK_LOGITS = 2**25  # elements of one chunk's logits


def chunk_positions(vocab_size: int, chunk_logits: int = CHUNK_LOGITS) -> int:
    """Positions per chunk: as many as keep a chunk's logits within `chunk_logits` elements, at least 1."""
    return max(1, chunk_logits // vocab_size)


def _nll_sum(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk: hidden [C, D] (or logits, with head the identity), targets [C]."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    vocab_size: int,
    ignore_index: int = IGNORE_INDEX,
    chunk_logits: int = CHUNK_LOGITS,
) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) [..., V] against targets [...], never holding more than one
    chunk's logits. hidden [..., D]; `vocab_size` (V) sizes the chunks."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    labels = targets.reshape(-1)  # [N]
    size = chunk_positions(vocab_size, chunk_logits)
    total = torch.zeros((), device=flat.device)
    for h, t in zip(flat.split(size), labels.split(size)):  # split: one concatenation in the backward
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(
                _nll_sum, head, h, t, ignore_index, use_reentrant=False, preserve_rng_state=False
            )
        else:
            total = total + _nll_sum(head, h, t, ignore_index)
    return total / (labels != ignore_index).sum()


def lm_cross_entropy(out: ModelOutput, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy of a model output against targets [B, L] in bounded memory:
    from its hidden states through its head, or chunk by chunk over its logits when it has only those."""
    if out.hidden is not None and out.head is not None:
        return chunked_cross_entropy(out.hidden, out.head, targets, out.head.vocab_size, ignore_index)
    logits = out.logits
    return chunked_cross_entropy(logits, lambda x: x, targets, logits.shape[-1], ignore_index)


__all__ = ["CHUNK_LOGITS", "IGNORE_INDEX", "chunk_positions", "chunked_cross_entropy", "lm_cross_entropy"]

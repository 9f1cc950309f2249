"""Per-token scores of long sequences, computed block by block through the KV cache.

A sequence of any length is fed to the model in blocks of `block` tokens (chunked
prefill), so memory holds one block of activations and logits plus the KV cache,
which is bounded by chunk_size on chunked layers. Only a per-token reduction of
each block's logits (NLL, argmax) is kept, never the [B, L, V] logits. Inputs move
to the model's device; scores come back on the CPU.

Logits budget: a forward of B rows x l positions forms B*l*V fp32 logits (4 bytes each), plus one
copy of that size in the reduction (log-softmax). `fit_to_budget` shrinks the rows of a batch and
the block so that B*l*V*4 <= max_logits_bytes (at least one token per forward), whatever the
vocabulary: the default 512 MiB keeps the logits of one forward near 1 GiB at their peak.

Shapes: B batch, L sequence, V vocab.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llamoe.experiments.data.tasks import TaskExample
from llamoe.models.transformer import Transformer


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


LOGIT_BYTES = 4  # bytes per logit: the reductions run in fp32
DEFAULT_MAX_LOGITS_BYTES = 512 * 2**20


def fit_to_budget(rows: int, block: int, vocab_size: int, max_logits_bytes: int) -> tuple[int, int]:
    """(rows, block) no larger than asked, with rows * block * vocab_size * 4 bytes <= max_logits_bytes
    (at least one row of one token)."""
    if max_logits_bytes < 1:
        raise ValueError(f"max_logits_bytes must be >= 1, got {max_logits_bytes}")
    tokens = max(1, max_logits_bytes // (vocab_size * LOGIT_BYTES))  # logits one forward may form
    rows = max(1, min(rows, tokens))
    return rows, max(1, min(block, tokens // rows))


Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, l, V], targets [B, l]) -> [B, l]


@torch.inference_mode()
def score_tokens(
    model: Transformer,
    tokens: torch.Tensor,
    reduce: Reduce,
    block: int = 1024,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> torch.Tensor:
    """reduce(logits, next tokens) at every position of tokens [B, L+1] -> [B, L], prefilling `block` at a time
    (fewer when B * block logits would exceed max_logits_bytes; the caller bounds B with `fit_to_budget`)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    _, block = fit_to_budget(tokens.size(0), block, model.cfg.vocab_size, max_logits_bytes)
    tokens = tokens.to(model_device(model))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = inputs.shape
    cache = model.make_cache(batch, length)
    parts = []
    for start in range(0, length, block):
        end = min(start + block, length)
        logits = model(inputs[:, start:end], start_pos=start, cache=cache).logits
        parts.append(reduce(logits, targets[:, start:end]))
    return torch.cat(parts, dim=1).cpu()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target, in fp32 nats."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, V, l] layout


def argmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The greedy prediction at each position (targets unused)."""
    return logits.argmax(dim=-1)


def token_nll(
    model: Transformer, tokens: torch.Tensor, block: int = 1024, max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES
) -> torch.Tensor:
    """NLL [B, L] of tokens[:, 1:] given everything before them (full context)."""
    return score_tokens(model, tokens, nll, block, max_logits_bytes)


def _argmax_and_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, l, 2]: the greedy prediction (exact as a float64) and the NLL of each target."""
    return torch.stack([argmax(logits, targets).double(), nll(logits, targets).double()], dim=-1)


def answer_scores(
    model: Transformer,
    examples: Sequence[TaskExample],
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per example (all of one length), per answer span: (teacher-forced argmax predictions [span] of the
    answer tokens, their NLL [span]), from full-context forwards of max_batch_tokens // length rows."""
    length = len(examples[0].tokens)
    rows, _ = fit_to_budget(max(1, max_batch_tokens // length), block, model.cfg.vocab_size, max_logits_bytes)
    out = []
    for first in range(0, len(examples), rows):
        batch = examples[first : first + rows]
        tokens = torch.from_numpy(np.stack([ex.tokens for ex in batch]))  # [B, L]
        scores = score_tokens(model, tokens, _argmax_and_nll, block, max_logits_bytes).numpy()  # [B, L-1, 2]
        for row, ex in enumerate(batch):  # position i scores token i+1
            spans = [scores[row, start - 1 : end - 1] for start, end in ex.answer_spans]
            out.append([(s[:, 0].astype(np.int64), s[:, 1]) for s in spans])
    return out

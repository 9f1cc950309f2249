"""Perplexity vs length on held-out text: mean NLL, tail NLL and NLL by position bucket, with intervals.

Protocol (shared/REFERENCE.md, "Long-context evaluation protocols"): evaluate at
L_train·{1, 2, 4, ...} on held-out long documents and report NLL by position bucket,
so that length extrapolation shows where it breaks. The mean over [0, N) mixes the well-predicted
start of every window into the result; the tail NLL, over positions [N/2, N), and its change from
the training length, `delta_tail_nll@N = tail_nll@N - tail_nll@L_train` (paired: the same
sequences at both lengths), show the failure where it happens. Lengths that do not fit use a
sliding window (Press et al. 2022; YaRN uses stride 256): windows of `window` tokens
start every `stride` tokens, each is evaluated from position 0, and each scores only
the tokens no earlier window scored, so every token sees at least window - stride
tokens of context.

Shapes: N sequences, B batch, L sequence.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from llamoe.experiments.errors import UsageError
from llamoe.experiments.evals.scoring import DEFAULT_MAX_LOGITS_BYTES, fit_to_budget, token_nll
from llamoe.experiments.evals.stats import bootstrap_mean
from llamoe.models.transformer import Transformer


class NotEnoughText(UsageError, ValueError):
    """The held-out text has too few windows of a length for what was asked (bad input: exit 2)."""


def heldout_windows(
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    length: int,
    n_eval: int,
    n_reserved: int = 0,
    bos_id: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `length` tokens of a held-out split.

    Windows start at a document start or, inside a longer document, a multiple of `length` after
    it; a window runs on across the following documents (eos between them) when its document is
    shorter. Only windows that do not overlap an earlier one are kept. The last `n_reserved`
    windows are set aside (for calibration); the `n_eval` evaluation windows are spread evenly
    over the rest. With `bos_id`, every window is bos then length - 1 tokens of text (the convention of
    tokenizers that start each text with bos: the model's attention sink is where it was trained to be).
    Returns (eval [n_eval, length], reserved [n_reserved, length]), int64.
    """
    text = length - (bos_id is not None)  # text tokens per window
    starts, end = [], 0
    for doc_start, doc_end in zip(doc_offsets[:-1].tolist(), doc_offsets[1:].tolist()):
        for start in range(doc_start, min(doc_end, len(tokens) - text + 1), text):
            if start >= end:
                starts.append(start)
                end = start + text
    if len(starts) < n_eval + n_reserved:
        raise NotEnoughText(
            f"the held-out split has {len(tokens)} tokens and room for only {len(starts)} windows of {text} "
            f"tokens, but {n_eval} evaluation + {n_reserved} calibration windows were asked for; "
            "ask for fewer sequences or shorter lengths, or use a larger data.source"
        )
    usable = len(starts) - n_reserved
    picks = np.linspace(0, usable - 1, n_eval).round().astype(int) if n_eval else np.zeros(0, dtype=int)
    chosen = [starts[i] for i in picks] + starts[usable:]

    def stack(offsets: list[int]) -> torch.Tensor:
        head = np.asarray([] if bos_id is None else [bos_id], dtype=np.int64)
        rows = [np.concatenate([head, np.asarray(tokens[s : s + text], dtype=np.int64)]) for s in offsets]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, length, dtype=torch.long)

    return stack(chosen[:n_eval]), stack(chosen[n_eval:])


def sliding_window_nll(
    model: Transformer,
    tokens: torch.Tensor,
    window: int,
    stride: int,
    block: int = 1024,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> torch.Tensor:
    """NLL [B, L] of tokens[:, 1:] where each token sees at most `window` and at least window - stride tokens."""
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride={stride}, window={window}")
    length = tokens.size(1) - 1
    out = torch.empty(tokens.size(0), length)
    begin, scored = 0, 0  # positions [0, scored) have their NLL
    while scored < length:
        end = min(begin + window, length)
        window_nll = token_nll(model, tokens[:, begin : end + 1], block, max_logits_bytes)  # positions begin .. end-1
        out[:, scored:end] = window_nll[:, scored - begin :]
        scored, begin = end, begin + stride
    return out


def position_buckets(length: int, train_len: int) -> list[tuple[int, int]]:
    """[0, T), [T, 2T), [2T, 4T), ... cut at `length`: one bucket per doubling beyond the training length T."""
    edges = [0, min(train_len, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(zip(edges[:-1], edges[1:]))


def _batched_nll(
    model: Transformer,
    sequences: torch.Tensor,
    *,
    block: int,
    max_batch_tokens: int,
    max_logits_bytes: int,
    window: Optional[int],
    stride: int,
) -> torch.Tensor:
    """NLL [N, L] of sequences [N, L+1], a batch of at most max_batch_tokens tokens at a time, and at most
    max_logits_bytes of logits per forward (experiments/evals/scoring.py)."""
    length = sequences.size(1) - 1
    rows, _ = fit_to_budget(max(1, max_batch_tokens // length), block, model.cfg.vocab_size, max_logits_bytes)
    parts = []
    for first in range(0, sequences.size(0), rows):
        batch = sequences[first : first + rows]
        if window is None:
            parts.append(token_nll(model, batch, block, max_logits_bytes))
        else:
            parts.append(sliding_window_nll(model, batch, window, stride, block, max_logits_bytes))
    return torch.cat(parts)


def perplexity_vs_length(
    model: Transformer,
    sequences: torch.Tensor,
    lengths: list[int],
    train_len: int,
    *,
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
    window: Optional[int] = None,
    stride: int = 256,
) -> dict[str, Any]:
    """Mean NLL, perplexity, tail NLL and NLL by position bucket at each length, on prefixes of sequences [N, >= L+1].

    Each value comes with a 95% bootstrap interval over the sequences (`*_ci`, bucket "ci") and, for
    nll and delta_tail_nll, its per-sequence values (`*_per_sequence`); `delta_tail_nll` (paired, per
    sequence) is filled when `train_len` is one of `lengths`.

    A token's NLL depends only on the tokens before it (and, with a sliding window, on where the
    windows start, which does not depend on the total length), so one pass over the longest
    prefix gives every shorter length. Lengths above `window` (when set) use the sliding window,
    the others the full context through chunked prefill.
    """
    longest = max(lengths)
    if sequences.size(1) < longest + 1:
        raise ValueError(f"length {longest} needs sequences of {longest + 1} tokens, got {sequences.size(1)}")
    full = [n for n in lengths if window is None or n <= window]
    kw = dict(block=block, max_batch_tokens=max_batch_tokens, max_logits_bytes=max_logits_bytes, stride=stride)
    nll_full = _batched_nll(model, sequences[:, : max(full) + 1], window=None, **kw) if full else None
    slid = [n for n in lengths if n not in full]
    nll_slid = _batched_nll(model, sequences[:, : max(slid) + 1], window=window, **kw) if slid else None

    def nll_of(length: int) -> torch.Tensor:
        source = nll_full if length in full else nll_slid
        assert source is not None
        return source[:, :length]  # [N, L]: prefixes of one pass, so every length sees the same sequences

    def tail(nll: torch.Tensor) -> np.ndarray:
        return nll[:, nll.size(1) // 2 :].double().mean(dim=1).numpy()  # per sequence, positions [L/2, L)

    reference = tail(nll_of(train_len)) if train_len in lengths else None
    results: dict[str, Any] = {
        "lengths": [],
        "nll": [],
        "nll_ci": [],
        "ppl": [],
        "method": [],
        "buckets": [],
        "tail_nll": [],
        "tail_nll_ci": [],
        "delta_tail_nll": [],
        "delta_tail_nll_ci": [],
        "sequences": int(sequences.size(0)),
        # one value per sequence, so results on the same windows (other runs, other settings) pair by window
        "nll_per_sequence": [],
        "delta_tail_nll_per_sequence": [],
    }
    for length in lengths:
        nll = nll_of(length)
        per_sequence = nll.double().mean(dim=1).numpy()
        mean = float(per_sequence.mean())
        tails = tail(nll)
        results["lengths"].append(length)
        results["nll"].append(mean)
        results["nll_ci"].append(bootstrap_mean(per_sequence))
        results["ppl"].append(math.exp(mean))
        results["method"].append("full" if length in full else f"sliding(window={window}, stride={stride})")
        results["tail_nll"].append(float(tails.mean()))
        results["tail_nll_ci"].append(bootstrap_mean(tails))
        results["nll_per_sequence"].append(per_sequence.tolist())
        if reference is not None:
            results["delta_tail_nll"].append(float((tails - reference).mean()))
            results["delta_tail_nll_ci"].append(bootstrap_mean(tails - reference))
            results["delta_tail_nll_per_sequence"].append((tails - reference).tolist())
        buckets = []
        for a, b in position_buckets(length, train_len):
            values = nll[:, a:b].double().mean(dim=1).numpy()
            buckets.append({"start": a, "end": b, "nll": float(values.mean()), "ci": bootstrap_mean(values)})
        results["buckets"].append(buckets)
    return results

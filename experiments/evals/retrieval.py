"""Retrieval accuracy at long lengths: passkey grid, needle-in-a-haystack, multi-query associative recall.

Passkey and needle are scored by exact match of greedy decoding through the KV cache
(`llamoe.models.generate.generate`, chunked prefill); MQAR, as in Zoology, by the teacher-forced
argmax at the answer positions only (a query counts when all its value tokens are right).
Each accuracy comes with a 95% bootstrap interval (`accuracy_ci`) over the keys (passkey, needle)
or over the sequences of queries (MQAR). Every example is drawn from `llamoe.experiments.data.tasks` with a
seed derived from
(seed, stream, length, cell, trial), so a stream never repeats the training examples
(those use another seed layout) and the calibration stream never repeats the evaluation one.

Shapes: B batch, P prompt length, L sequence.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

from llamoe.experiments.data.tasks import MQAR, Needle, Passkey, TaskExample
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.evals.scoring import DEFAULT_MAX_LOGITS_BYTES, answer_scores, fit_to_budget, model_device
from llamoe.experiments.evals.stats import bootstrap_mean, bootstrap_ratio
from llamoe.models.generate import generate
from llamoe.models.transformer import Transformer

STREAMS = {"eval": 1, "calibration": 2}


def _split_lengths(lengths: Sequence[int], minimum: int) -> tuple[list[int], list[int]]:
    """(lengths >= minimum, the others)."""
    return [n for n in lengths if n >= minimum], [n for n in lengths if n < minimum]


def greedy_exact_match(
    model: Transformer,
    examples: Sequence[TaskExample],
    *,
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> list[bool]:
    """For each example: does greedy decoding after its prompt reproduce its (single) answer exactly?
    Batches and prefill blocks are cut to max_logits_bytes of logits per forward (scoring.fit_to_budget)."""
    groups: dict[int, list[int]] = defaultdict(list)  # prompt length -> example indices, batched together
    for i, ex in enumerate(examples):
        groups[len(ex.prompt())].append(i)
    hits = [False] * len(examples)
    device = model_device(model)
    for prompt_len, members in groups.items():
        rows, chunk = fit_to_budget(
            max(1, max_batch_tokens // prompt_len), block, model.cfg.vocab_size, max_logits_bytes
        )
        for first in range(0, len(members), rows):
            batch = members[first : first + rows]
            answers = [examples[i].answers()[0] for i in batch]
            prompts = torch.from_numpy(np.stack([examples[i].prompt() for i in batch])).to(device)  # [B, P]
            new = generate(model, prompts, max(len(a) for a in answers), prefill_chunk=chunk).cpu()
            for row, (i, answer) in enumerate(zip(batch, answers)):
                hits[i] = bool(np.array_equal(new[row, : len(answer)].numpy(), answer))
    return hits


def passkey_grid(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    seed: int = 0,
    stream: str = "eval",
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> dict[str, Any]:
    """Passkey accuracy per (length, depth) cell over `trials` keys, and per length (mean over depths).

    Lengths too short to hold an example are left out and listed under "skipped".
    """
    task = Passkey(tokenizer)
    fit, skipped = _split_lengths(lengths, task.min_length())
    grid, intervals = [], []
    for length in fit:
        examples = [
            task.example(length, depth, [seed, STREAMS[stream], length, j, t])
            for j, depth in enumerate(depths)
            for t in range(trials)
        ]
        hits = np.array(
            greedy_exact_match(
                model, examples, block=block, max_batch_tokens=max_batch_tokens, max_logits_bytes=max_logits_bytes
            )
        )
        grid.append(hits.reshape(len(depths), trials).mean(axis=1).tolist())
        intervals.append(bootstrap_mean(hits))
    return {
        "lengths": fit,
        "skipped": skipped,
        "depths": list(depths),
        "trials": trials,
        "grid": grid,
        "accuracy": [float(np.mean(row)) for row in grid],
        "accuracy_ci": intervals,
        "chance": 1 / 90_000,
    }


def needle_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    haystack: np.ndarray,
    lengths: Sequence[int],
    trials: int,
    *,
    n_needles: int = 4,
    seed: int = 0,
    stream: str = "eval",
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> dict[str, Any]:
    """Needle accuracy per length; trial t asks for the needle at depth (t + 0.5) / trials.

    Lengths too short to hold an example are left out and listed under "skipped".
    """
    task = Needle(tokenizer, haystack, n_needles)
    fit, skipped = _split_lengths(lengths, task.min_length())
    accuracy, intervals = [], []
    for length in fit:
        examples = [
            task.example(length, [seed, STREAMS[stream], length, t], depth=(t + 0.5) / trials) for t in range(trials)
        ]
        hits = greedy_exact_match(
            model, examples, block=block, max_batch_tokens=max_batch_tokens, max_logits_bytes=max_logits_bytes
        )
        accuracy.append(float(np.mean(hits)))
        intervals.append(bootstrap_mean(hits))
    return {
        "lengths": fit,
        "skipped": skipped,
        "trials": trials,
        "n_needles": n_needles,
        "accuracy": accuracy,
        "accuracy_ci": intervals,
        "chance": 1 / 900_000,
    }


def mqar_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    n_pairs: int,
    trials: int,
    *,
    seed: int = 0,
    stream: str = "eval",
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> dict[str, Any]:
    """Fraction of MQAR queries whose value tokens are all predicted (teacher-forced argmax), per length.

    Each length uses n_pairs pairs, or as many as fit when fewer do (reported as "pairs"); lengths
    too short for one pair are left out and listed under "skipped".
    """
    task = MQAR(tokenizer)
    fit, skipped = _split_lengths(lengths, task.min_length())
    accuracy, intervals, token_accuracy, pairs = [], [], [], []
    for length in fit:
        n = min(n_pairs, task.max_pairs(length))
        pairs.append(n)
        examples = [task.example(length, n, [seed, STREAMS[stream], length, t]) for t in range(trials)]
        right = [
            [predicted == answer for (predicted, _), answer in zip(spans, ex.answers())]
            for spans, ex in zip(answer_scores(model, examples, block, max_batch_tokens, max_logits_bytes), examples)
        ]
        correct = [[bool(span.all()) for span in spans] for spans in right]  # per sequence, per query
        accuracy.append(float(np.mean([c for spans in correct for c in spans])))
        intervals.append(bootstrap_ratio([sum(c) for c in correct], [len(c) for c in correct]))
        token_accuracy.append(float(np.mean(np.concatenate([span for spans in right for span in spans]))))
    return {
        "lengths": fit,
        "skipped": skipped,
        "trials": trials,
        "pairs": pairs,
        "accuracy": accuracy,
        "accuracy_ci": intervals,
        "token_accuracy": token_accuracy,
        "chance": 1 / MQAR.n_values,
    }

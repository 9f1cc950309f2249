"""The domains evaluation: how well a model knows the languages of the domains task (tasks.Domains).

A model trained with `data.tasks.domains` is scored on fresh chains of every domain in turn (seeds of
the evaluation stream, never the training rows' seeds), at the training length, teacher-forced:
  nll       mean NLL per scored letter: ln(successors) = 0.693 for a model that knows every table and
            recognises the domain; near ln 26 = 3.26 for one that knows neither
  accuracy  the fraction of scored letters whose argmax is one the domain allows after the previous one
Both with 95% bootstrap intervals over the chains. This is the capacity-bound measure of the MoE
positive control (experiments/configs/ablations/moe_positive_control.yaml): the tables grow with
the number of domains, and a router can send each domain's rows to their own experts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llamoe.experiments.data.tasks import Domains
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.evals.retrieval import STREAMS
from llamoe.experiments.evals.scoring import DEFAULT_MAX_LOGITS_BYTES, answer_scores
from llamoe.experiments.evals.stats import bootstrap_mean
from llamoe.models.transformer import Transformer


def domains_score(
    model: Transformer,
    tokenizer: Tokenizer,
    n_domains: int,
    length: int,
    sequences: int,
    *,
    seed: int = 0,
    stream: str = "eval",
    block: int = 1024,
    max_batch_tokens: int = 32768,
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> dict[str, Any]:
    """NLL and accuracy on `sequences` chains of `length` letters, chain i of domain i mod n_domains."""
    task = Domains(tokenizer, n_domains)
    examples = [task.example(length, i % n_domains, [seed, STREAMS[stream], length, i]) for i in range(sequences)]
    nll, right = [], []
    for ex, [(predicted, token_nll)] in zip(
        examples, answer_scores(model, examples, block, max_batch_tokens, max_logits_bytes)
    ):
        ((start, end),) = ex.answer_spans
        allowed = task.allowed_next(ex)[start - 1 : end - 1]  # what may follow the letter before each answer
        right.append(float((allowed == predicted[:, None]).any(axis=1).mean()))
        nll.append(float(token_nll.mean()))
    return {
        "lengths": [length],
        "domains": n_domains,
        "sequences": sequences,
        "nll": [float(np.mean(nll))],
        "nll_ci": [bootstrap_mean(nll)],
        "accuracy": [float(np.mean(right))],
        "accuracy_ci": [bootstrap_mean(right)],
        "floor": math.log(Domains.successors),
    }

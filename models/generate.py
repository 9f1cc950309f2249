"""Incremental decoding through the KV cache: greedy, temperature and nucleus (top-p) sampling.

Shapes: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch

from llamoe.models.transformer import Transformer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, V]: argmax when temperature == 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    prefill_chunk: int = 4096,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Continue prompt [B, P] by up to max_new_tokens tokens; returns only the new tokens [B, N].

    The prompt is prefilled in blocks of `prefill_chunk` tokens, so long prompts need
    memory for one block of activations plus the (chunk-bounded) cache. Rows that
    emit `eos_id` keep emitting it; decoding stops early once every row has.
    """
    batch, prompt_len = prompt.shape
    if prompt_len == 0:
        raise ValueError("generate needs a non-empty prompt")
    cache = model.make_cache(batch, prompt_len + max_new_tokens)
    logits = None
    for start in range(0, prompt_len, prefill_chunk):
        logits = model(prompt[:, start : start + prefill_chunk], start_pos=start, cache=cache).logits
    assert logits is not None
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    new_tokens = []
    pos = prompt_len
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        new_tokens.append(token)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        logits = model(token[:, None], start_pos=pos, cache=cache).logits
        pos += 1
    return torch.stack(new_tokens, dim=1)

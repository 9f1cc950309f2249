"""NoPE attention entropy against a direct computation from softmax(QK^T) with temperature tuning on."""

import math

import torch

from llamoe.experiments.evals.entropy import nope_attention_entropy
from llamoe.models.config import AttentionConfig, ModelConfig, RopeConfig
from llamoe.models.transformer import Transformer


def _model() -> Transformer:
    """Two layers, layer 1 NoPE with temperature tuning from position 3 (floor_scale 4); sharp attention."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        multiple_of=32,
        max_seq_len=64,
        rope=RopeConfig(theta=10000.0),
        attention=AttentionConfig(
            nope_layer_interval=2, chunk_size=8, temperature_tuning=True, floor_scale=4.0, attn_scale=0.5
        ),
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger query/key weights: attention far from uniform, so the temperature shows
        for w in (model.layers[1].attention.wq.weight, model.layers[1].attention.wk.weight):
            w.mul_(12.0)
    return model


@torch.no_grad()
def _direct_entropy(model: Transformer, tokens: torch.Tensor, temperature: bool) -> torch.Tensor:
    """Entropy [L] (mean over batch and heads) of layer 1's causal softmax(q k^T / sqrt(Dh)) attention,
    with q and k formed here from wq, wk and the Llama 4 temperature formula."""
    attn = model.layers[1].attention
    inputs = []
    hook = model.layers[1].attention_norm.register_forward_hook(lambda m, args, out: inputs.append(out))
    model(tokens)
    hook.remove()
    x = inputs[0]  # [B, L, D]
    b, length, _ = x.shape
    q = attn.wq(x).view(b, length, 4, 8).transpose(1, 2)  # [B, H, L, Dh]
    k = attn.wk(x).view(b, length, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # [B, H, L, Dh]
    if temperature:
        p = torch.arange(length, dtype=torch.float32)
        q = q * (1.0 + 0.5 * torch.log(1.0 + torch.floor((p + 1.0) / 4.0)))[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    return -torch.special.xlogy(probs, probs).sum(-1).mean(dim=(0, 1))


def test_nope_entropy_equals_the_entropy_of_softmax_qk_attention_with_temperature() -> None:
    model = _model()
    tokens = torch.randint(0, 256, (2, 24))
    measured = nope_attention_entropy(model, tokens, [0, 8, 24], queries_per_bucket=16, block=5)
    assert measured["layers"] == [1]
    expected = _direct_entropy(model, tokens, temperature=True)
    untuned = _direct_entropy(model, tokens, temperature=False)
    for bucket in measured["buckets"]:
        span = slice(bucket["start"], bucket["end"])  # 16 queries per bucket: every position is sampled
        assert abs(bucket["per_layer"][0] - float(expected[span].mean())) < 1e-5
    late = measured["buckets"][1]["per_layer"][0]
    assert float(untuned[8:].mean()) - late > 0.05  # the temperature sharpens attention, and it was applied

import math

import pytest
import torch

from llamoe.attention.irope import temperature_scale
from llamoe.attention.rope import apply_rope, rope_angles, rope_frequencies
from llamoe.models import RopeConfig


def test_llama3_scaling_follows_reference_formula() -> None:
    cfg = RopeConfig(theta=500000.0, scaling="llama3", factor=8, low_freq_factor=1, high_freq_factor=4)
    scaled = rope_frequencies(128, cfg).double()
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    for f, got in zip(base.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - s) * f / 8 + s * f
        assert got == pytest.approx(want, rel=1e-6)
    assert (scaled < base.float()).any() and (scaled == base.float()).any()


def test_rope_rotates_adjacent_pairs_and_is_relative() -> None:
    freqs = rope_frequencies(8, RopeConfig(theta=100.0))
    x = torch.randn(1, 1, 1, 8)
    y = torch.randn(1, 1, 1, 8)

    def at(t: torch.Tensor, p: int) -> torch.Tensor:
        return apply_rope(t, *rope_angles(freqs, torch.tensor([p])))

    # q·k depends only on the position difference
    assert torch.dot(at(x, 5).flatten(), at(y, 2).flatten()) == pytest.approx(
        torch.dot(at(x, 13).flatten(), at(y, 10).flatten()).item(), abs=1e-5
    )
    rotated = at(x, 1).flatten()
    angle = freqs[0]
    assert rotated[0].item() == pytest.approx((x[..., 0] * angle.cos() - x[..., 1] * angle.sin()).item(), abs=1e-6)
    assert rotated[1].item() == pytest.approx((x[..., 0] * angle.sin() + x[..., 1] * angle.cos()).item(), abs=1e-6)


def test_temperature_values_from_reference() -> None:
    # "128K" and "10M" are 2**17 and 10·2**20 positions (the p+1 of the last query)
    s = temperature_scale(torch.tensor([0, 8190, 8191, 131071, 10 * 2**20 - 1]), 8192.0, 0.1)
    assert s[0].item() == 1.0 and s[1].item() == 1.0
    assert s[2].item() == pytest.approx(1.0693, abs=1e-4)
    assert s[3].item() == pytest.approx(1.283, abs=1e-3)
    assert s[4].item() == pytest.approx(1.716, abs=1e-3)


def test_rope_table_stays_fp32_when_the_model_is_cast() -> None:
    from llamoe.models import Transformer, presets

    cfg = presets.get("llama3.1-tiny")
    exact = rope_frequencies(cfg.head_size, cfg.rope)
    model = Transformer(cfg).to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32 and torch.equal(model.rope_freqs, exact)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")  # uninitialised memory everywhere, but the RoPE table is rebuilt
    assert torch.equal(meta.rope_freqs, exact)

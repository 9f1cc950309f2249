"""`llamoe convert`: HF directory -> checkpoint file -> HF directory, exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamoe.experiments.cli import main
from llamoe.models import Transformer, presets
from llamoe.models.config import model_config_from_dict


def _hf_dir(path: Path) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    hf.save_pretrained(path)
    return hf


def test_hf_to_checkpoint_and_back(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "hf")
    ckpt_path = tmp_path / "converted.pt"
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(ckpt_path)]) == 0

    ckpt = torch.load(ckpt_path, weights_only=True)
    model = Transformer(model_config_from_dict(ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    tokens = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        assert (model(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-4

    assert main(["convert", "to-hf", str(ckpt_path), str(tmp_path / "back")]) == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back")
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_preset_named_checkpoint_converts(tmp_path: Path) -> None:
    model = Transformer(presets.get("llama3.1-tiny"))
    torch.save({"model_config": "llama3.1-tiny", "model": model.state_dict()}, tmp_path / "tiny.pt")
    assert main(["convert", "to-hf", str(tmp_path / "tiny.pt"), str(tmp_path / "hf")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_key_value_heads == 4 and hf.config.vocab_size == 320


def test_bad_input_exits_with_status_2(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "bad.pt")
    assert main(["convert", "to-hf", str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 2
    assert main(["convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 2


def test_convert_without_transformers_says_what_to_install(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # importing it now fails as if not installed
    monkeypatch.delitem(sys.modules, "llamoe.models.hf", raising=False)
    assert main(["convert", "from-hf", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "llamoe[hf]" in capsys.readouterr().err

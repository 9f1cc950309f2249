"""Each package owns its config, configs are frozen once validated, and a model's eval-time
attention state is its own: nothing it does changes a config another object holds."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamoe.experiments.config import load_run_config
from llamoe.experiments.evals.temperature import TemperatureSetting, calibrate
from llamoe.models import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig, Transformer, presets
from llamoe.models.config import model_config_from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "statement,forbidden",
    [
        ("import llamoe.attention.attention", ("llamoe.models", "llamoe.moe")),
        ("import llamoe.moe.router", ("llamoe.models", "llamoe.attention")),
        ("import llamoe.moe.layer", ("llamoe.models", "llamoe.attention")),
        ("from llamoe.models import Transformer", ("llamoe.experiments",)),
    ],
)
def test_each_package_imports_alone_in_a_fresh_interpreter(statement: str, forbidden: tuple[str, ...]) -> None:
    """No import cycle: attention/ and moe/ import neither models/ nor each other, and models/ no experiments/."""
    check = (
        f"{statement}; import sys; "
        f"bad = sorted(m for m in sys.modules if m.startswith({forbidden!r})); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_config_error_is_one_class_across_packages() -> None:
    from llamoe.attention.config import ConfigError as AttentionConfigError
    from llamoe.moe.config import ConfigError as MoEConfigError

    assert AttentionConfigError is MoEConfigError is ConfigError


@pytest.mark.parametrize(
    "cfg,field",
    [
        (presets.get("llama4-tiny"), "dim"),
        (RopeConfig(), "theta"),
        (AttentionConfig(), "temperature_tuning"),
        (MoEConfig(), "top_k"),
    ],
)
def test_frozen_config_rejects_mutation(cfg: object, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, 100)


def test_every_change_is_a_replace_that_validates_again() -> None:
    cfg = presets.get("llama3.1-tiny")
    assert dataclasses.replace(cfg, n_layers=2).n_layers == 2
    with pytest.raises(ConfigError, match="^dim: dim=100 is not divisible by n_heads=8"):
        dataclasses.replace(cfg, dim=100)
    with pytest.raises(ConfigError, match="^attention.chunk_size"):
        dataclasses.replace(cfg.attention, chunk_size=0)
    with pytest.raises(ConfigError, match="^moe.top_k"):
        MoEConfig(num_experts=2, top_k=3)


def test_configs_built_from_mappings_are_frozen() -> None:
    cfg = model_config_from_dict({"dim": 64, "n_heads": 4, "moe": {"num_experts": 4}})
    run = load_run_config(None, ["model=llama4-tiny", "model.moe.top_k=2"])
    for model_cfg in (cfg, run.model):
        assert model_cfg.moe is not None
        with pytest.raises(dataclasses.FrozenInstanceError):
            model_cfg.moe.top_k = 3  # type: ignore[misc]


def _nope_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for layer in model.layers:
        layer.attention.init_weights(0.3, 0.3)  # sharp attention: temperature visibly matters
    return model


def _temperature_cfg() -> ModelConfig:
    tiny = presets.get("llama4-tiny")
    attention = dataclasses.replace(tiny.attention, temperature_tuning=True, floor_scale=4.0, attn_scale=0.5)
    return dataclasses.replace(tiny, n_layers=4, attention=attention)


def test_two_models_from_one_config_are_independent() -> None:
    cfg = _temperature_cfg()
    a, b = _nope_model(cfg), _nope_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        before = b(tokens).logits
        a.set_attention(temperature_tuning=False, attn_scale=0.0)
        changed = a(tokens).logits
        after = b(tokens).logits
    assert not torch.equal(changed, before)  # a's switch took effect on a ...
    assert torch.equal(after, before)  # ... and on nothing else
    assert b.attention_settings == cfg.attention and b.attention_settings.temperature_tuning
    assert a.cfg is cfg and cfg.attention.temperature_tuning and cfg.attention.attn_scale == 0.5
    assert not a.attention_settings.temperature_tuning and a.attention_settings.attn_scale == 0.0


def test_eval_time_attention_never_reaches_the_saved_run_config() -> None:
    run = load_run_config(None, ["model=llama4-tiny", "model.n_layers=4"])
    saved = run.to_yaml()
    model = Transformer(run.model)
    model.set_attention(temperature_tuning=False, floor_scale=3.0, attn_scale=0.7)
    assert run.to_yaml() == saved and model.cfg is run.model


def test_temperature_calibration_does_not_rewrite_the_model_config() -> None:
    cfg = _temperature_cfg()
    model = _nope_model(cfg)
    start = TemperatureSetting.of(model)
    candidates = [TemperatureSetting(True, 2.0, 0.2), start.switched(False)]
    seen: list[TemperatureSetting] = []

    def score() -> float:  # the later candidate scores higher
        seen.append(TemperatureSetting.of(model))
        return float(len(seen))

    result = calibrate(model, candidates, score, maximize=True)
    assert seen == candidates and result["best"] == candidates[-1]
    assert model.cfg is cfg and model.cfg.attention == cfg.attention
    assert TemperatureSetting.of(model) == start  # the model's own setting is restored

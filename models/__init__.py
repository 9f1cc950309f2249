"""What a model is: configs, presets, the Transformer, decoding and Hugging Face interop."""

from llamoe.models import presets
from llamoe.models.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig
from llamoe.models.transformer import ModelOutput, Transformer

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "RopeConfig",
    "Transformer",
    "presets",
]

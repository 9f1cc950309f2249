"""What a model is: configs, presets, the Transformer, decoding and Hugging Face interop."""

from models import presets
from models.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig
from models.transformer import ModelOutput, Transformer

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

"""What a model is: configs, presets, the Transformer, decoding and Hugging Face interop.

`attention` and `moe` import `models.config` and `models.layers`, while
`models.transformer` composes them; so the Transformer is resolved lazily here
to keep `import models.config` free of that cycle.
"""

from typing import Any

from models import presets
from models.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig

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


def __getattr__(name: str) -> Any:
    if name in ("Transformer", "ModelOutput"):
        from models import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

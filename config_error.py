"""ConfigError: the one exception for an invalid configuration value, shared by every package.

It lives outside `attention`, `moe` and `models` so that each package can validate its own
config and raise it without importing another (`models.ConfigError` is this same class).
"""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted key and the fix."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


__all__ = ["ConfigError"]

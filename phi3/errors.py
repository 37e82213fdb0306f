"""One exception type for every user-facing failure.

Anything raised as `Phi3Error` is printed by the CLI as a single line (`error: ...`) with no
stack trace, so its message must name what was wrong: the file, the tensor, the field, the value.
"""


class Phi3Error(Exception):
    """A problem with user input (a file, a config, an argument) explained in one message."""


class CheckpointError(Phi3Error):
    """A checkpoint (HF directory, safetensors, GGUF) is missing, truncated or inconsistent."""


class ConfigError(Phi3Error):
    """A config.json or preset has a missing, unknown or invalid value."""

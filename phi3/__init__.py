"""phi3: the Phi-3 model family end to end."""

from .errors import CheckpointError, ConfigError, Phi3Error
from .generate import SamplingParams

__version__ = "0.1.0"


def load(model=None, dtype=None, dequantize=False):
    """Load a model: an HF directory, a .gguf file, a Hub id, or None for the embedded default.

    Returns a `phi3.api.LanguageModel` with `.generate`, `.stream`, `.chat`, `.chat_stream`.
    A quantized GGUF stays quantized unless `dequantize=True`.
    """
    from .api import load as _load

    return _load(model, dtype, dequantize)


__all__ = ["load", "SamplingParams", "Phi3Error", "CheckpointError", "ConfigError", "__version__"]

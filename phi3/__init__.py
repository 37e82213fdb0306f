"""phi3: the Phi-3 model family end to end."""

from .errors import CheckpointError, ConfigError, Phi3Error
from .generate import PromptCache, SamplingParams

__version__ = "0.1.0"


def load(model=None, dtype=None, dequantize=False, quantize=None, group_size=64):
    """Load a model: an HF directory, a .gguf file, a Hub id, or None for the embedded default.

    Returns a `phi3.api.LanguageModel` with `.generate`, `.stream`, `.chat`, `.chat_stream`.
    A quantized GGUF stays quantized unless `dequantize=True`; `quantize=4` or `8` quantizes a
    full-precision model as it loads (int4 groups of `group_size`, int8 head).
    """
    from .api import load as _load

    return _load(model, dtype, dequantize, quantize, group_size)


__all__ = ["load", "PromptCache", "SamplingParams", "Phi3Error", "CheckpointError", "ConfigError", "__version__"]

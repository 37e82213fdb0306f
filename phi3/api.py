"""The Python API the CLI is built on: `phi3.load(...)` -> `LanguageModel` with generate / stream / chat."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import build_model, default_dtype, load_hf_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, Phi3Error
from .generate import Completion, Delta, PromptCache, SamplingParams, complete, stream
from .models.phi3 import Phi3ForCausalLM
from .tokenizer import Tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class LanguageModel:
    model: Phi3ForCausalLM
    tokenizer: Tokenizer
    source: str

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A plain-completion prompt: the tokenizer's BOS (if it adds one) + the text."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat_prompt(self, messages: str | list[dict]) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- generation ----------------------------------------------------------------------------
    # `prompt_cache` (a `PromptCache`, one conversation): keeps the KV cache between calls, so a prompt
    # that begins with the previous call's tokens (a chat's history) prefills only what is new.
    def stream_ids(self, prompt_ids: list[int], continuation: bool = False, prompt_cache: PromptCache | None = None,
                   **sampling) -> Iterator[Delta]:
        """Text deltas for a tokenised prompt; `continuation=True` for plain completion (see generate.stream)."""
        return stream(self.model, self.tokenizer, prompt_ids, SamplingParams(**sampling), continuation, prompt_cache)

    def complete_ids(self, prompts: list[list[int]], continuation: bool = False,
                     prompt_cache: PromptCache | None = None, **sampling) -> list[Completion]:
        return complete(self.model, self.tokenizer, prompts, SamplingParams(**sampling), continuation, prompt_cache)

    def generate(self, prompt: str | list[str], **sampling) -> str | list[str]:
        """Plain completion (no chat template). A list of prompts is generated as one batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = [c.text for c in self.complete_ids([self.encode(p) for p in prompts], continuation=True, **sampling)]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        return (d.text for d in self.stream_ids(self.encode(prompt), continuation=True, **sampling) if d.text)

    def chat(self, messages: str | list[dict], prompt_cache: PromptCache | None = None, **sampling) -> str:
        return self.complete_ids([self.chat_prompt(messages)], prompt_cache=prompt_cache, **sampling)[0].text

    def chat_stream(self, messages: str | list[dict], prompt_cache: PromptCache | None = None,
                    **sampling) -> Iterator[str]:
        return (d.text for d in self.stream_ids(self.chat_prompt(messages), prompt_cache=prompt_cache, **sampling)
                if d.text)


# ---- loading --------------------------------------------------------------------------------------
def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_gguf_model(path: Path, dtype=None, dequantize: bool = False) -> tuple[Phi3ForCausalLM, Tokenizer]:
    """A GGUF model. Quantized linear weights stay quantized (see `phi3.gguf`) unless `dequantize`."""
    from .gguf import dense_parameters, gguf_quantized_state_dict, gguf_state_dict, gguf_to_hf_config, read_gguf

    f = read_gguf(path)
    hf = gguf_to_hf_config(f)
    dt = default_dtype(ModelConfig.from_hf_dict(hf, source=str(path)), dtype,
                       None if dequantize else dense_parameters(f))
    if dequantize:  # each tensor dequantized in fp32 and cast to the model's dtype as it comes (no fp32 model)
        sd = gguf_state_dict(f, dtype=dt)
    else:
        sd, section = gguf_quantized_state_dict(f, dtype=dt)  # dense tensors straight to the model dtype
        if section["modules"]:
            hf["quantization"] = section
    cfg = ModelConfig.from_hf_dict(hf, source=str(path))
    model = build_model(cfg, sd, dt, source=str(path), consume=True)
    return model, Tokenizer.from_gguf_metadata(f.metadata, source=str(path))


def convert_gguf_to_hf(path: str | os.PathLike, dst: str | os.PathLike, dtype=None) -> Path:
    """A GGUF file as an HF directory (`phi3 convert model.gguf dir/`): what `load(path,
    dequantize=True)` then `save_hf_checkpoint` write — the same tensors, config and tokenizer — but a
    tensor at a time, each dequantized from the file as it is written, so the model is never held
    (a 14B file needs its largest tensor in memory, not 28 GB). The names and shapes are checked
    first against the model the config describes, as loading does."""
    from .checkpoint import checked_entries, parse_dtype, write_hf_checkpoint
    from .gguf import gguf_entries, gguf_to_hf_config, read_gguf

    f = read_gguf(path)
    cfg = ModelConfig.from_hf_dict(gguf_to_hf_config(f), source=str(path))
    dt = default_dtype(cfg, None if dtype is None else parse_dtype(dtype))
    entries = checked_entries(gguf_entries(f, dt), cfg, dt, str(path))
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata, source=str(path))
    return write_hf_checkpoint(dst, entries, cfg, dt, tokenizer, progress=True)


def resolve(model: str | os.PathLike | None) -> Path:
    """An HF directory, a GGUF file, a Hub id (downloaded with huggingface_hub), or None for the default."""
    if model is None:
        from .default_model import default_model_path
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(str(model)) and not str(model).startswith("."):
        return download_from_hub(str(model))
    raise CheckpointError(f"{model}: no such file or directory (expected an HF model directory, "
                          f"a .gguf file, or a Hugging Face Hub id like microsoft/Phi-3-mini-4k-instruct)")


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Phi3Error(f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {reason[:300]}). "
                        f"Download it elsewhere and pass the local directory with --model.") from None


def tokenizer_for_dir(path: Path, cfg: ModelConfig):
    """tokenizer.json when present; Phi-3-small checkpoints (remote-code tiktoken tokenizer) get cl100k_base."""
    if cfg.model_type == "phi3small" and not (path / "tokenizer.json").is_file():
        from .tiktoken_tokenizer import Phi3SmallTokenizer
        return Phi3SmallTokenizer.from_dir(path)
    return Tokenizer.from_dir(path)


def load(model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
         dequantize: bool = False, quantize: int | None = None, group_size: int = 64) -> LanguageModel:
    """Load a model and its tokenizer: HF directory, GGUF file, Hub id, or the default model (None).

    A quantized GGUF keeps its quantized linears (int4/int8 kernels) unless `dequantize=True`,
    which gives the full-precision model that `transformers` would build from the same file.
    `quantize` (4 or 8) quantizes a full-precision model as it loads (`quant.quantize_on_load`:
    the model `phi3 quantize --bits B --group-size G` and a reload would give), no file written."""
    if quantize:
        from .quant import check_quant_args
        check_quant_args(quantize, group_size)  # before any loading
    path = resolve(model)
    if path.is_dir():
        net = load_hf_checkpoint(path, None if quantize else dtype)
        tok = tokenizer_for_dir(path, net.config)
    elif not is_gguf_file(path):
        raise CheckpointError(f"{path}: not a GGUF file (bad magic) and not an HF model directory")
    else:
        net, tok = load_gguf_model(path, None if quantize else dtype, dequantize)
    if quantize:
        from .quant import quantize_on_load
        quantize_on_load(net, quantize, group_size, dtype)
    return LanguageModel(net, tok, str(path))


__all__ = ["LanguageModel", "PromptCache", "load", "Phi3Error"]

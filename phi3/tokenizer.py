"""Tokenizers for Phi-3 checkpoints: HF directories and GGUF files, chat templates, streaming.

The heavy lifting (BPE, byte fallback, added-token matching) is done by the HF `tokenizers`
library; this module is the glue that builds a `tokenizers.Tokenizer` from what a checkpoint
ships, and the policy around it:

- `Tokenizer.from_dir`: an HF directory with a `tokenizer.json` (used as-is) and its configs.
- `Tokenizer.from_gguf` / `from_gguf_metadata`: rebuilt from llama.cpp's `tokenizer.ggml.*` keys,
  either a SentencePiece-style vocabulary (`llama`) or a byte-level BPE one (`gpt2`).
- `stop_token_ids`: every id generation must stop on (EOS, generation_config EOS ids and the
  end-of-turn tokens of the vocabulary).
- `apply_chat_template`: the checkpoint's own jinja template, rendered like transformers does.
- `StreamDecoder`: incremental detokenization that never emits half a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from .atomic import atomic_write_text
from .errors import CheckpointError, Phi3Error

__all__ = ["Tokenizer", "StreamDecoder", "builtin_chat_template"]

TEMPLATE_DIR = Path(__file__).with_name("templates")
DEFAULT_TEMPLATE = "phi3_5"  # used when a checkpoint ships no chat template (spec §5.1 variant 3)

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# llama.cpp token types (`tokenizer.ggml.token_type`)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats we know; generation stops on any present in the vocab.
END_OF_TURN_TOKENS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer split regexes for byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`
# (the same expressions llama.cpp's llama-vocab.cpp uses for these pre-tokenizer types).
# ---------------------------------------------------------------------------------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre name -> (split regex or None for GPT-2's own, digits first split one by one?, ignore_merges)
_BYTE_LEVEL_PRES: dict[str, tuple[str | None, bool, bool]] = {
    **{name: (None, False, False) for name in ("default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de")},
    **{name: (None, True, False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                              "exaone", "minerva-7b")},
    **{name: (_LLAMA3_SPLIT, False, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                                       "smaug-bpe", "dbrx")},
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    **{name: (_GPT4O_SPLIT, False, False) for name in ("gpt-4o", "llama4")},
}


# ---------------------------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------------------------


def _gguf_list(metadata: Mapping[str, Any], key: str, source: str, length: int | None = None) -> list:
    """A required list-valued GGUF key, checked for presence and (optionally) length."""
    value = metadata.get(key)
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"{source}: GGUF metadata key {key!r} is missing or not an array")
    if length is not None and len(value) != length:
        raise CheckpointError(
            f"{source}: GGUF metadata key {key!r} has {len(value)} entries, expected {length} "
            "(one per token in tokenizer.ggml.tokens)"
        )
    return list(value)


def _gguf_token_id(metadata: Mapping[str, Any], key: str, n_tokens: int, source: str) -> int | None:
    """An optional special-token id key; out-of-range ids are an error, absent ones are None."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise CheckpointError(f"{source}: GGUF metadata {key} = {value!r} is not a token id below {n_tokens}")
    return value


# ---------------------------------------------------------------------------------------------
# Building `tokenizers` pipelines from GGUF vocabularies
# ---------------------------------------------------------------------------------------------


def sentencepiece_merges(tokens: list[str], scores: list[float], mergeable: list[bool]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary, best first.

    SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece, so
    each way of cutting a piece into two pieces that are themselves in the vocabulary is a merge,
    ranked by the piece's score (ties as transformers' converters order them). The cost is the
    total length of the vocabulary, not its square.
    """
    vocab = {token: index for index, token in enumerate(tokens) if mergeable[index]}
    merges: list[tuple[str, str, float]] = []
    for token, index in vocab.items():
        local = [
            (token[:cut], token[cut:], scores[index])
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _parse_merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` entries ("left right") as pairs."""
    pairs = []
    for number, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source}: tokenizer.ggml.merges[{number}] = {merge!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    return pairs


def _is_phi3_vocab(tokens: Iterable[str]) -> bool:
    """The Phi-3 chat vocabulary: has `<|end|>`, `<|user|>` and `<|assistant|>`."""
    return {"<|end|>", "<|user|>", "<|assistant|>"} <= set(tokens)


def _added_tokens(tokens: list[str], types: list[int], *, phi3_rstrip: bool) -> list[AddedToken]:
    """The tokens matched whole in the text, before BPE: CONTROL (special), USER_DEFINED
    (not special) and UNKNOWN-typed placeholders such as `[PAD32011]` (special).

    `phi3_rstrip` reproduces what both llama.cpp and the original Phi-3 `tokenizer.json` do: the
    chat tokens (all specials except `<unk>`, `<s>`, `<|endoftext|>`, plus `</s>`) swallow the
    whitespace that follows them.
    """
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    added = []
    for token, kind in zip(tokens, types):
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            continue
        special = kind != TOKEN_USER_DEFINED
        rstrip = phi3_rstrip and (special or token == "</s>") and token not in no_rstrip
        added.append(AddedToken(token, special=special, normalized=False, rstrip=rstrip, lstrip=False,
                                single_word=False))
    return added


def _vocab_index(tokens: list[str], source: str) -> dict[str, int]:
    """token -> id; a token listed twice would shift every later id, so it is an error."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        duplicate = next(token for token in tokens if token in seen or seen.add(token))
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens lists {duplicate!r} more than once")
    return vocab


def _add_tokens(backend: BackendTokenizer, added: list[AddedToken], source: str) -> None:
    """Register added tokens, keeping each one's `special` flag (and its existing vocabulary id)."""
    size = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    if backend.get_vocab_size(with_added_tokens=True) != size:
        raise CheckpointError(f"{source}: control/user-defined tokens do not match the vocabulary")


def _build_llama_backend(metadata: Mapping[str, Any], source: str) -> BackendTokenizer:
    """A SentencePiece-style vocabulary as byte-fallback BPE (the Llama/Phi-3 `tokenizer.json` shape)."""
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", source)
    n = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    scores = _gguf_list(metadata, "tokenizer.ggml.scores", source, n) if scores is not None else [0.0] * n
    types = metadata.get("tokenizer.ggml.token_type")
    types = _gguf_list(metadata, "tokenizer.ggml.token_type", source, n) if types is not None else [TOKEN_NORMAL] * n
    if "tokenizer.ggml.merges" in metadata:
        merges = _parse_merges(_gguf_list(metadata, "tokenizer.ggml.merges", source), source)
    else:
        merges = sentencepiece_merges(tokens, scores, [kind == TOKEN_NORMAL for kind in types])

    unk_id = _gguf_token_id(metadata, "tokenizer.ggml.unknown_token_id", n, source)
    vocab = _vocab_index(tokens, source)
    model = models.BPE(vocab, merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                       fuse_unk=True, byte_fallback=True, dropout=None)
    backend = BackendTokenizer(model)

    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
    backend.pre_tokenizer = None
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    _add_tokens(backend, _added_tokens(tokens, types, phi3_rstrip=_is_phi3_vocab(tokens)), source)
    return backend


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_pre_tokenizer(pre: str, source: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level vocabulary's `tokenizer.ggml.pre`."""
    if pre not in _BYTE_LEVEL_PRES:
        raise Phi3Error(
            f"{source}: unsupported tokenizer.ggml.pre {pre!r} for a gpt2 (byte-level BPE) tokenizer; "
            f"supported: {', '.join(sorted(_BYTE_LEVEL_PRES))}"
        )
    split, digits, ignore_merges = _BYTE_LEVEL_PRES[pre]
    if split is not None:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return (steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)), ignore_merges


def _build_gpt2_backend(metadata: Mapping[str, Any], source: str) -> BackendTokenizer:
    """A byte-level BPE vocabulary (GPT-2, SmolLM2, Llama-3 ...) with its merges."""
    tokens = _gguf_list(metadata, "tokenizer.ggml.tokens", source)
    n = len(tokens)
    types = metadata.get("tokenizer.ggml.token_type")
    types = _gguf_list(metadata, "tokenizer.ggml.token_type", source, n) if types is not None else [TOKEN_NORMAL] * n
    merges = _parse_merges(_gguf_list(metadata, "tokenizer.ggml.merges", source), source)
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre") or "default", source)

    # Every regular token is spelled in the byte alphabet; a few files store user-defined tokens
    # as raw text, so those are respelled to stay reachable by BPE.
    alphabet = set(_byte_alphabet().values())
    table = _byte_alphabet()
    spelled = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = _vocab_index(spelled, source)
    backend = BackendTokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=False, byte_fallback=False,
                                          ignore_merges=ignore_merges))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added tokens must reuse their vocabulary id: only those spelled as stored can be added.
    whole = [(t, k) for t, s, k in zip(tokens, spelled, types) if t == s]
    _add_tokens(backend, _added_tokens([t for t, _ in whole], [k for _, k in whole], phi3_rstrip=False), source)
    return backend


_GGUF_BUILDERS = {"llama": _build_llama_backend, "gpt2": _build_gpt2_backend}


# ---------------------------------------------------------------------------------------------
# BOS/EOS post-processing
# ---------------------------------------------------------------------------------------------


def _special_ids_added(backend: BackendTokenizer) -> list[int]:
    """The ids `encode("", add_special_tokens=True)` produces: what the post-processor adds."""
    return backend.encode("", add_special_tokens=True).ids


def _bos_eos_processor(bos: str, bos_id: int, eos: str, eos_id: int, add_bos: bool, add_eos: bool) -> Any:
    """A TemplateProcessing post-processor adding BOS/EOS around each sequence (Llama style).

    Built from its JSON form, which (unlike the "<s>:0" string form) allows any token text.
    """
    def segment(sequence: str, type_id: int) -> list[dict]:
        special = [{"SpecialToken": {"id": token, "type_id": type_id}} for token in (bos, eos)]
        return special[:1] * add_bos + [{"Sequence": {"id": sequence, "type_id": type_id}}] + special[1:] * add_eos

    used = [(token, token_id) for token, token_id, on in ((bos, bos_id, add_bos), (eos, eos_id, add_eos)) if on]
    state = {
        "type": "TemplateProcessing",
        "single": segment("A", 0),
        "pair": segment("A", 0) + segment("B", 1),
        "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]} for token, token_id in used},
    }
    processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    processor.__setstate__(json.dumps(state).encode())
    return processor


def _set_bos_eos(backend: BackendTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """Make `encode(..., add_special_tokens=True)` add exactly BOS and/or EOS (as transformers'
    LlamaTokenizerFast does for `add_bos_token`/`add_eos_token`)."""
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None
    if _special_ids_added(backend) != [bos_id] * add_bos + [eos_id] * add_eos:
        backend.post_processor = _bos_eos_processor(bos, bos_id, eos, eos_id, add_bos, add_eos)


# ---------------------------------------------------------------------------------------------
# HF directory configs
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """A JSON object file's content, or {} if it does not exist; anything else is a CheckpointError."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_text(path: Path) -> str | None:
    """A text file's content, or None if it does not exist."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_ids(value: Any) -> list[int]:
    """`eos_token_id`-style values (an int, a list of ints, or null) as a list."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's `chat_template`: a string, or a list of named templates ("default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------


def builtin_chat_template(name: str) -> str:
    """One of the templates shipped in phi3/templates (`phi3_mini_4k`, `phi3_5`)."""
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise Phi3Error(f"unknown chat template {name!r}; built-in templates: {', '.join(known)}")
    return path.read_text(encoding="utf-8").rstrip("\n")


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: no HTML escaping, unicode kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """A jinja2 template compiled in a sandbox configured like transformers' chat templating."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages: Any) -> None:
    """Messages must be a list of {"role": str, "content": str, ...} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise Phi3Error(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise Phi3Error(f"chat message {number} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise Phi3Error(f"chat message {number} has no valid 'role' (got {role!r})")
        if not isinstance(content, str):
            raise Phi3Error(f"chat message {number} ({role}) needs a string 'content', got {content!r}")


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool,
                         special_tokens: Mapping[str, str | None], **kwargs: Any) -> str:
    """Render `template` the way transformers' `apply_chat_template(tokenize=False)` does."""
    from jinja2 import TemplateError

    _check_messages(messages)
    try:
        compiled = _compile_template(template)
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **{k: v for k, v in special_tokens.items() if v is not None}, **kwargs)
    except _TemplateRaised as exc:
        raise Phi3Error(f"the chat template rejected these messages: {exc}") from exc
    except TemplateError as exc:
        raise Phi3Error(f"chat template failed: {exc}") from exc
    except (TypeError, KeyError, AttributeError) as exc:
        raise Phi3Error(f"chat template failed on these messages: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special tokens, stop ids and chat template."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 extra_stop_ids: Iterable[int] = (), source: str = "<memory>") -> None:
        self._backend = backend
        self.source = source
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        self.chat_template = chat_template
        added = _special_ids_added(backend)
        self.add_bos_token = self.bos_token_id is not None and added[:1] == [self.bos_token_id]
        self.add_eos_token = self.eos_token_id is not None and added[-1:] == [self.eos_token_id]
        self.stop_token_ids = self._stop_ids(extra_stop_ids)
        self._byte_ids: frozenset[int] | None = None
        self.gguf_metadata: dict[str, Any] | None = None  # set when read from a GGUF

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _stop_ids(self, extra: Iterable[int]) -> frozenset[int]:
        """EOS, the extra (generation_config) EOS ids, and end-of-turn tokens of the vocabulary."""
        names = list(END_OF_TURN_TOKENS)
        if self.token_to_id("<|end|>") is not None and self.token_to_id("<|assistant|>") is not None:
            names.append("<|assistant|>")  # Phi-3: a new assistant turn also ends the answer
        ids = {self.token_to_id(name) for name in names} | set(extra) | {self.eos_token_id}
        return frozenset(i for i in ids if i is not None)

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """An HF checkpoint directory: `tokenizer.json` plus whatever configs are present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"no tokenizer.json in {path} (only fast-tokenizer checkpoints are supported)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON/unknown fields
            raise CheckpointError(f"cannot load {tokenizer_file}: {exc}") from exc

        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        model_config = _read_json(path / "config.json")

        def special(name: str) -> str | None:
            token = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if token is None:  # fall back to the id in generation_config.json / config.json
                ids = _int_ids(generation.get(f"{name}_id")) or _int_ids(model_config.get(f"{name}_id"))
                token = backend.id_to_token(ids[0]) if ids else None
            return token

        tokens = {name: special(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos(backend, tokens["bos_token"], tokens["eos_token"],
                         bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        template = (_pick_template(config.get("chat_template"))
                    or _read_text(path / "chat_template.jinja")
                    or _pick_template(_read_json(path / "chat_template.json").get("chat_template")))
        extra = _int_ids(generation.get("eos_token_id")) + _int_ids(model_config.get("eos_token_id"))
        return cls(backend, **tokens, chat_template=template, extra_stop_ids=extra, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf>") -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes from its `tokenizer.*` metadata keys."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind not in _GGUF_BUILDERS:
            raise Phi3Error(
                f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: {', '.join(sorted(_GGUF_BUILDERS))}"
            )
        backend = _GGUF_BUILDERS[kind](metadata, source)
        tokens = metadata["tokenizer.ggml.tokens"]
        n = len(tokens)

        def special(key: str) -> str | None:
            token_id = _gguf_token_id(metadata, f"tokenizer.ggml.{key}", n, source)
            return None if token_id is None else backend.id_to_token(token_id)

        named = {
            "bos_token": special("bos_token_id"),
            "eos_token": special("eos_token_id"),
            "pad_token": special("padding_token_id"),
            "unk_token": special("unknown_token_id"),
        }
        # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise, never to gpt2.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(backend, named["bos_token"], named["eos_token"], add_bos, add_eos)
        eot = _gguf_token_id(metadata, "tokenizer.ggml.eot_token_id", n, source)
        template = metadata.get("tokenizer.chat_template")
        tok = cls(backend, **named, chat_template=template if isinstance(template, str) else None,
                  extra_stop_ids=[eot] if eot is not None else [], source=source)
        # kept so that a GGUF export writes the vocabulary back exactly as it was read
        tok.gguf_metadata = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
        return tok

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer embedded in a GGUF file."""
        from .gguf import parse_gguf

        return cls.from_gguf_metadata(parse_gguf(path).metadata, source=str(path))

    # -- basic API ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (may be below the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the `<0xNN>` byte pieces when the model falls back to bytes (empty otherwise)."""
        if self._byte_ids is None:
            ids: set[int] = set()
            if getattr(self._backend.model, "byte_fallback", False):
                ids = {self.token_to_id(f"<0x{byte:02X}>") for byte in range(256)} - {None}
            self._byte_ids = frozenset(ids)
        return self._byte_ids

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are matched whole.
        With `add_special_tokens`, BOS (and EOS) are added as the checkpoint asks."""
        if not isinstance(text, str):
            raise Phi3Error(f"can only encode a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (ids outside the vocabulary are dropped)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:  # noqa: A002 - the public API name
        return self._backend.id_to_token(int(id))

    def stream_decoder(self, skip_special_tokens: bool = False, context_ids=()) -> StreamDecoder:
        """An incremental decoder for streaming generated tokens.

        `context_ids` (the end of the prompt) makes the output a continuation of that text: a
        SentencePiece word piece then keeps its leading space (" blue" after "The sky is"),
        whereas without context the first piece's space is stripped, as in a full decode.
        """
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"stop_token_ids={sorted(self.stop_token_ids)})")

    # -- chat --------------------------------------------------------------------------------

    @property
    def effective_chat_template(self) -> str:
        """The checkpoint's template, or the built-in Phi-3.5 one when it ships none."""
        return self.chat_template if self.chat_template is not None else builtin_chat_template(DEFAULT_TEMPLATE)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), rendered with the
        checkpoint's jinja template (or the Phi-3.5 one). Extra kwargs become template variables."""
        template = kwargs.pop("chat_template", None) or self.effective_chat_template
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "pad_token": self.pad_token, "unk_token": self.unk_token}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=specials, **kwargs)

    # -- saving ------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)
        so that transformers' AutoTokenizer loads the same tokenizer."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Phi3Error(f"cannot create tokenizer directory {path}: {exc}") from exc
        specials = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                     ("pad_token", self.pad_token), ("unk_token", self.unk_token))
                    if value is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.effective_chat_template,
        }
        atomic_write_text(path / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(path / "special_tokens_map.json", json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    Each `push` decodes a small window (the tokens already emitted since the previous emission,
    plus the new ones) and returns only the new text, so SentencePiece's leading-space rule and
    the byte-level alphabet are handled exactly as in a full `decode`. Nothing is emitted while
    the newest text ends in an incomplete UTF-8 sequence (it decodes to U+FFFD), nor while the
    newest token is a byte-fallback piece (`<0xNN>`): `decode` turns a whole run of those into
    U+FFFDs when any byte in it is invalid, so text from such a run is final only once the run
    ends. The concatenation of every `push` plus `flush` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, context_ids=()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in context_ids]  # context: decoded for spacing, never emitted
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # tokens before this have been emitted
        self._byte_ids = tokenizer.byte_fallback_ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" if none yet)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._byte_ids:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    @property
    def ids(self) -> list[int]:
        """Every id seen so far (context included)."""
        return list(self._ids)

"""Tests for phi3.tokenizer: llama.cpp test vectors, transformers parity, chat templates,
stop tokens, streaming and error messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from phi3.errors import CheckpointError, Phi3Error
from phi3.gguf import parse_gguf
from phi3.tokenizer import Tokenizer, builtin_chat_template

from .conftest import SHARED

VOCABS = SHARED / "tokenizer"
SEPARATOR = "\n__ggml_vocab_test__\n"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def load_cases(name: str) -> list[tuple[str, list[int]]]:
    """The (text, expected ids) pairs of ggml-vocab-{name}.gguf.inp/.out."""
    inp = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    out = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    texts = inp.split(SEPARATOR)
    if texts and texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = out.split("\n")[: len(texts)]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def case_params(name: str) -> list:
    return [pytest.param(text, ids, id=f"{name}-{n:02d}") for n, (text, ids) in enumerate(load_cases(name))]


@pytest.fixture(scope="module")
def phi3_metadata() -> dict:
    return parse_gguf(VOCABS / "ggml-vocab-phi-3.gguf").metadata


@pytest.fixture(scope="module")
def phi3_tok(phi3_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(phi3_metadata, source="ggml-vocab-phi-3.gguf")


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return Tokenizer.from_gguf(VOCABS / "ggml-vocab-gpt-2.gguf")


@pytest.fixture(scope="module")
def smol_gguf(default_gguf) -> Path:
    return default_gguf


@pytest.fixture(scope="module")
def smol_tok(smol_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smol_gguf)


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --- llama.cpp test vectors --------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", case_params("phi-3"))
def test_phi3_vocab_vectors(phi3_tok, text, expected):
    ids = phi3_tok.encode(text)
    assert ids == expected
    assert phi3_tok.decode(ids) == text


@pytest.mark.parametrize("text, expected", case_params("gpt-2"))
def test_gpt2_vocab_vectors(gpt2_tok, text, expected):
    ids = gpt2_tok.encode(text)
    assert ids == expected
    assert gpt2_tok.decode(ids) == text


def test_vector_files_have_46_cases():
    for name in ("phi-3", "gpt-2"):
        if (VOCABS / f"ggml-vocab-{name}.gguf.inp").is_file():
            assert len(load_cases(name)) == 46


# --- GGUF metadata and construction ------------------------------------------------------------


def test_metadata_reader_matches_gguf_reader():
    import gguf
    path = VOCABS / "ggml-vocab-phi-3.gguf"
    ours = parse_gguf(path).metadata
    reference = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert ours == reference


def test_builds_fast(phi3_metadata, smol_gguf):
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(phi3_metadata)
    assert time.perf_counter() - start < 2.0
    metadata = parse_gguf(smol_gguf).metadata
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(metadata)
    assert time.perf_counter() - start < 2.0


def test_phi3_special_tokens_and_stop_ids(phi3_tok):
    assert phi3_tok.vocab_size == 32064
    assert (phi3_tok.bos_token_id, phi3_tok.eos_token_id, phi3_tok.pad_token_id) == (1, 32000, 32000)
    assert phi3_tok.add_bos_token is True
    assert phi3_tok.stop_token_ids == frozenset({32000, 32001, 32007})
    assert phi3_tok.token_to_id("<|user|>") == 32010
    assert phi3_tok.id_to_token(32007) == "<|end|>"
    assert phi3_tok.token_to_id("<|no such token|>") is None


def test_phi3_chat_tokens_are_single_tokens(phi3_tok):
    # `<|user|>`, `<|end|>`, `<|assistant|>` swallow the newline after them (rstrip, as in the
    # original Phi-3 tokenizer.json and llama.cpp); `<|endoftext|>` does not.
    ids = phi3_tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert ids == [32010, phi3_tok.encode("Hi")[0], 32007, 32001]
    assert phi3_tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=True)[0] == 1
    assert phi3_tok.encode("x<|endoftext|>\ny")[1:4] == [32000, 29871, 13]
    assert phi3_tok.decode(ids, skip_special_tokens=True) == "Hi"


def test_gpt2_vocab_defaults(gpt2_tok):
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.add_bos_token is False
    assert gpt2_tok.encode("Hello", add_special_tokens=True) == gpt2_tok.encode("Hello")
    assert gpt2_tok.stop_token_ids == frozenset({50256})
    assert gpt2_tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_smollm_stop_ids_and_specials(smol_tok):
    assert smol_tok.vocab_size == 49152
    assert smol_tok.eos_token == "<|im_end|>"
    assert smol_tok.add_bos_token is False
    assert smol_tok.stop_token_ids == frozenset({0, 2})


def test_unsupported_gguf_model_named():
    with pytest.raises(Phi3Error, match="rwkv"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


def test_unsupported_gguf_pre_named():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "made-up-pre",
                "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(Phi3Error, match="made-up-pre"):
        Tokenizer.from_gguf_metadata(metadata)


def test_gguf_missing_tokens_named():
    with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})


def tiny_llama_metadata(**overrides) -> dict:
    tokens = ["<unk>", "<bos:x>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
        "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(overrides)
    return metadata


def test_tiny_llama_vocab_from_metadata():
    tok = Tokenizer.from_gguf_metadata(tiny_llama_metadata())
    assert tok.encode("ab") == [8]
    assert tok.encode("ab a", add_special_tokens=True) == [1, 8, 6]  # a BOS text with ':' works
    assert tok.encode("abc") == [8, 0]  # no byte pieces in this vocab: <unk>
    assert tok.decode([8, 6]) == "ab a"
    assert tok.stop_token_ids == frozenset({2})
    no_prefix = Tokenizer.from_gguf_metadata(tiny_llama_metadata(**{"tokenizer.ggml.add_space_prefix": False,
                                                                    "tokenizer.ggml.add_bos_token": False}))
    assert no_prefix.encode("ab", add_special_tokens=True) == [7]
    assert no_prefix.decode([8]) == " ab"


def test_duplicate_gguf_token_named():
    metadata = tiny_llama_metadata()
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"][:-1] + ["ab"]
    with pytest.raises(CheckpointError, match="'ab' more than once"):
        Tokenizer.from_gguf_metadata(metadata)


def test_bad_gguf_special_id_named():
    with pytest.raises(CheckpointError, match="tokenizer.ggml.eos_token_id"):
        Tokenizer.from_gguf_metadata(tiny_llama_metadata(**{"tokenizer.ggml.eos_token_id": 99}))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(CheckpointError, match="x.gguf"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(CheckpointError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


# --- parity with transformers ------------------------------------------------------------------

SMOL_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 1234567\n",
    "emoji 🦙🚀 😶\u200d🌫️ ✅ and 你好, Привет",
    "<|im_start|>user\nHi<|im_end|>\n",
    "   spaces\t\ttabs\n\n\nnewlines 3.14159",
]


def test_smollm_matches_transformers_gguf(smol_gguf, smol_tok):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    for text in SMOL_TEXTS:
        assert smol_tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert smol_tok.encode(text, add_special_tokens=True) == hf.encode(text), text
        assert smol_tok.decode(smol_tok.encode(text)) == text


@pytest.mark.parametrize("which", ["phi3", "gpt2", "smol"])
def test_save_pretrained_roundtrips_through_transformers(which, request, tmp_path):
    import transformers
    tok = request.getfixturevalue(f"{which}_tok")
    tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] == tok.add_bos_token
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [text for text, _ in load_cases("phi-3")] + SMOL_TEXTS + ["<|user|>\nHi<|end|>\n<|assistant|>\n"]
    for text in texts:
        for special in (False, True):
            assert tok.encode(text, special) == hf.encode(text, add_special_tokens=special), text
    for generation_prompt in (True, False):
        ours = tok.apply_chat_template(CHAT, add_generation_prompt=generation_prompt)
        theirs = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs
    # ... and our own loader reads it back the same
    again = Tokenizer.from_dir(tmp_path)
    assert again.stop_token_ids == tok.stop_token_ids
    assert again.add_bos_token == tok.add_bos_token
    assert [again.encode(t, True) for t in texts] == [tok.encode(t, True) for t in texts]


# --- HF directories ----------------------------------------------------------------------------


def test_from_dir_reads_configs(phi3_tok, tmp_path):
    phi3_tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, chat_template=None,
                  bos_token={"__type": "AddedToken", "content": "<s>", "special": True})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32001, 32007, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 1 and tok.add_bos_token is False
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")
    assert tok.stop_token_ids == frozenset({32000, 32001, 32007, 5})
    assert tok.chat_template is None  # falls back to the built-in Phi-3.5 template
    assert tok.apply_chat_template(CHAT[1:2]) == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_from_dir_chat_template_jinja_file(phi3_tok, tmp_path):
    phi3_tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT[:2]) == "[Be brief.][Hi]"


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_garbage_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(CheckpointError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_garbage_config_named(phi3_tok, tmp_path):
    phi3_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_save_pretrained_leaves_no_temp_files(gpt2_tok, tmp_path):
    gpt2_tok.save_pretrained(tmp_path / "out")
    gpt2_tok.save_pretrained(tmp_path / "out")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


# --- chat templates (golden strings written out from spec §5.1 by hand) ------------------------


def test_phi3_mini_4k_template(phi3_tok):
    expected = "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    assert phi3_tok.chat_template == builtin_chat_template("phi3_mini_4k")  # the GGUF ships this one
    assert phi3_tok.apply_chat_template(CHAT) == expected  # system message dropped
    assert phi3_tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected


def test_phi3_5_template_is_the_fallback(phi3_metadata):
    metadata = {k: v for k, v in phi3_metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(metadata)
    assert tok.chat_template is None
    body = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
    assert tok.apply_chat_template(CHAT) == body + "<|assistant|>\n"
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == body + "<|endoftext|>"
    no_system = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(no_system) == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    explicit = tok.apply_chat_template(CHAT, chat_template=builtin_chat_template("phi3_5"))
    assert explicit == body + "<|assistant|>\n"


def test_smollm_template_from_gguf(smol_tok):
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol_tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == expected


@pytest.mark.parametrize("messages", [
    "Hi",
    [{"role": "user"}],
    [{"content": "Hi"}],
    [{"role": "user", "content": 3}],
    ["Hi"],
])
def test_bad_messages(phi3_tok, messages):
    with pytest.raises(Phi3Error, match="message"):
        phi3_tok.apply_chat_template(messages)


def test_template_raise_exception_becomes_phi3_error(phi3_tok):
    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(Phi3Error, match="unknown role tool"):
        phi3_tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=template)


def test_template_is_sandboxed(phi3_tok):
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Phi3Error):
        phi3_tok.apply_chat_template(CHAT, chat_template=template + "{{ ''.__class__.__subclasses__() }}")


def test_template_extra_variables_and_trim_blocks(phi3_tok):
    template = ("{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
                "U:{{ m['content'] | tojson }}{{ suffix }}\n    {% endif %}\n{% endfor %}")
    assert phi3_tok.apply_chat_template(CHAT, chat_template=template, suffix=";") == 'U:"Hi";\nU:"2+2?";\n'


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["phi3", "gpt2"])
def test_stream_decoder_matches_decode(vocab, request):
    tok = request.getfixturevalue(f"{vocab}_tok")
    texts = [text for text, _ in load_cases("phi-3" if vocab == "phi3" else "gpt-2")]
    texts.append("<|user|>\nHi 🦙<|end|>\n<|assistant|>\n😁 ok<|end|>")
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True)
        for skip in (False, True):
            chunks = stream(tok, ids, skip)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in chunk for chunk in chunks), (text, chunks)


def test_stream_decoder_waits_for_whole_characters(phi3_tok, gpt2_tok):
    ids = phi3_tok.encode("🦙")  # "▁" then four byte-fallback pieces
    assert [phi3_tok.id_to_token(i) for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    decoder = phi3_tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "", "", ""]
    assert decoder.flush() == "🦙"
    chunks = stream(phi3_tok, phi3_tok.encode("🦙 ok"))
    assert chunks[-2:] == ["🦙 ok", ""]  # the byte run is final once a regular token follows
    ids = gpt2_tok.encode(" 🦙!")
    assert len(ids) > 2
    chunks = stream(gpt2_tok, ids)
    assert chunks[0] == "" and "".join(chunks) == " 🦙!"
    assert all("\ufffd" not in c for c in chunks)


def test_stream_decoder_leading_space(phi3_tok):
    ids = phi3_tok.encode("Hello world")
    assert stream(phi3_tok, ids) == ["Hello", " world", ""]
    ids = phi3_tok.encode("  Hello")  # first token "▁▁": one space survives, as in decode
    assert "".join(stream(phi3_tok, ids)) == phi3_tok.decode(ids) == "  Hello"


def test_stream_decoder_random_ids_match_decode(phi3_tok):
    import random

    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(259, 32064), 29871])
               for _ in range(rng.randrange(1, 12))]
        assert "".join(stream(phi3_tok, ids)) == phi3_tok.decode(ids), ids

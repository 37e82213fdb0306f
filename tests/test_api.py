"""The Python API and the text-level generator: chat template + stop tokens + stop strings + streaming."""

import pytest
import torch

from phi3.api import LanguageModel, load
from phi3.checkpoint import build_model, save_hf_checkpoint
from phi3.config import ModelConfig
from phi3.errors import CheckpointError, Phi3Error
from phi3.tokenizer import Tokenizer

from .conftest import SHARED, scaled_down

HELLO, WORLD, BANG = 15043, 3186, 29991  # "▁Hello", "▁world", "!" in the Phi-3 vocabulary
USER, ASSISTANT, END, ENDOFTEXT = 32010, 32001, 32007, 32000


def chain_model(chain: list[int]) -> torch.nn.Module:
    """A Phi-3 whose greedy output is fixed: each token of `chain` is followed by the next one.

    The layers' output projections are zero, so the final hidden state is the normalised embedding
    of the current token; token chain[i] embeds as the basis vector e_i and lm_head row chain[i+1]
    is 10·e_i. These are real weights in the real model, not a stub.
    """
    hf = dict(scaled_down("phi-3-mini-4k-instruct", vocab=32064, original=64),
              bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    cfg = ModelConfig.from_hf_dict(hf)
    model = build_model(cfg, {k: torch.zeros(v.shape) for k, v in
                              _shapes(cfg).items()}, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if not name.endswith("layernorm.weight") and name != "model.norm.weight" else p.fill_(1.0)
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[a, i] = 1.0
            model.lm_head.weight[b, i] = 10.0
    return model


def _shapes(cfg):
    with torch.device("meta"):
        from phi3.models.phi3 import Phi3ForCausalLM
        return Phi3ForCausalLM(cfg).state_dict()


@pytest.fixture(scope="module")
def phi3_tok():
    return Tokenizer.from_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf")


@pytest.mark.parametrize("stop", [END, ENDOFTEXT, ASSISTANT])
def test_chat_stops_on_each_phi3_stop_token(phi3_tok, stop):
    lm = LanguageModel(chain_model([ASSISTANT, HELLO, WORLD, BANG, stop, HELLO]), phi3_tok, "chain")
    prompt = lm.chat_prompt("Hi")
    assert prompt[-1] == ASSISTANT and USER in prompt
    result = lm.complete_ids([prompt], max_new_tokens=20)[0]
    assert (result.text, result.finish_reason) == ("Hello world!", "stop")
    assert result.token_ids == [HELLO, WORLD, BANG]  # the stop token itself is not part of the reply
    assert "".join(lm.chat_stream("Hi", max_new_tokens=20)) == "Hello world!"


def test_length_finish_and_stop_strings(phi3_tok):
    lm = LanguageModel(chain_model([ASSISTANT, HELLO, WORLD, BANG, END]), phi3_tok, "chain")
    prompt = lm.chat_prompt("Hi")
    short = lm.complete_ids([prompt], max_new_tokens=2)[0]
    assert (short.text, short.finish_reason) == ("Hello world", "length")
    cut = lm.complete_ids([prompt], max_new_tokens=20, stop_strings=("o w",))[0]
    assert (cut.text, cut.finish_reason) == ("Hell", "stop")
    # the streamed pieces never show a stop string or a part of it that is then cut
    pieces = [d.text for d in lm.stream_ids(prompt, max_new_tokens=20, stop_strings=("d!",))]
    assert "".join(pieces) == "Hello worl" and all("d" not in p for p in pieces)


def test_batched_generate_matches_single(phi3_tok):
    lm = LanguageModel(chain_model([HELLO, WORLD, BANG, END]), phi3_tok, "chain")
    both = lm.complete_ids([[USER, HELLO], [WORLD]], max_new_tokens=5, continuation=True)
    assert [c.text for c in both] == [" world!", "!"]  # continuations keep the leading space
    assert lm.generate(["Hello", "Hello world"], max_new_tokens=5) == [" world!", "!"]
    assert lm.complete_ids([[USER, HELLO]], max_new_tokens=5)[0].text == "world!"  # a fresh reply does not
    assert [c.finish_reason for c in both] == ["stop", "stop"]


def test_hf_directory_with_tokenizer_loads_through_the_api(tmp_path, phi3_tok):
    model = chain_model([ASSISTANT, HELLO, WORLD, END])
    save_hf_checkpoint(model, tmp_path, tokenizer=phi3_tok)
    lm = load(tmp_path)
    assert lm.chat("Hi") == "Hello world"
    assert lm.tokenizer.stop_token_ids == {32000, 32001, 32007}


def test_bad_model_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.bin: not a GGUF file"):
        load(junk)
    with pytest.raises(Phi3Error, match="could not get 'nobody/no-such-model' from the Hugging Face Hub"):
        load("nobody/no-such-model")


def _longrope_phi3_gguf(path):
    """A scaled-down LongRoPE phi-3 with the Phi-3 vocabulary, as Q8_0 GGUF (norms and factors in F32)."""
    from phi3.gguf_export import write_gguf
    from .conftest import random_phi3
    hf = scaled_down("phi-3-mini-128k-instruct", vocab=32064, head_dim=32, original=64)
    model = random_phi3(hf, 0.2)
    return write_gguf(model, Tokenizer.from_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf"), path, "q8_0")


@pytest.mark.parametrize("source", ["default", "longrope-q8_0"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_gguf_to_hf_writes_what_load_then_save_writes_a_tensor_at_a_time(source, dtype, default_gguf, tmp_path,
                                                                          monkeypatch):
    """`phi3 convert model.gguf dir/` streams each tensor from the file to the safetensors file: the
    same directory as loading the dequantized model and saving it (every tensor, dtype, config and
    tokenizer file), while no dequantized tensor outlives its write."""
    import json
    import weakref

    from safetensors.torch import load_file

    import phi3.gguf
    from phi3.api import convert_gguf_to_hf
    from phi3.cli import main

    src = default_gguf if source == "default" else _longrope_phi3_gguf(tmp_path / "longrope.gguf")
    lm = load(src, dtype, dequantize=True)
    save_hf_checkpoint(lm.model, tmp_path / "saved", tokenizer=lm.tokenizer, dtype=dtype)
    del lm

    produced = []
    real = phi3.gguf.dequantize

    def dequantize(*args, **kwargs):
        assert all(r() is None for r in produced), "an earlier tensor is still held"
        out = real(*args, **kwargs)
        produced.append(weakref.ref(out))
        return out
    monkeypatch.setattr(phi3.gguf, "dequantize", dequantize)
    assert main(["convert", str(src), str(tmp_path / "streamed")] + (["--dtype", dtype] if dtype else [])) == 0
    assert len(produced) > 10

    saved, streamed = tmp_path / "saved", tmp_path / "streamed"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in streamed.iterdir())
    a, b = load_file(saved / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((saved / name).read_text()) == json.loads((streamed / name).read_text())
    for p in saved.iterdir():
        if p.suffix != ".safetensors" and p.name not in ("config.json", "generation_config.json"):
            assert p.read_bytes() == (streamed / p.name).read_bytes(), p.name
    with pytest.raises(CheckpointError, match="missing.gguf: no such GGUF file"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "x")

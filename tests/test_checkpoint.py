"""HF checkpoints in and out: transformers loads what we write; we load what transformers writes; bad files are named."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from phi3.checkpoint import build_model, load_hf_checkpoint, save_hf_checkpoint
from phi3.config import ModelConfig
from phi3.errors import CheckpointError, ConfigError

from .conftest import PRESETS, scaled_down


def _ids(vocab=160, t=40):
    return torch.randint(0, vocab, (2, t))


@pytest.fixture
def phi3_pair():
    hf_cfg = scaled_down("phi-3-mini-128k-instruct")
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).eval()
    return ref, build_model(ModelConfig.from_hf_dict(hf_cfg), ref.state_dict(), torch.float32)


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 60_000])
def test_our_export_loads_in_transformers(tmp_path, phi3_pair, shard_bytes):
    ref, ours = phi3_pair
    save_hf_checkpoint(ours, tmp_path, max_shard_bytes=shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes < 1e6)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Phi3ForCausalLM"
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), ours(ids))
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_we_load_what_transformers_writes(tmp_path, phi3_pair):
    ref, ours = phi3_pair
    ref.save_pretrained(tmp_path)
    loaded = load_hf_checkpoint(tmp_path, dtype="float32")
    ids = _ids()
    with torch.no_grad():
        assert (loaded(ids) - ref(ids).logits).abs().max() < 1e-4


def test_bf16_export_roundtrip(tmp_path, phi3_pair):
    _, ours = phi3_pair
    save_hf_checkpoint(ours, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))


def test_llama_layout_maps_onto_phi3_and_back(tmp_path):
    """A Llama checkpoint (separate q/k/v, gate/up, tied head) runs on the Phi-3 module and exports as Llama."""
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.1)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "src")
    ours = load_hf_checkpoint(tmp_path / "src")
    assert ours.config.layout == "llama" and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4
    save_hf_checkpoint(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, phi3_pair):
    save_hf_checkpoint(phi3_pair[1], tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_checkpoint(saved)


def test_wrong_shape_is_named(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \[3, 3\], expected \[64, 64\]"):
        load_hf_checkpoint(saved)


def test_truncated_safetensors_is_named(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_hf_checkpoint(saved)


def test_missing_shard_is_named(tmp_path, phi3_pair):
    save_hf_checkpoint(phi3_pair[1], tmp_path, max_shard_bytes=60_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is missing"):
        load_hf_checkpoint(tmp_path)


def test_unknown_architecture_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'gpt_neox'"):
        load_hf_checkpoint(saved)


def test_unreadable_and_invalid_config_are_named(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: unreadable config"):
        load_hf_checkpoint(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": "big"}))
    with pytest.raises(ConfigError, match=r"field 'hidden_size' must be int, got 'big'"):
        load_hf_checkpoint(saved)


def test_bad_factor_list_length_is_named():
    cfg = scaled_down("phi-3.5-mini-instruct")
    cfg["rope_scaling"]["long_factor"] = cfg["rope_scaling"]["long_factor"][:-1]
    with pytest.raises(ConfigError, match=r"rope_scaling\.long_factor must be a list of 8 numbers"):
        ModelConfig.from_hf_dict(cfg)


def test_legacy_su_means_longrope():
    cfg = scaled_down("phi-3-mini-128k-instruct")
    su = ModelConfig.from_hf_dict(dict(cfg, rope_scaling=dict(cfg["rope_scaling"], type="su")))
    assert su.rope_scaling == ModelConfig.from_hf_dict(cfg).rope_scaling
    assert abs(__import__("phi3.config").config.longrope_attention_factor(su) - 1.4142135623730951) < 1e-12


def test_cli_error_is_one_line_without_traceback(saved):
    (saved / "config.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "phi3.cli", "info", str(saved)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "config.json" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_auto_dtype_is_fp32_for_small_models_and_for_mostly_quantized_checkpoints():
    """A 3.8B checkpoint runs in its own dtype (bf16), unless almost all of it is quantized: then
    fp32 activations between the quantized matmuls (as llama.cpp), and the native decode step."""
    from phi3.checkpoint import default_dtype
    mini = ModelConfig.from_hf_dict(json.loads((PRESETS / "phi-3-mini-4k-instruct.json").read_text()))
    n = mini.num_parameters()
    assert default_dtype(mini, None) == torch.bfloat16
    assert default_dtype(mini, None, dense_params=mini.hidden_size * 65) == torch.float32  # the norms
    assert default_dtype(mini, None, dense_params=n // 5) == torch.bfloat16  # e.g. a dense vocabulary table
    assert default_dtype(mini, "float16", dense_params=0) == torch.float16  # asked for
    small = ModelConfig.from_hf_dict(scaled_down("phi-3-mini-4k-instruct"))
    assert default_dtype(small, None) == torch.float32


def test_dense_parameters_of_a_gguf_counts_what_loads_dense(default_gguf):
    """The embedded SmolLM2 GGUF: Q4/Q8 layers load quantized, and so does its Q8_0 token table
    (tied to the head: a quantized embedding and a quantized head of the same blocks); only the
    norms load dense."""
    import phi3
    from phi3.gguf import dense_parameters, read_gguf
    from phi3 import cpu_kernels
    from phi3.quant import Int8Embedding, Int8Linear, TiedEmbedding
    f = read_gguf(default_gguf)
    norms = 576 * (2 * 30 + 1)
    assert dense_parameters(f) == norms
    model = phi3.load(default_gguf).model
    table = model.model.embed_tokens
    # on the native kernels the table is the head's blocks, held once; else an int8 table of its own
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(table, TiedEmbedding if cpu_kernels.library() is not None else Int8Embedding)
    assert torch.equal(model.lm_head.dequantize(), table.dequantize())


@pytest.mark.parametrize("preset,vocab", [("phi-3-mini-128k-instruct", 32064), ("phi-4-mini-instruct", 200064)])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float32"])
def test_hf_to_hf_conversion_writes_what_load_then_save_writes(preset, vocab, dtype, tmp_path, monkeypatch):
    """`phi3 convert dir/ out/ [--dtype D]` casts a tensor at a time from the mapped files: the same
    directory as loading the model and saving it (sharded source, tied or not), with every tensor
    freed once written; a quantized source takes the load path."""
    import weakref

    import phi3.checkpoint
    from phi3.api import load
    from phi3.cli import main
    from phi3.tokenizer import Tokenizer

    from .conftest import SHARED, random_phi3
    hf = scaled_down(preset, vocab=vocab if preset.startswith("phi-3") else 160)
    model = random_phi3(hf, 0.1, torch.bfloat16)
    vocab_file = "ggml-vocab-phi-3.gguf"
    tok = Tokenizer.from_gguf(SHARED / "tokenizer" / vocab_file)
    save_hf_checkpoint(model, tmp_path / "src", tokenizer=tok, max_shard_bytes=200_000)
    lm = load(tmp_path / "src", dtype)
    save_hf_checkpoint(lm.model, tmp_path / "saved", tokenizer=lm.tokenizer, dtype=dtype)
    del lm

    produced, real = [], phi3.checkpoint._mapped_tensor

    def mapped(*args):
        assert all(r() is None for r in produced), "an earlier tensor is still held"
        t = real(*args)
        produced.append(weakref.ref(t))
        return t
    monkeypatch.setattr(phi3.checkpoint, "_mapped_tensor", mapped)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "streamed")] + (["--dtype", dtype] if dtype else [])) == 0
    saved, streamed = tmp_path / "saved", tmp_path / "streamed"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in streamed.iterdir())
    a = {k: v for f in sorted(saved.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(streamed.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(a) == set(b) and len(produced) == len(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for p in saved.iterdir():
        if p.suffix != ".safetensors":
            assert json.loads(p.read_text()) == json.loads((streamed / p.name).read_text()), p.name


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, phi3_pair, monkeypatch):
    """Writing into a directory that holds a sharded checkpoint: a failure in the second shard (disk
    full) leaves every previous file as it was — never new and old shards mixed — and nothing
    temporary; a later write with fewer shards removes the previous shards it no longer uses."""
    import phi3.safetensors_writer
    _, first = phi3_pair
    save_hf_checkpoint(first, tmp_path, max_shard_bytes=60_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len([n for n in before if n.endswith(".safetensors")]) >= 3
    second = build_model(first.config, {k: v + 1 for k, v in first.state_dict().items()}, torch.float32)
    real, seen = phi3.safetensors_writer._check, []

    def fail_in_second_shard(entry, t):
        seen.append(entry.name)
        if len(seen) > len(load_file(tmp_path / sorted(n for n in before if n.startswith("model-"))[0])):
            raise OSError(28, "No space left on device")
        return real(entry, t)
    monkeypatch.setattr(phi3.safetensors_writer, "_check", fail_in_second_shard)
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: could not write .*No space left"):
        save_hf_checkpoint(second, tmp_path, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    save_hf_checkpoint(second, tmp_path)  # one file now
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), second(ids))

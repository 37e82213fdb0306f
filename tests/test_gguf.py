"""phi3.gguf: container parsing, dequantization kernels, HF names/config, error messages.

References used:
* dequantization: `gguf.quants.dequantize` (the gguf package's numpy implementation). Our torch
  kernels compute in float32 in the same order, so the comparison is bit-exact (tolerance 0).
* container parsing: `gguf.GGUFReader`.
* the real SmolLM2 file: what transformers builds from the same GGUF (tolerance 1e-6 relative).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import phi3.gguf as pg
from phi3 import cpu_kernels
from phi3.errors import CheckpointError
from phi3.gguf import GGUFTensor, dequantize, gguf_state_dict, gguf_to_hf_config, parse_gguf, read_gguf



# ---------------------------------------------------------------------------------------------
# Dequantization vs gguf.quants.dequantize
# ---------------------------------------------------------------------------------------------
def _random_k_blocks(rng: np.random.Generator, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random K-/I-quant raw bytes (gguf cannot quantize these types) with finite fp16 scales."""
    block_size, type_size = pg.BLOCK_LAYOUT[qtype]
    n_blocks = math.prod(shape) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def fp16_bytes() -> np.ndarray:
        return rng.uniform(-2, 2, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)

    for start in FP16_FIELDS[qtype]:
        blocks[:, start:start + 2] = fp16_bytes()
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_S": (0,)}  # byte offsets of each block's fp16 fields


def _raw_for(qtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in FP16_FIELDS:
        return _random_k_blocks(rng, qtype, shape)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    return gguf.quants.quantize(x, QT[qtype])


# Row counts are deliberately not multiples of 256 (or of anything).
DEQUANT_CASES = [
    ("F32", (7, 13)), ("F32", (5,)),
    ("F16", (7, 13)), ("F16", (3, 4, 5)),
    ("BF16", (7, 13)), ("BF16", (11,)),
    ("Q8_0", (37, 96)), ("Q8_0", (3, 5, 64)), ("Q8_0", (1, 32)),
    ("Q4_0", (37, 96)), ("Q4_0", (3, 5, 64)),
    ("Q4_1", (37, 96)), ("Q4_1", (3, 5, 64)),
    ("Q5_0", (37, 96)), ("Q5_0", (3, 5, 64)),
    ("Q5_1", (37, 96)), ("Q5_1", (3, 5, 64)),
    ("Q4_K", (13, 512)), ("Q4_K", (3, 256)), ("Q4_K", (2, 3, 256)),
    ("Q5_K", (13, 512)), ("Q5_K", (3, 256)),
    ("Q6_K", (13, 512)), ("Q6_K", (3, 256)), ("Q6_K", (2, 3, 256)),
    ("Q2_K", (13, 512)), ("Q2_K", (2, 3, 256)),
    ("Q3_K", (13, 512)), ("Q3_K", (2, 3, 256)),
    ("IQ4_NL", (37, 96)), ("IQ4_NL", (3, 5, 64)),
    ("IQ4_XS", (13, 512)), ("IQ4_XS", (2, 3, 256)),
    ("IQ3_S", (13, 512)),  # through gguf-py's own kernel: the chunking around it
]


def test_block_layouts_are_ggml_s_and_requantized_bits_follow_bits_per_weight():
    """Every type we read has ggml's block size and bytes; types that do not load unchanged are
    requantized to int4 up to 4.5 bits a weight and to int8 above (a Q5_K / Q6_K file keeps its bits)."""
    for name, layout in pg.BLOCK_LAYOUT.items():
        assert gguf.GGML_QUANT_SIZES[QT[name]] == layout, name
    assert set(pg.REQUANT_INT4) >= {"Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_XXS", "MXFP4"}
    assert set(pg.REQUANT_INT8) == {"Q5_1", "Q5_K", "Q6_K"}
    assert not set(pg.REQUANT_INT4) & {*pg.EXACT_TYPES, *pg.DENSE_TYPES}


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("qtype,shape", DEQUANT_CASES, ids=[f"{q}-{'x'.join(map(str, s))}" for q, s in DEQUANT_CASES])
def test_dequantize_matches_gguf_reference_bit_exact(qtype, shape, kernels, monkeypatch):
    """The C kernels (`cpu_kernels.dequant_ggml`) and the tensor-op ones, where no compiler is."""
    if kernels == "torch":
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    elif cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    raw = _raw_for(qtype, shape)
    ref = gguf.quants.dequantize(raw, QT[qtype]).astype(np.float32)
    ours = dequantize(GGUFTensor("blk.0.test.weight", qtype, shape, raw))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)  # tolerance 0: same float32 operations


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_half_dtypes_in_chunks(qtype, dtype, monkeypatch):
    monkeypatch.setattr(pg, "_CHUNK_WEIGHTS", 512)  # force several chunks
    shape = (21, 512)
    raw = _raw_for(qtype, shape, seed=1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, QT[qtype]).astype(np.float32)).to(dtype)
    ours = dequantize(GGUFTensor("t", qtype, shape, raw), dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_dequantize_never_returns_a_view_of_the_file(tmp_path):
    path = tmp_path / "f32.gguf"
    _write_gguf(path, "llama", {"token_embd.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}, _llama_kv(4))
    f = read_gguf(path)
    t = dequantize(f.tensors["token_embd.weight"])
    t.add_(1)  # writable, and the file's map is untouched
    assert dequantize(f.tensors["token_embd.weight"])[0, 0].item() == 0.0


def test_dequantize_unsupported_type_names_tensor_and_type():
    raw = np.zeros((2, 292), np.uint8)  # two Q8_K super-blocks (ggml's scratch type, never a model's)
    with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight.*Q8_K"):
        dequantize(GGUFTensor("blk.3.ffn_up.weight", "Q8_K", (2, 256), raw))


def test_dequantize_size_mismatch_is_a_checkpoint_error():
    raw = np.zeros((2, 34), np.uint8)
    with pytest.raises(CheckpointError, match="needs"):
        dequantize(GGUFTensor("x.weight", "Q8_0", (3, 32), raw))


# ---------------------------------------------------------------------------------------------
# Writing tiny GGUFs
# ---------------------------------------------------------------------------------------------
def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray | tuple[np.ndarray, QT]], kv) -> Path:
    """tensors: name -> float array (stored F32/F16 by dtype) or (raw bytes, quant type)."""
    w = gguf.GGUFWriter(path, arch)
    kv(w)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_kv(hidden, layers=1, heads=1, kv_heads=1, ff=32, ctx=256):
    def kv(w):
        w.add_block_count(layers)
        w.add_context_length(ctx)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(ff)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_freq_base(500000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(hidden // heads)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_token_list(["<unk>", "<s>", "</s>", "Ġthe", "é", "日本"])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, 4.0, 5.0])
        w.add_string("general.name", "tiny")
        w.add_bool("tiny.flag", True)

    return kv


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp converter's q/k permutation, from its definition.

    Within each head the HF rows are [first half | second half] (rotate-half rope); GGML's
    interleaved rope wants the pair (i, i + d/2) at rows (2i, 2i+1). So view a head's rows as
    (2, d/2), swap to (d/2, 2) and flatten.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# sizes for the tiny models: head_dim 16, 4 query heads, 2 kv heads
D, H, KV, HD, FF, V, L = 64, 4, 2, 16, 96, 40, 2


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def tiny_llama(tmp_path):
    """A tiny llama GGUF written like llama.cpp does, plus the original HF tensors."""
    rng = np.random.default_rng(0)
    hf = {"model.embed_tokens.weight": _rand(rng, V, D), "model.norm.weight": _rand(rng, D)}
    gg: dict = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "input_layernorm": ("attn_norm", _rand(rng, D)),
            "self_attn.q_proj": ("attn_q", _rand(rng, H * HD, D)),
            "self_attn.k_proj": ("attn_k", _rand(rng, KV * HD, D)),
            "self_attn.v_proj": ("attn_v", _rand(rng, KV * HD, D)),
            "self_attn.o_proj": ("attn_output", _rand(rng, D, H * HD)),
            "post_attention_layernorm": ("ffn_norm", _rand(rng, D)),
            "mlp.gate_proj": ("ffn_gate", _rand(rng, FF, D)),
            "mlp.up_proj": ("ffn_up", _rand(rng, FF, D)),
            "mlp.down_proj": ("ffn_down", _rand(rng, D, FF)),
        }
        for hf_name, (gg_name, w) in layer.items():
            hf[p + hf_name + ".weight"] = w
            if gg_name == "attn_q":
                w = llama_cpp_permute(w, H)
            elif gg_name == "attn_k":
                w = llama_cpp_permute(w, KV)
            gg[b + gg_name + ".weight"] = w
    # one quantized tensor: the state dict must equal gguf's own dequantization of it
    q = gguf.quants.quantize(hf["model.layers.1.mlp.down_proj.weight"], QT.Q8_0)
    gg["blk.1.ffn_down.weight"] = (q, QT.Q8_0)
    hf["model.layers.1.mlp.down_proj.weight"] = gguf.quants.dequantize(q, QT.Q8_0)
    path = _write_gguf(tmp_path / "tiny-llama.gguf", "llama", gg, _llama_kv(D, L, H, KV, FF, ctx=2048))
    return path, hf


def test_llama_round_trip_undoes_qk_permutation(tiny_llama):
    path, hf = tiny_llama
    f = read_gguf(path)
    assert f.architecture == "llama"
    q_file = f.tensors["blk.0.attn_q.weight"].raw
    assert not np.array_equal(q_file, hf["model.layers.0.self_attn.q_proj.weight"])  # the test is not vacuous

    sd = gguf_state_dict(f)
    assert set(sd) == set(hf)  # tied: no lm_head
    for name, ref in hf.items():
        assert sd[name].dtype == torch.float32
        np.testing.assert_array_equal(sd[name].numpy(), ref, err_msg=name)

    cfg = gguf_to_hf_config(f)
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD,
        "max_position_embeddings": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "vocab_size": V, "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


def test_state_dict_in_bfloat16(tiny_llama):
    path, hf = tiny_llama
    sd = gguf_state_dict(read_gguf(path), dtype=torch.bfloat16)
    for name, ref in hf.items():
        assert sd[name].dtype == torch.bfloat16
        torch.testing.assert_close(sd[name], torch.from_numpy(ref).to(torch.bfloat16), rtol=0, atol=0)


def test_metadata_decoded_to_plain_python(tiny_llama):
    f = read_gguf(tiny_llama[0])
    md = f.metadata
    assert md["general.architecture"] == "llama" and md["general.name"] == "tiny"
    assert md["llama.block_count"] == L and type(md["llama.block_count"]) is int
    assert md["tiny.flag"] is True
    assert md["tokenizer.ggml.tokens"] == ["<unk>", "<s>", "</s>", "Ġthe", "é", "日本"]
    assert md["tokenizer.ggml.scores"] == [0.0, -1.5, 2.25, 3.0, 4.0, 5.0]
    assert isinstance(md["llama.rope.freq_base"], float)


def _reader_view(path: Path) -> tuple[dict, dict]:
    """What gguf.GGUFReader makes of a file: (metadata, {name: (qtype, shape, raw bytes)})."""
    r = gguf.GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())), t.data) for t in r.tensors}
    return md, ts


def _assert_same_as_reader(f, path):
    md, ts = _reader_view(path)
    assert f.metadata == md
    assert set(f.tensors) == set(ts)
    for name, (qtype, shape, raw) in ts.items():
        t = f.tensors[name]
        assert (t.qtype, t.shape) == (qtype, shape), name
        assert t.raw.dtype == raw.dtype and t.raw.shape == raw.shape, name
        assert np.array_equal(t.raw.view(np.uint8), raw.view(np.uint8)), name


def test_container_parse_matches_gguf_reader(tiny_llama, tiny_phi3):
    for path in (tiny_llama[0], tiny_phi3[0]):
        _assert_same_as_reader(read_gguf(path), path)


# ---------------------------------------------------------------------------------------------
# phi3
# ---------------------------------------------------------------------------------------------
ROT = 12  # partial rotary: 12 of 16 head dims
LONG = [1.0, 1.25, 1.5, 2.0, 4.0, 8.5]
# 1.05 is not exact in fp32 but must come back as written; 2.8399994373321533 (a Phi-3.5 value,
# itself an fp32 printed as a double) comes back as the shortest decimal of the same fp32.
SHORT = [1.0, 1.05, 1.1, 1.15, 1.2, 2.8399994373321533]
ATTN_FACTOR = math.sqrt(1 + math.log(1024 / 64) / math.log(64))


def _phi3_tensors(rng, separate_qkv=False):
    hf = {"model.embed_tokens.weight": _rand(rng, V, D), "model.norm.weight": _rand(rng, D),
          "lm_head.weight": _rand(rng, V, D)}
    gg: dict = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
                "output.weight": hf["lm_head.weight"]}
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "input_layernorm": ("attn_norm", _rand(rng, D)),
            "self_attn.qkv_proj": ("attn_qkv", _rand(rng, (H + 2 * KV) * HD, D)),
            "self_attn.o_proj": ("attn_output", _rand(rng, D, H * HD)),
            "post_attention_layernorm": ("ffn_norm", _rand(rng, D)),
            "mlp.gate_up_proj": ("ffn_up", _rand(rng, 2 * FF, D)),
            "mlp.down_proj": ("ffn_down", _rand(rng, D, FF).astype(np.float16)),
        }
        for hf_name, (gg_name, w) in layer.items():
            hf[p + hf_name + ".weight"] = w.astype(np.float32)
            if gg_name == "attn_qkv" and separate_qkv:
                q, k, v = np.split(w, [H * HD, (H + KV) * HD])
                gg.update({b + "attn_q.weight": q, b + "attn_k.weight": k, b + "attn_v.weight": v})
            else:
                gg[b + gg_name + ".weight"] = w
    gg["rope_factors_long.weight"] = np.array(LONG, np.float32)
    gg["rope_factors_short.weight"] = np.array(SHORT, np.float32)
    return hf, gg


def _phi3_kv(sliding_window):
    def kv(w):
        w.add_block_count(L)
        w.add_context_length(1024)
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_embedding_length(D)
        w.add_feed_forward_length(FF)
        w.add_head_count(H)
        w.add_head_count_kv(KV)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(ROT)
        w.add_rope_freq_base(10000.0)
        w.add_sliding_window(sliding_window)
        w.add_rope_scaling_attn_factors(ATTN_FACTOR)
        w.add_bos_token_id(1)
        w.add_eos_token_id(32)
        w.add_pad_token_id(32)

    return kv


@pytest.fixture(params=[0, 2047], ids=["no-window", "window-2047"])
def tiny_phi3(tmp_path, request):
    hf, gg = _phi3_tensors(np.random.default_rng(1))
    path = _write_gguf(tmp_path / "tiny-phi3.gguf", "phi3", gg, _phi3_kv(request.param))
    return path, hf, request.param


def test_phi3_round_trip(tiny_phi3):
    path, hf, window = tiny_phi3
    f = read_gguf(path)
    sd = gguf_state_dict(f)
    assert set(sd) == set(hf)  # rope factors are config, not weights
    for name, ref in hf.items():
        np.testing.assert_array_equal(sd[name].numpy(), ref, err_msg=name)

    cfg = gguf_to_hf_config(f)
    scaling = cfg["rope_scaling"]
    assert scaling.pop("attention_factor") == pytest.approx(ATTN_FACTOR, rel=1e-7)  # stored as fp32
    short = scaling.pop("short_factor")
    np.testing.assert_array_equal(np.float32(short), np.float32(SHORT))
    assert short[:5] == SHORT[:5]
    assert cfg == {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV,
        "max_position_embeddings": 1024, "original_max_position_embeddings": 64,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "sliding_window": window or None, "partial_rotary_factor": ROT / HD,
        "rope_scaling": {"type": "longrope", "long_factor": LONG},
        "vocab_size": V, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 32, "pad_token_id": 32,
    }


def test_phi3_separate_qkv_are_fused(tmp_path):
    hf, gg = _phi3_tensors(np.random.default_rng(2), separate_qkv=True)
    path = _write_gguf(tmp_path / "qkv.gguf", "phi3", gg, _phi3_kv(0))
    sd = gguf_state_dict(read_gguf(path))
    assert set(sd) == set(hf)
    for name, ref in hf.items():
        np.testing.assert_array_equal(sd[name].numpy(), ref, err_msg=name)


def test_phi3_without_rope_factors_or_window_keys(tmp_path):
    hf, gg = _phi3_tensors(np.random.default_rng(3))
    del gg["rope_factors_long.weight"], gg["rope_factors_short.weight"], gg["output.weight"]

    def kv(w):  # a 4k model: no scaling keys, full rotary
        w.add_block_count(L)
        w.add_context_length(4096)
        w.add_embedding_length(D)
        w.add_feed_forward_length(FF)
        w.add_head_count(H)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(HD)

    cfg = gguf_to_hf_config(read_gguf(_write_gguf(tmp_path / "4k.gguf", "phi3", gg, kv)))
    assert cfg["rope_scaling"] is None and cfg["sliding_window"] is None
    assert "partial_rotary_factor" not in cfg
    assert cfg["num_key_value_heads"] == H and cfg["rope_theta"] == 10000.0
    assert cfg["original_max_position_embeddings"] == 4096 and cfg["tie_word_embeddings"] is True


def test_unknown_tensor_name_is_named(tmp_path):
    hf, gg = _phi3_tensors(np.random.default_rng(4))
    gg["blk.0.ffn_gate.weight"] = _rand(np.random.default_rng(5), FF, D)  # not a phi3 tensor
    f = read_gguf(_write_gguf(tmp_path / "odd.gguf", "phi3", gg, _phi3_kv(0)))
    with pytest.raises(CheckpointError, match=r"odd\.gguf.*blk\.0\.ffn_gate\.weight"):
        gguf_state_dict(f)


def test_converting_a_file_with_a_missing_tensor_names_it_and_writes_nothing(tmp_path):
    """`phi3 convert x.gguf dir/` streams tensors from the file: the set of tensors and their shapes
    are checked against the model first, as loading checks them."""
    from phi3.api import convert_gguf_to_hf
    _, gg = _phi3_tensors(np.random.default_rng(6))
    del gg["blk.1.ffn_down.weight"]
    path = _write_gguf(tmp_path / "short.gguf", "phi3", gg, _phi3_kv(0))
    with pytest.raises(CheckpointError, match=r"short\.gguf: missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_metadata_key_is_named(tmp_path):
    def kv(w):
        w.add_block_count(1)

    f = read_gguf(_write_gguf(tmp_path / "bare.gguf", "llama", {"token_embd.weight": np.zeros((4, 8), np.float32)}, kv))
    with pytest.raises(CheckpointError, match=r"bare\.gguf.*llama\.attention\.head_count.*missing"):
        gguf_to_hf_config(f)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.gguf"):
        read_gguf(tmp_path / "nothere.gguf")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"\x89PNG\r\n\x1a\n" + bytes(100), os.urandom(4096)],
                         ids=["empty", "short", "png", "random"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"garbage\.gguf.*not a GGUF"):
        read_gguf(path)


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.1, 0.3, 0.9, 0.999])
def test_truncated(tiny_llama, tmp_path, fraction):
    data = tiny_llama[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated or corrupt"):
        read_gguf(path)


def test_corrupt_length_field(tiny_llama, tmp_path):
    data = bytearray(tiny_llama[0].read_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")  # length of the first metadata key
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt\.gguf.*truncated or corrupt"):
        read_gguf(path)


def test_big_endian_file(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"be\.gguf.*big-endian"):
        read_gguf(path)


def test_rope_factor_length_checked(tmp_path):
    hf, gg = _phi3_tensors(np.random.default_rng(6))
    gg["rope_factors_long.weight"] = np.ones(5, np.float32)
    f = read_gguf(_write_gguf(tmp_path / "rope.gguf", "phi3", gg, _phi3_kv(0)))
    with pytest.raises(CheckpointError, match=r"rope\.gguf.*rope_factors_long\.weight has 5 values"):
        gguf_to_hf_config(f)


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "snake.gguf", "mamba", {"token_embd.weight": np.zeros((4, 8), np.float32)},
                       lambda w: w.add_block_count(1))
    with pytest.raises(CheckpointError, match=r"snake\.gguf.*'mamba'"):
        read_gguf(path)


# ---------------------------------------------------------------------------------------------
# The real file against transformers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gguf(default_gguf) -> Path:
    return default_gguf


@pytest.fixture(scope="module")
def ours(real_gguf):
    f = read_gguf(real_gguf)
    return f, gguf_state_dict(f), gguf_to_hf_config(f)


@pytest.fixture(scope="module")
def hf_reference(real_gguf, hf_smollm2):
    """(config, names of the HF model's state dict, tensors) as transformers loads the same GGUF."""
    import transformers

    model, _ = hf_smollm2
    cfg = transformers.AutoConfig.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    sd = model.state_dict()
    return cfg, set(sd), sd


def test_real_state_dict_equals_transformers(ours, hf_reference):
    _, sd, cfg = ours
    _, hf_names, hf_tensors = hf_reference
    expected = hf_names - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    assert expected <= set(sd), sorted(expected - set(sd))
    compared = 0
    for name, ref in hf_tensors.items():
        if name in sd:
            assert sd[name].shape == ref.shape, name
            ref = ref.float()
            if not torch.equal(sd[name], ref):  # they are bit-equal in practice; allow fp32 noise
                bad = ((sd[name] - ref).abs() > 1e-6 * (1 + ref.abs())).sum().item()
                assert bad == 0, f"{name}: {bad} elements differ by more than 1e-6 relative"
            compared += 1
    assert compared >= len(expected) - 1


def test_real_config_equals_transformers(ours, hf_reference):
    _, _, cfg = ours
    hf_cfg = hf_reference[0]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(hf_cfg, key), key
    if cfg["model_type"] == "llama":
        assert cfg["head_dim"] == hf_cfg.head_dim
    rope_theta = getattr(hf_cfg, "rope_theta", None) or hf_cfg.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(rope_theta, rel=1e-6)
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)


def test_real_file_types(ours):
    f, sd, cfg = ours
    assert {t.qtype for t in f.tensors.values()} <= set(pg.BLOCK_LAYOUT)
    assert sd["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])


@pytest.mark.slow
def test_real_container_parse_matches_gguf_reader(real_gguf, ours):
    _assert_same_as_reader(ours[0], real_gguf)


@pytest.mark.slow
def test_real_dequantize_speed(real_gguf):
    """Dequantizing the whole model: well under 2 s.

    Best of 3: on a VM, first-touch page faults of freshly allocated memory can cost seconds and
    vary from run to run; the best run measures the kernels.
    """
    f = read_gguf(real_gguf)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        sd = gguf_state_dict(f)
        times.append(time.perf_counter() - start)
        del sd
    assert min(times) < 2.0, times


# ---------------------------------------------------------------------------------------------
# A phi3-architecture GGUF through phi3.load, against transformers with the same weights
# ---------------------------------------------------------------------------------------------
def test_phi3_gguf_loads_end_to_end_with_longrope(tmp_path):
    """Weights, LongRoPE factors (as GGUF tensors), attn_factor and the Phi-3 vocabulary from one GGUF
    file give the logits of transformers' Phi3ForCausalLM on both sides of the factor switch."""
    import transformers

    import phi3

    from .conftest import SHARED, scaled_down

    hf_cfg = scaled_down("phi-3.5-mini-instruct", vocab=32064, original=32)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**hf_cfg)).eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"],
               "rope_factors_long.weight": np.array(hf_cfg["rope_scaling"]["long_factor"], np.float32),
               "rope_factors_short.weight": np.array(hf_cfg["rope_scaling"]["short_factor"], np.float32)}
    for i in range(hf_cfg["num_hidden_layers"]):
        for hf_name, gg_name in names.items():
            tensors[f"blk.{i}.{gg_name}.weight"] = sd[f"model.layers.{i}.{hf_name}.weight"]
    vocab = parse_gguf(SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf").metadata
    heads = hf_cfg["num_attention_heads"]

    def kv(w):
        w.add_block_count(hf_cfg["num_hidden_layers"])
        w.add_context_length(hf_cfg["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(hf_cfg["original_max_position_embeddings"])
        w.add_embedding_length(hf_cfg["hidden_size"])
        w.add_feed_forward_length(hf_cfg["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(hf_cfg["num_key_value_heads"])
        w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
        w.add_rope_dimension_count(hf_cfg["hidden_size"] // heads)
        w.add_rope_freq_base(hf_cfg["rope_theta"])
        w.add_sliding_window(hf_cfg["sliding_window"])
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokenizer.ggml.tokens"])
        w.add_token_scores(vocab["tokenizer.ggml.scores"])
        w.add_token_types(vocab["tokenizer.ggml.token_type"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(32000)
        w.add_chat_template(vocab["tokenizer.chat_template"])

    path = _write_gguf(tmp_path / "phi35-tiny.gguf", "phi3", tensors, kv)
    lm = phi3.load(path)
    assert lm.config.is_longrope and lm.tokenizer.stop_token_ids == {32000, 32001, 32007}
    assert lm.chat_prompt("Hi")[-1] == 32001
    for t in (20, 33, 70):  # below, just past and well past L0 = 32
        ids = torch.randint(0, 32064, (1, t))
        with torch.no_grad():
            diff = (lm.model(ids) - ref(ids).logits).abs().max().item()
        assert diff < 1e-4, f"T={t}: {diff}"

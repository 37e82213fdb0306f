"""GGUF out (phi3.gguf_export) and quantized GGUF weights kept quantized (phi3.gguf native loading)."""

import json

import gguf
import numpy as np
import pytest
import torch

import phi3
from phi3.generate import SamplingParams, generate_tokens
from phi3.checkpoint import build_model
from phi3.config import ModelConfig
from phi3.errors import Phi3Error
from phi3.gguf import (GGUFTensor, dequantize, gguf_to_hf_config, native_int4, native_int8, native_parts,
                       quantized_linear_parts, read_gguf)
from phi3 import cpu_kernels
from phi3.gguf_export import TORCH_QUANTIZERS, permute_rows, write_gguf
from phi3.models.phi3 import Phi3ForCausalLM
from phi3.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from phi3.tokenizer import Tokenizer

from .conftest import SHARED, random_phi3, scaled_down
from .test_memory import linux, resident_pages
from .test_tokenizer import case_params

QT = gguf.GGMLQuantizationType
PHI3_VOCAB = SHARED / "tokenizer" / "ggml-vocab-phi-3.gguf"


# ---- block quantizers --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_quantizers_match_ggml_reference_bit_exact(qtype, dtype):
    """The torch quantizers and the C ones (`cpu_kernels.quantize_ggml`, what the export runs where the
    native kernels do) write gguf-py's reference bytes, from any dense dtype."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 3).to(dtype)
    w[3, :32] = 0  # an all-zero block
    w[4, 32:64] = 0.5  # ties: the first of the largest |w| sets Q4_0's sign
    w[4, 40] = -0.5
    w[5, :32] = torch.arange(32) - 15.5  # Q8_0 ...
    w[5, 0] = 127  # ... with d = 1: w·(1/d) on halves, which roundf takes away from zero (numpy's round would not)
    expected = gguf.quants.quantize(w.float().numpy(), qtype)
    assert np.array_equal(TORCH_QUANTIZERS[qtype](w), expected)
    lib = cpu_kernels.library()
    if lib is not None:
        assert np.array_equal(cpu_kernels.quantize_ggml(lib, w, qtype.name).numpy(), expected)


def test_permute_rows_inverts_unpermute():
    from phi3.gguf import unpermute_rows
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)


# ---- native quantized loading ------------------------------------------------------------------
def _tensor(qtype: QT, w: torch.Tensor) -> GGUFTensor:
    return GGUFTensor("blk.0.ffn_down.weight", qtype.name, tuple(w.shape), gguf.quants.quantize(w.numpy(), qtype))


@pytest.mark.parametrize("native", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_native_parts_are_exactly_the_gguf_values(qtype, native, monkeypatch):
    from phi3 import cpu_kernels
    if native and cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    t = _tensor(qtype, torch.randn(64, 256))
    if not native:  # the nibble shuffle through tensor ops (the C one where the library runs)
        bits, parts = native_parts(t)
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
        again = native_parts(t)[1]
        assert parts.keys() == again.keys()
        assert all(torch.equal(parts[k], again[k]) for k in parts if parts[k] is not None)
        # Q4_0's mins are implied (−8·scale), not held while loading
        assert (parts.get("mins", 0) is None) == (again.get("mins", 0) is None) == (qtype == QT.Q4_0)
        return
    if qtype == QT.Q8_0:
        layer = Int8Linear.from_stored(native_int8(t))
        assert layer.group_size == 32
    else:
        layer = Int4Linear.from_stored(native_int4(t), 32)
    assert torch.equal(layer.dequantize(), dequantize(t))
    x = torch.randn(3, 256)
    expected = x @ dequantize(t).T
    # the kernels round activations (to int8 blocks, like llama.cpp, or to bf16)
    assert (layer(x) - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_quantized_embedding_rows_are_exactly_the_gguf_values(qtype):
    t = _tensor(qtype, torch.randn(50, 128))
    bits, parts = native_parts(t)
    table = (Int8Embedding if bits == 8 else Int4Embedding).from_stored(parts, dtype=torch.float32)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    assert torch.equal(table(ids), torch.nn.functional.embedding(ids, dequantize(t)))
    assert torch.equal(table.dequantize(), dequantize(t))


@pytest.mark.parametrize("qtype", [QT.Q6_K, QT.Q4_K, QT.IQ3_S])
def test_requantized_types_are_converted_in_row_blocks(qtype, monkeypatch):
    """Q6_K (-> grouped int8), Q4_K (-> int4 g32 with least-squares refinement, where the native
    kernels do not pack it) and IQ3_S (gguf-py's dequantization, then int4 g32: what every type without a
    kernel of ours takes) are requantized a block of rows at a time: the same result as requantizing
    the whole dequantized tensor at once."""
    from phi3.gguf import _portable_linear_parts
    from phi3.quant import quantize_int4_nibbles, quantize_int8_groups
    from .test_gguf import _raw_for
    t = GGUFTensor("output.weight", qtype.name, (40, 256), _raw_for(qtype.name, (40, 256)))
    monkeypatch.setattr("phi3.gguf.REQUANT_ROWS", 16)
    bits, parts = _portable_linear_parts(t)
    w = dequantize(t)
    if qtype == QT.Q6_K:
        q, s = quantize_int8_groups(w, 32)
        assert bits == 8 and torch.equal(parts["qweight"], q) and torch.equal(parts["scales"], s)
    else:
        q, s, m = quantize_int4_nibbles(w, 32)
        assert bits == 4 and torch.equal(parts["qweight"], q) and torch.equal(parts["mins"], m)


def test_least_squares_refinement_lowers_the_int4_error_on_coarse_grids():
    """Values already on a 3-bit grid with two scales per group of 32 (as Q3_K's 16-weight sub-blocks):
    the refined int4 fit has a lower squared error than min-max, never a higher one per group."""
    from phi3.quant import quantize_int4
    torch.manual_seed(0)
    levels = torch.randint(-4, 4, (64, 256)).float()
    w = levels * torch.rand(64, 16, 1).add(0.5).repeat_interleave(16, dim=1).view(64, 256)

    def err(refine):
        q, s, m = quantize_int4(w, 32, refine=refine)
        back = q.view(64, 8, 32).float() * s.float()[..., None] + m.float()[..., None]
        return ((back - w.view(64, 8, 32)) ** 2).sum(-1)
    plain, refined = err(0), err(2)
    assert refined.sum() < 0.9 * plain.sum()
    assert (refined <= plain * 1.001 + 1e-6).all()


def test_quantized_gguf_stays_quantized(default_gguf):
    """SmolLM2 (Q4_1 linears, Q8_0 tied embedding): int4 modules, an int8 table and head of the very
    Q8_0 blocks, same greedy answer as the dense model."""
    dense, native = phi3.load(default_gguf, dequantize=True), phi3.load(default_gguf)
    layer = native.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(native.model.lm_head, Int8Linear)
    assert torch.equal(native.model.lm_head.dequantize(), dense.model.lm_head.weight)
    assert torch.equal(native.model.model.embed_tokens.dequantize(), dense.model.model.embed_tokens.weight)
    for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"):  # unpermuted + fused, exactly
        assert torch.equal(layer.get_submodule(name).dequantize(), dense.model.model.layers[0].get_submodule(name).weight)
    ids = torch.tensor([native.encode("The capital of France is")])
    with torch.no_grad():
        a, b = dense.model(ids), native.model(ids)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The kernels round activations (int8 blocks, as llama.cpp does), so free-running greedy text may
    # part ways at a near tie; position by position on the dense model's own answers they agree.
    agree, total = _teacher_forced_agreement(dense, native, ("What is the capital of France?",
                                                             "Write a haiku about the sea.",
                                                             "Explain what a CPU does in two sentences."))
    assert agree / total >= 0.9, f"top-1 agreement {agree}/{total}"


def _teacher_forced_agreement(dense, native, questions) -> tuple[int, int]:
    """(positions where `native`'s top-1 is `dense`'s, positions) over `dense`'s own greedy answers
    (32 tokens) to `questions`."""
    agree = total = 0
    for question in questions:
        prompt = dense.chat_prompt(question)
        steps = generate_tokens(dense.model, [prompt], SamplingParams(max_new_tokens=32, temperature=0.0),
                                dense.tokenizer.stop_token_ids)
        answer = [step[0] for step in steps]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            a, b = dense.model(ids).argmax(-1), native.model(ids).argmax(-1)
        agree += (a == b)[0, -len(answer):].sum().item()
        total += len(answer)
    return agree, total


# ---- export -----------------------------------------------------------------------------------
def test_smollm2_round_trip_through_our_gguf(default_gguf, tmp_path):
    lm = phi3.load(default_gguf, dequantize=True)
    ids = torch.tensor([lm.encode("def fibonacci(n):")])
    with torch.no_grad():
        ref = lm.model(ids)
    path = write_gguf(lm.model, lm.tokenizer, tmp_path / "smol-f16.gguf", "f16")
    back = phi3.load(path, dequantize=True)
    with torch.no_grad():
        out = back.model(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # fp16 weights
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert back.tokenizer.gguf_metadata == lm.tokenizer.gguf_metadata  # vocabulary written back unchanged
    assert back.config.tie_word_embeddings and "output.weight" not in read_gguf(path).tensors


@pytest.fixture
def longrope_phi3():
    hf = scaled_down("phi-3-mini-128k-instruct", vocab=32064)
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(hf)
    with torch.device("meta"):
        shapes = Phi3ForCausalLM(cfg).state_dict()
    return build_model(cfg, {k: torch.randn(v.shape) * 0.05 for k, v in shapes.items()}, torch.float32)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_phi3_longrope_export_reads_back(longrope_phi3, tmp_path, kind):
    tok = Tokenizer.from_gguf(PHI3_VOCAB)
    path = write_gguf(longrope_phi3, tok, tmp_path / f"phi3-{kind}.gguf", kind)
    f = read_gguf(path)
    hf = gguf_to_hf_config(f)
    cfg = longrope_phi3.config
    assert hf["rope_scaling"]["long_factor"] == pytest.approx(cfg.rope_scaling["long_factor"])
    assert hf["rope_scaling"]["short_factor"] == pytest.approx(cfg.rope_scaling["short_factor"])
    assert hf["original_max_position_embeddings"] == cfg.original_max_position_embeddings
    assert hf["sliding_window"] == cfg.sliding_window
    assert f.tensors["blk.0.attn_qkv.weight"].qtype == kind.upper()
    assert f.tensors["blk.0.attn_norm.weight"].qtype == "F32"
    back = phi3.load(path)
    if kind == "q4_0":
        assert isinstance(back.model.model.layers[1].mlp.down_proj, Int4Linear)
        assert f.tensors["output.weight"].qtype == "Q8_0"  # the head keeps 8 bits
    if kind != "f16":  # the Q8_0 embedding of an untied model stays quantized, exactly
        assert isinstance(back.model.model.embed_tokens, Int8Embedding)
        assert torch.equal(back.model.model.embed_tokens.dequantize(), dequantize(f.tensors["token_embd.weight"]))
    ids = torch.randint(0, 32064, (1, 40))  # crosses the LongRoPE switch (original = 32)
    with torch.no_grad():
        ref, out = longrope_phi3(ids), back.model(ids)
    tol = {"f16": 0.01, "q8_0": 0.05, "q4_0": 0.35}[kind]
    assert (out - ref).abs().max() < tol * ref.abs().max()


@pytest.mark.parametrize("text,expected", case_params("phi-3"))
def test_phi3_vocab_from_tokenizer_json_exported(tmp_path_factory, text, expected):
    """tokenizer.json -> GGUF metadata (scores from merge ranks) -> tokenizer: llama.cpp's vectors still hold."""
    tok = _exported_phi3_tokenizer(tmp_path_factory)
    assert tok.encode(text) == expected


_cache: dict = {}


def _exported_phi3_tokenizer(factory) -> Tokenizer:
    if "tok" not in _cache:
        from phi3.gguf_export import tokenizer_metadata
        d = factory.mktemp("phi3tok")
        Tokenizer.from_gguf(PHI3_VOCAB).save_pretrained(d)
        from_json = Tokenizer.from_dir(d)
        assert from_json.gguf_metadata is None
        md = tokenizer_metadata(from_json, 32064)
        assert md["tokenizer.ggml.model"] == "llama" and len(md["tokenizer.ggml.tokens"]) == 32064
        _cache["tok"] = Tokenizer.from_gguf_metadata(json.loads(json.dumps(md)), "exported")
    return _cache["tok"]


def test_bad_export_type(longrope_phi3, tmp_path):
    with pytest.raises(Phi3Error, match="GGUF type 'q5_1' is not supported"):
        write_gguf(longrope_phi3, None, tmp_path / "x.gguf", "q5_1")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_convert_to_gguf(default_gguf, tmp_path, capsys):
    from phi3.cli import main
    out = tmp_path / "smol-q8.gguf"
    assert main(["convert", str(default_gguf), str(out), "--type", "q8_0"]) == 0
    f = read_gguf(out)
    assert f.tensors["blk.0.attn_q.weight"].qtype == "Q8_0"
    lm = phi3.load(out)
    assert isinstance(lm.model.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert lm.chat("What is the capital of France?", max_new_tokens=12).strip()


def test_q4_0_beside_q4_1_fuses_with_its_implied_mins():
    """A llama-layout file with gate in Q4_0 (mins implied) and up in Q4_1: the fused gate_up keeps
    both exactly, quantized."""
    from phi3.gguf import _fuse_quantized
    gate, up = _tensor(QT.Q4_0, torch.randn(32, 64)), _tensor(QT.Q4_1, torch.randn(48, 64))
    quant = {"model.layers.0.mlp.gate_proj": native_parts(gate), "model.layers.0.mlp.up_proj": native_parts(up)}
    assert quant["model.layers.0.mlp.gate_proj"][1]["mins"] is None
    _fuse_quantized(None, {}, quant)
    bits, parts = quant.pop("model.layers.0.mlp.gate_up_proj")
    assert bits == 4 and not quant
    fused = Int4Linear.from_stored(parts, 32)
    assert torch.equal(fused.dequantize(), torch.cat((dequantize(gate), dequantize(up))))


@pytest.mark.parametrize("heads", [None, 4], ids=["rows as stored", "llama q rows unpermuted"])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_blocks_pack_straight_into_the_kernel_layout(qtype, heads):
    """Where the native kernels run, Q4_0 / Q4_1 / Q8_0 blocks go from the file to the kernel's layout
    in one pass: the very module the portable parts give (same bytes, same values, same output)."""
    from phi3 import cpu_kernels
    from phi3.gguf import packed_parts, unpermute_rows
    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    t = _tensor(qtype, torch.randn(64, 256))
    bits, packed = quantized_linear_parts(t, heads)
    assert list(packed) == ["packed"]
    portable = {k: None if v is None else (unpermute_rows(v, heads) if heads else v)
                for k, v in native_parts(t)[1].items()}
    cls = Int4Linear if bits == 4 else Int8Linear
    direct, reference = cls.from_stored(packed, 32), cls.from_stored(portable, 32)
    assert torch.equal(direct.packed, reference.packed)
    w = dequantize(t)
    assert torch.equal(direct.dequantize(), unpermute_rows(w, heads) if heads else w)
    assert all(torch.equal(v, reference.stored()[k]) for k, v in direct.stored().items())
    x = torch.randn(5, 256)
    assert torch.equal(direct(x), reference(x))
    # rows that are not a multiple of 8 take the portable parts
    assert packed_parts(_tensor(qtype, torch.randn(60, 256))) is None
    assert "qweight" in quantized_linear_parts(_tensor(qtype, torch.randn(60, 256)))[1]


def test_packed_q4_0_beside_packed_q4_1_fuses_quantized():
    """Blocks packed straight from the file but in different layouts (Q4_0 scale-only, Q4_1 with
    mins) fuse through the portable form, still int4 and exact."""
    from phi3 import cpu_kernels
    from phi3.gguf import _fuse_quantized
    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    gate, up = _tensor(QT.Q4_0, torch.randn(32, 64)), _tensor(QT.Q4_1, torch.randn(48, 64))
    quant = {"model.layers.0.mlp.gate_proj": quantized_linear_parts(gate),
             "model.layers.0.mlp.up_proj": quantized_linear_parts(up)}
    assert all(list(p) == ["packed"] for _, p in quant.values())
    _fuse_quantized(None, {}, quant)
    bits, parts = quant.pop("model.layers.0.mlp.gate_up_proj")
    assert bits == 4 and not quant
    assert torch.equal(Int4Linear.from_stored(parts, 32).dequantize(), torch.cat((dequantize(gate), dequantize(up))))


def _tied_heads():
    """Quantized heads of every kind the native kernels hold: GGUF blocks packed straight from the
    file, portable int4 with mins, int8 per channel, and a vocabulary that is not a multiple of 8."""
    from phi3.gguf import quantized_linear_parts
    w = torch.randn(64, 128)
    heads = {q.name: Int4Linear.from_stored(quantized_linear_parts(_tensor(q, w))[1], 32) for q in (QT.Q4_0, QT.Q4_1)}
    heads["Q8_0"] = Int8Linear.from_stored(quantized_linear_parts(_tensor(QT.Q8_0, w))[1])
    heads["int4 g64"] = Int4Linear.quantize(w, 64)
    heads["int8 per channel"] = Int8Linear.quantize(w)
    heads["int4, 61 rows"] = Int4Linear.quantize(w[:61], 32)
    heads["int8, 61 rows"] = Int8Linear.quantize(w[:61])
    return heads


def test_tied_table_rows_come_from_the_head_exactly():
    from phi3 import cpu_kernels
    from phi3.quant import TiedEmbedding
    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    for kind, head in _tied_heads().items():
        table = TiedEmbedding(head, torch.float32)
        ids = torch.tensor([[0, 5, head.out_features - 1], [7, 8, 7]])
        assert torch.equal(table(ids), head.dequantize()[ids]), kind
        assert torch.equal(table.dequantize(), head.dequantize()), kind
        assert list(table.buffers()) == [] and list(table.children()) == [], kind  # nothing of its own
        with pytest.raises(IndexError, match="out of range"):
            table(torch.tensor([[head.out_features]]))


def test_tied_gguf_holds_its_table_once(default_gguf, tmp_path):
    """SmolLM2's GGUF has no output.weight: the head and the table are the same Q8_0 blocks, held
    once; saved, the checkpoint has both tensors (as transformers-style files do) and loads back
    sharing them again, with the same logits."""
    from phi3 import cpu_kernels
    from phi3.checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from phi3.quant import TiedEmbedding
    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    lm = phi3.load(default_gguf)
    assert isinstance(lm.model.model.embed_tokens, TiedEmbedding)
    held = sum(b.numel() * b.element_size() for b in lm.model.buffers()) + \
        sum(p.numel() * p.element_size() for p in lm.model.parameters())
    table = 49152 * 576 * (1 + 2 / 32)  # int8 + an fp16 scale per 32
    assert held < 135e6 * (4.5 / 8) + table * 1.05  # weights at ~4.5 bits, one int8 table
    save_hf_checkpoint(lm.model, tmp_path / "q", tokenizer=lm.tokenizer)
    again = load_hf_checkpoint(tmp_path / "q")
    assert isinstance(again.model.embed_tokens, TiedEmbedding)
    ids = torch.tensor([lm.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(again(ids), lm.model(ids))


def test_q4_k_sub_blocks_pack_as_int4_groups():
    """Q4_K packs straight into the int4 layout: each sub-block of 32 a group whose scale d·sc and min
    −dmin·m are rounded to fp16, the 4-bit weights kept. Exactly that rule, and within fp16 rounding
    of the file's values (requantizing them onto a fresh int4 grid, as before, erred by up to half a
    step of that grid)."""
    from phi3 import cpu_kernels
    from phi3.gguf import _f16, _k_scales, _nibbles, packed_parts
    from .test_gguf import _raw_for
    if cpu_kernels.library() is None:
        pytest.skip("no native kernels on this machine")
    rows, cols = 24, 512
    t = GGUFTensor("blk.0.ffn_down.weight", "Q4_K", (rows, cols), _raw_for("Q4_K", (rows, cols)))
    bits, parts = packed_parts(t)
    layer = Int4Linear.from_stored(parts, 32)
    blocks = torch.from_numpy(t.raw.view(np.uint8)).view(-1, 144)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [superblocks, 1]
    sc, mn = _k_scales(blocks[:, 4:16])  # [superblocks, 8]
    q = _nibbles(blocks[:, 16:144], 4).view(-1, 8, 32)  # [superblocks, 8 groups, 32]
    scale, low = (d * sc).half().float(), (-(dmin * mn)).half().float()
    expected = (q * scale[..., None] + low[..., None]).reshape(rows, cols)
    assert bits == 4 and torch.equal(layer.dequantize(), expected)
    w = dequantize(t)
    # fp16 keeps 11 significant bits: each weight is off by at most half an fp16 step of 15·|scale| + |min|
    exact_scale, exact_min = (d * sc).abs(), (dmin * mn).abs()
    bound = ((15 * exact_scale + exact_min) * 2.0 ** -11 * 1.01).repeat_interleave(32, 1).reshape(rows, cols)
    assert ((layer.dequantize() - w).abs() <= bound + 1e-6).all()
    x = torch.randn(3, cols)
    assert (layer(x) - x @ w.T).abs().max() < 0.02 * (x @ w.T).abs().max()
    # a Q4_K token table loads as an int4 table of the same groups, not as a dense fp32 copy
    from phi3.gguf import _stays_dense, _table_parts
    table_tensor = GGUFTensor("token_embd.weight", "Q4_K", (rows, cols), t.raw)
    assert not _stays_dense(table_tensor)
    bits, table_parts = _table_parts(table_tensor)
    table = Int4Embedding.from_stored(table_parts, dtype=torch.float32)
    assert bits == 4 and torch.equal(table.dequantize(), expected)


@pytest.mark.parametrize("qtype", ["Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL"])
def test_requantized_in_one_pass_as_in_tensor_ops(qtype):
    """Requantized in C, straight into the kernel layout, as with tensor ops: grouped int8 (Q6_K, Q5_K)
    the very bytes of `quantize_int8_groups` of the dequantized rows, for every type (so the C
    dequantization is exact); int4 (the others) `quantize_int4(refine=2)`'s fit, its sums taken in
    another order: a level apart at most, and rarely."""
    from phi3 import cpu_kernels
    from phi3.gguf import _block_fields, _portable_linear_parts, packed_parts, requant_bits
    from phi3.quant import quantize_int8_groups
    from .test_gguf import _raw_for
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no native kernels on this machine")
    t = GGUFTensor("blk.0.ffn_down.weight", qtype, (24, 512), _raw_for(qtype, (24, 512)))
    as_int8 = Int8Linear.from_stored({"packed": cpu_kernels.requant_ggml(lib, _block_fields(t)[0], qtype, 8)})
    q, s = quantize_int8_groups(dequantize(t), 32)
    assert torch.equal(as_int8.packed, Int8Linear.from_stored({"qweight": q, "scales": s}, 32).packed)
    bits, parts = packed_parts(t)
    assert bits == requant_bits(qtype) and sorted(parts) == ["packed"]
    cls = Int8Linear if bits == 8 else Int4Linear
    direct, reference = cls.from_stored(parts, 32), cls.from_stored(_portable_linear_parts(t)[1], 32)
    x = torch.randn(3, 512)
    if bits == 8:
        assert torch.equal(direct.packed, reference.packed) and torch.equal(direct(x), reference(x))
        return
    a, b = direct.dequantize(), reference.dequantize()
    step = reference.scales.float().repeat_interleave(32, dim=1)
    assert ((a - b).abs() <= 1.01 * step + 1e-6).all() and (a != b).float().mean() < 0.01
    torch.testing.assert_close(direct.scales.float(), reference.scales.float(), rtol=2e-3, atol=1e-4)


def test_q5_0_loads_as_grouped_int8_exactly():
    """Q5_0 (what llama.cpp's K-quant mixes fall back to when a row is not a multiple of 256):
    w = d·(q − 16) is grouped int8 with the same scale, so it loads with no change of value."""
    from phi3.gguf import native_parts
    t = _tensor(QT.Q5_0, torch.randn(40, 96))
    bits, parts = quantized_linear_parts(t)
    assert bits == 8 and native_parts(t)[0] == 8
    layer = Int8Linear.from_stored(parts)
    assert layer.group_size == 32 and torch.equal(layer.dequantize(), dequantize(t))
    bits, table_parts = native_parts(t)
    table = Int8Embedding.from_stored(table_parts, dtype=torch.float32)
    assert torch.equal(table.dequantize(), dequantize(t))


LLAMA_CPP_MIXES = {  # llama.cpp ftype -> (types it writes for the default SmolLM2, least teacher-forced agreement)
    # 576-wide rows are not a multiple of 256, so most tensors take llama.cpp's fallback types
    "Q4_K_M": ({"Q5_0", "Q4_K", "Q6_K", "Q8_0"}, 0.9),
    "Q5_K_M": ({"Q5_1", "Q5_K", "Q6_K", "Q8_0"}, 0.9),
    "Q3_K_M": ({"Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K"}, 0.9),
    "Q2_K": ({"Q4_0", "Q3_K"}, 0.8),
    "IQ4_XS": ({"IQ4_NL", "IQ4_XS", "Q5_K"}, 0.7),
}


@pytest.mark.parametrize("ftype", LLAMA_CPP_MIXES)
def test_llama_cpp_mixes_load_quantized(ftype, default_gguf, tmp_path):
    """llama.cpp's own quantizations of the default SmolLM2 (fused q/k/v of different types included)
    load with every projection quantized: the exact types (Q4_0, Q5_0, Q8_0) equal the dense weights,
    the rest are within their requantization's bound — grouped int8 for types above 4.5 bits a weight
    (Q5_1, Q5_K, Q6_K), int4 groups of 32 for the others; teacher-forced top-1 agrees with the
    dequantized model. Measured (2026-12-03): Q4_K_M 74/75, Q5_K_M 61/62 (57/62 when int8 was per
    channel), Q3_K_M 57/57, Q2_K 79/86, IQ4_XS 50/61 (74/86 and 41/61 before the least-squares
    refinement): requantizing a 3-bit or non-uniform 4-bit grid onto uniform int4 costs agreement;
    `dequantize=True` keeps the file's values exactly."""
    import llama_cpp
    types, least = LLAMA_CPP_MIXES[ftype]
    out = tmp_path / f"smollm2-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(default_gguf).encode(), str(out).encode(), params) == 0
    assert types <= {t.qtype for t in read_gguf(out).tensors.values()}
    dense, native = phi3.load(out, dequantize=True), phi3.load(out)
    for i, layer in enumerate(native.model.model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            module, weight = layer.get_submodule(name), dense.model.model.layers[i].get_submodule(name).weight
            assert isinstance(module, (Int4Linear, Int8Linear)), (i, name)
            # per group of 32: int8 within half a step (max |w| / 254), int4 within 1.5 of min-max's steps
            # (the least-squares fit may clip a group's extremes to lower its total error)
            groups, err = weight.view(weight.shape[0], -1, 32), (module.dequantize() - weight).view(weight.shape[0], -1, 32)
            bound = (groups.abs().amax(-1) / 200 if isinstance(module, Int8Linear)
                     else (groups.amax(-1) - groups.amin(-1)) / 10)
            assert (err.abs().amax(-1) <= bound + 1e-6).all(), (i, name)
    if ftype == "Q4_K_M":  # Q5_0 q and k beside a Q8_0 v: exact
        qkv = native.model.model.layers[0].self_attn.qkv_proj
        assert torch.equal(qkv.dequantize(), dense.model.model.layers[0].self_attn.qkv_proj.weight)
    agree, total = _teacher_forced_agreement(dense, native, ("What is the capital of France?",
                                                             "Write a haiku about the sea.",
                                                             "Explain what a CPU does in two sentences."))
    print(f"{ftype}: teacher-forced top-1 {agree}/{total}")
    assert agree / total >= least, f"top-1 agreement {agree}/{total}"


def test_a_slow_gguf_load_shows_progress_and_a_quick_one_prints_nothing(default_gguf, monkeypatch):
    """Loading draws a bar on a terminal only once it has taken `PROGRESS_AFTER_S` (gguf-py's types
    take minutes on a 3.8B model); the default model's ~0.6 s load prints nothing."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    phi3.load(default_gguf)  # the native kernels compiled and cached, file pages warm
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    phi3.load(default_gguf)
    assert terminal.getvalue() == ""
    monkeypatch.setattr("phi3.gguf.PROGRESS_AFTER_S", 0.0)
    phi3.load(default_gguf)
    assert f"loading {default_gguf.name}" in terminal.getvalue() and "tensor" in terminal.getvalue()


@linux
def test_exporting_a_mapped_checkpoint_leaves_its_pages_behind(tmp_path):
    """`phi3 convert` of a bf16 checkpoint: its weights are memory-mapped and each is read once, so
    the export gives their pages back as it goes (without that, phi-3-mini's 7.6 GB all stayed
    resident); the model still computes the same logits afterwards (the pages map again)."""
    from phi3.checkpoint import load_hf_checkpoint, save_hf_checkpoint
    from phi3.gguf_export import write_gguf
    hf = scaled_down("phi-3-mini-4k-instruct", vocab=32064, head_dim=32)
    save_hf_checkpoint(random_phi3(hf, 0.02, torch.bfloat16), tmp_path / "ckpt", dtype="bfloat16")
    model = load_hf_checkpoint(tmp_path / "ckpt", "bfloat16")
    ids = torch.tensor([[1, 5, 9, 200]])
    before = model(ids)
    weights = [p for p in model.parameters() if p.dim() == 2]
    assert sum(float(p.detach().float().sum()) for p in weights)  # every page read
    assert sum(resident_pages(p) for p in weights) * 4096 > 0.9 * sum(p.nbytes for p in weights)
    write_gguf(model, None, tmp_path / "out.gguf", "q8_0")
    assert sum(resident_pages(p) for p in weights) * 4096 < 0.05 * sum(p.nbytes for p in weights)
    assert torch.equal(model(ids), before)


def test_a_loaded_gguf_writes_back_block_for_block(default_gguf, tmp_path):
    """The embedded SmolLM2 (Q4_1 linears, a Q8_0 table, llama layout: q/k rows unpermuted on load
    and permuted again on export) loaded as it is and written as q4_1: every tensor of the file comes
    back byte for byte."""
    lm = phi3.load(default_gguf)
    out = write_gguf(lm.model, lm.tokenizer, tmp_path / "back.gguf", "q4_1")
    source, back = read_gguf(default_gguf), read_gguf(out)
    assert set(source.tensors) == set(back.tensors)
    for name, t in source.tensors.items():
        u = back.tensors[name]
        assert u.qtype == t.qtype and np.asarray(u.raw).tobytes() == np.asarray(t.raw).tobytes(), name


def test_int4_groups_of_32_export_as_q4_1_unchanged(tmp_path):
    """`phi3 quantize --group-size 32` then `--type q4_1`: our int4 groups are Q4_1 blocks (fp16 scale
    and min), so the file holds exactly the quantized model's weights; as q4_0 they are requantized
    (Q4_0 has no min of its own) and differ."""
    from phi3.gguf_export import quantized_rows
    hf = scaled_down("phi-3-mini-4k-instruct", vocab=32064, head_dim=32)
    model = random_phi3(hf, 0.05)
    from phi3.quant import quantize_model
    quantize_model(model, bits=4, group_size=32)
    qkv = model.model.layers[0].self_attn.qkv_proj
    tok = Tokenizer.from_gguf(PHI3_VOCAB)
    for kind in ("q4_1", "q4_0"):
        f = read_gguf(write_gguf(model, tok, tmp_path / f"{kind}.gguf", kind))
        t = f.tensors["blk.0.attn_qkv.weight"]
        assert t.qtype == kind.upper()
        assert torch.equal(dequantize(t), qkv.dequantize()) == (kind == "q4_1")
    assert quantized_rows(qkv).ggml_blocks(QT.Q4_0) is None  # its mins are its own


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_quantized_rows_are_written_as_they_are(qtype):
    """Blocks the reference quantizer would not make (a scale below the block's range, as llama.cpp's
    importance-matrix search picks; levels anywhere) go out unchanged: dequantizing and requantizing
    them would change them."""
    from phi3.gguf_export import QuantizedRows, encode_tensor
    g = torch.Generator().manual_seed(0)
    scales = (torch.rand(16, 4, generator=g) * 0.01 + 1e-3).half()
    if qtype == QT.Q8_0:
        rows = QuantizedRows(8, torch.randint(-100, 100, (16, 128), generator=g, dtype=torch.int8), scales, None)
    else:
        mins = (scales.float() * -8).half() if qtype == QT.Q4_0 else (torch.randn(16, 4, generator=g) * 0.01).half()
        rows = QuantizedRows(4, torch.randint(0, 15, (16, 128), generator=g, dtype=torch.uint8), scales, mins)
    blocks = encode_tensor(rows, qtype)
    t = GGUFTensor("w", qtype.name, (16, 128), blocks)
    assert torch.equal(dequantize(t), rows.dequantize())
    assert not np.array_equal(TORCH_QUANTIZERS[qtype](rows.dequantize()), blocks)


def test_gguf_to_gguf_takes_the_tensors_from_the_source_file(default_gguf, tmp_path, monkeypatch):
    """`phi3 convert model.gguf out.gguf`: the model loads as it is (compact) and each tensor is taken
    from the source file — its bytes where the type stays (the Q8_0 table as q8_0), else dequantized
    exactly and encoded — giving the very file the old way gave (the whole model dequantized to fp32
    first: 15 GB for a 3.8B), which is the reference here."""
    import phi3.api
    import phi3.gguf_export as export
    from phi3.cli import main
    taken = []
    encode_original = export._encode_original
    monkeypatch.setattr(export, "_encode_original", lambda t, qtype: taken.append(t.name) or encode_original(t, qtype))
    out = tmp_path / "q8.gguf"
    loads, load = [], phi3.api.load
    monkeypatch.setattr(phi3.api, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    assert main(["convert", str(default_gguf), str(out), "--type", "q8_0"]) == 0
    assert sorted(taken) == sorted(read_gguf(default_gguf).tensors)  # every one from the file
    assert not loads  # so no weights were loaded: the model was built without them
    monkeypatch.undo()
    full = phi3.load(default_gguf, "float32", dequantize=True)
    reference = write_gguf(full.model, full.tokenizer, tmp_path / "ref.gguf", "q8_0", name=default_gguf.stem)
    got, ref = read_gguf(out), read_gguf(reference)
    assert got.metadata == ref.metadata and set(got.tensors) == set(ref.tensors)
    for name, t in ref.tensors.items():
        assert got.tensors[name].qtype == t.qtype
        assert np.asarray(got.tensors[name].raw).tobytes() == np.asarray(t.raw).tobytes(), name


def test_a_failed_write_is_a_clear_error_and_keeps_the_old_file(default_gguf, tmp_path, monkeypatch, capsys):
    """The disk filling up while `phi3 convert` / `phi3 quantize` write (seen in a benchmark run): one
    error line naming the file, no stack trace, and a file already at the destination is untouched."""
    from phi3.cli import main
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the previous file")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    assert main(["convert", str(default_gguf), str(out), "--type", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert "out.gguf" in err and "No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == b"the previous file" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]

    monkeypatch.setattr(phi3.safetensors_writer, "_check", disk_full)  # as a tensor's bytes are written
    assert main(["quantize", str(default_gguf), str(tmp_path / "q"), "--bits", "8"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "q" / "model.safetensors").exists()

"""The native whole-stack decode step (`phi3.decode_step`, `phi3_decode_layers` in C).

Three layers of proof: its two elementwise pieces (RMSNorm, SwiGLU) against float64 formulas; the
whole chain bit for bit against the same chain written in Python over the separately tested kernels
(quantized matmuls, fused decode attention); and whole models against the module path (the same
function with PyTorch's norms and SiLU: equal up to float rounding, which the int8 activation
rounding may amplify into a rare one-step flip) with GQA, partial rotary, a sliding window, LongRoPE
past the switch, left padding, int8 and biased linears."""

import pytest
import torch

from phi3 import cpu_kernels, decode_step
from phi3.config import ModelConfig
from phi3.generate import SamplingParams, generate_tokens
from phi3.models.phi3 import Cache, Phi3ForCausalLM
from phi3.layers import use_native_bf16
from phi3.quant import Int8Linear, quantize_model

from .conftest import scaled_down

lib = cpu_kernels.library()
pytestmark = pytest.mark.skipif(lib is None, reason="no AVX2/FMA/F16C CPU or no C compiler here")


def c_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.phi3_rms_norm(x.data_ptr(), w.contiguous().data_ptr(), eps, x.shape[0], x.shape[1], y.data_ptr())
    return y


def c_swiglu(gu: torch.Tensor) -> torch.Tensor:
    gu = gu.contiguous()
    out = torch.empty(gu.shape[0], gu.shape[1] // 2)
    lib.phi3_swiglu(gu.data_ptr(), gu.shape[0], gu.shape[1] // 2, out.data_ptr())
    return out


def test_rms_norm_matches_the_formula_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 3072) * torch.tensor([1e-3, 1.0, 300.0])[:, None]
    w = torch.randn(3072)
    ref = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)) * w.double()
    got = c_rms_norm(x, w, 1e-5)
    assert ((got.double() - ref).abs() / ref.abs().clamp(min=1e-3)).max() < 1e-6


def test_swiglu_matches_the_formula_in_float64_without_overflow():
    torch.manual_seed(0)
    gate = torch.cat((torch.randn(2, 1016) * 4, torch.tensor([[-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 100.0, 1e4]] * 2)), 1)
    up = torch.randn(2, 1024)
    got = c_swiglu(torch.cat((gate, up), 1))
    g = gate.double()
    ref = up.double() * g * torch.sigmoid(g)
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all()


def quantized(preset: str, bits: int = 4, **kw) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(scaled_down(preset, vocab=256, **kw))
    model = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms initialise to ones: make each its own
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return quantize_model(model, bits=bits, group_size=32)


def mixed_model() -> Phi3ForCausalLM:
    """int4 layers, one int8 per-channel MLP projection and one int8 projection with a bias."""
    model = quantized("phi-3-medium-4k-instruct")
    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    mlp.down_proj = Int8Linear.quantize(mlp.down_proj.dequantize())
    attn.o_proj = Int8Linear.quantize(attn.o_proj.dequantize(), bias=torch.randn(attn.o_proj.out_features) * 0.1)
    return model


def python_chain(model, cache, x, cos, sin, mask, start):
    """The chain `phi3_decode_layers` computes, one kernel call at a time from Python."""
    cfg = model.config
    b = x.shape[0]
    x = x.reshape(b, -1).clone()
    for layer, kv in zip(model.model.layers, cache.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = c_rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        qkv = attn.qkv_proj(h)
        att = cpu_kernels.decode_attend_f16(lib, qkv[:, None], cos, sin, kv.k, kv.v, start, mask,
                                            cfg.num_attention_heads, cfg.num_key_value_heads)
        x = x + attn.o_proj(att[:, 0])
        h = c_rms_norm(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        x = x + mlp.down_proj(c_swiglu(mlp.gate_up_proj(h)))
    return x[:, None]


@pytest.mark.parametrize("make", [lambda: quantized("phi-3-mini-4k-instruct"),
                                  lambda: quantized("phi-4-mini-instruct", bits=8), mixed_model],
                         ids=["int4-mini", "int8-phi4-partial-rotary", "mixed-gqa-bias"])
def test_native_chain_is_bit_identical_to_the_same_chain_from_python(make):
    model = make()
    cfg = model.config
    b, prompt = 2, 12
    ids = torch.randint(0, 256, (b, prompt + 1))
    pos = torch.arange(prompt + 1).expand(b, -1).clone()
    pos[1, :3] = -1
    pos[1, 3:] -= 3
    caches = [Cache(model, b, 32), Cache(model, b, 32)]
    with torch.no_grad():
        for c in caches:
            model(ids[:, :prompt], pos[:, :prompt], c)
        x = model.model.embed_tokens(ids[:, prompt:])
        cos, sin = model.rotary(pos[:, prompt:].clamp(min=0), prompt + 1, x.dtype)
        mask = torch.ones(b, 1, 1, prompt + 1, dtype=torch.bool)
        mask[1, ..., :3] = False
        for c in caches:
            c.record_positions(pos[:, prompt:])
        step = decode_step.build(model, caches[0])
        assert step is not None
        native = step(x, cos, sin, mask, prompt)
        ref = python_chain(model, caches[1], x, cos, sin, mask, prompt)
    assert torch.equal(native, ref)
    for a, r in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.k, r.k) and torch.equal(a.v, r.v)
    assert cfg.num_hidden_layers == 2


def decode_logits(model, ids, pos, prompt: int, steps: int, native: bool, monkeypatch):
    monkeypatch.setenv("PHI3_DECODE_STEP", "1" if native else "0")
    calls = []
    real = decode_step.DecodeStep.__call__
    monkeypatch.setattr(decode_step.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    cache = Cache(model, ids.shape[0], prompt + steps)
    with torch.no_grad():
        out = [model(ids[:, :prompt], pos[:, :prompt], cache, seq_len=prompt)[:, -1:]]
        for i in range(prompt, prompt + steps - 1):
            out.append(model(ids[:, i:i + 1], pos[:, i:i + 1], cache, seq_len=i + 1))
    monkeypatch.undo()
    return torch.cat(out, 1), len(calls)


@pytest.mark.parametrize("make,length", [
    (lambda: quantized("phi-3-mini-4k-instruct"), 24),  # sliding window 15 of the scaled-down 4K model
    (lambda: quantized("phi-3-mini-128k-instruct"), 40),  # LongRoPE factors switch at 32 tokens
    (lambda: quantized("phi-4-mini-instruct", bits=8), 24),  # partial rotary, int8
    (mixed_model, 24),  # GQA, int8 per channel, a bias
], ids=["window", "longrope", "partial-rotary-int8", "mixed"])
def test_models_decode_as_on_the_module_path(make, length, monkeypatch):
    model = make()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, length))
    pos = torch.arange(length).expand(2, -1).clone()
    pos[1, :5] = -1  # row 1 left-padded
    pos[1, 5:] -= 5
    prompt = 10
    native, n_native = decode_logits(model, ids, pos, prompt, length - prompt, True, monkeypatch)
    plain, n_plain = decode_logits(model, ids, pos, prompt, length - prompt, False, monkeypatch)
    assert n_native == length - prompt - 1 and n_plain == 0
    diff = (native - plain).abs()
    assert diff.max() < 0.02 * plain.std() and diff.mean() < 1e-3 * plain.std()
    assert (native.argmax(-1) == plain.argmax(-1)).float().mean() > 0.95


def test_the_generator_uses_it_and_gives_the_module_paths_tokens(monkeypatch):
    model = quantized("phi-3-mini-128k-instruct")
    prompt = torch.randint(3, 256, (8,)).tolist()

    def tokens(native: bool):
        monkeypatch.setenv("PHI3_DECODE_STEP", "1" if native else "0")
        return [t[0] for t in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=30))]

    calls = []
    real = decode_step.DecodeStep.__call__
    monkeypatch.setattr(decode_step.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    native = tokens(True)
    assert len(calls) == 29 - 1  # every decode step but the recomputation at the LongRoPE switch (token 33)
    assert native == tokens(False)


def test_the_step_does_not_read_slots_behind_the_sliding_window(monkeypatch):
    """Past the window, each step hands the kernel the first slot its token can see (`lo`), so the
    keys the window has left behind are not read (what the kernel does with `lo`:
    test_cpu_kernels.py); the tokens are the module path's."""
    model = quantized("phi-3-mini-4k-instruct")
    w = model.config.sliding_window
    prompt = torch.randint(3, 256, (10,)).tolist()
    los = []
    real = lib.phi3_decode_layers
    monkeypatch.setattr(lib, "phi3_decode_layers", lambda *a: los.append(a[15]) or real(*a))
    params = SamplingParams(max_new_tokens=model.config.max_position_embeddings - len(prompt))  # the whole context
    native = [t[0] for t in generate_tokens(model, [prompt], params)]
    monkeypatch.undo()
    # the decode step of the token at position (= slot) p sees slots p - w + 1 .. p
    assert los == [max(0, p - w + 1) for p in range(len(prompt), len(prompt) + params.max_new_tokens - 1)]
    assert max(los) > 0 and len(native) == params.max_new_tokens
    monkeypatch.setenv("PHI3_DECODE_STEP", "0")
    assert native == [t[0] for t in generate_tokens(model, [prompt], params)]


def test_it_declines_what_it_does_not_compute():
    cfg = ModelConfig.from_hf_dict(scaled_down("phi-3-mini-4k-instruct", vocab=256))
    dense = Phi3ForCausalLM(cfg).eval()
    assert decode_step.build(dense, Cache(dense, 1, 8)) is None  # fp32 linears (exactly the reference)
    dense.to(torch.bfloat16)
    assert decode_step.build(dense, Cache(dense, 1, 8)) is None  # bf16 on PyTorch's matmul (no `Bf16Linear`)
    use_native_bf16(dense)
    assert decode_step.build(dense, Cache(dense, 1, 8)) is not None
    assert decode_step.build(dense, Cache(dense, 1, 8, dtype=torch.float32)) is None  # fp32 KV cache
    model = quantized("phi-3-mini-4k-instruct")
    assert decode_step.build(model, Cache(model, 1, 8, dtype=torch.float32)) is None  # fp32 KV cache
    assert decode_step.build(model, Cache(model, 1, 8)) is not None


def test_a_bf16_model_decodes_natively_closer_to_fp32_than_its_module_path(monkeypatch):
    """A bf16 model (`Bf16Linear`s, bf16 cache) takes the native step too; inside it the residual
    stream stays fp32, where the module path rounds it to bf16 after every operation. Against the
    same weights in fp32 (module path, fp32 cache) its logits are closer than the module path's, and
    its greedy choices agree with fp32's."""
    import copy

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(scaled_down("phi-3-mini-4k-instruct", vocab=256))
    ref = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            p.copy_(p.bfloat16().float())  # the same values in both models
    model = copy.deepcopy(ref).to(torch.bfloat16)
    assert use_native_bf16(model) > 0
    torch.manual_seed(1)
    length, prompt = 24, 10
    ids = torch.randint(0, 256, (2, length))
    pos = torch.arange(length).expand(2, -1).clone()
    pos[1, :5] = -1  # row 1 left-padded
    pos[1, 5:] -= 5
    native, n_native = decode_logits(model, ids, pos, prompt, length - prompt, True, monkeypatch)
    plain, n_plain = decode_logits(model, ids, pos, prompt, length - prompt, False, monkeypatch)
    exact, _ = decode_logits(ref, ids, pos, prompt, length - prompt, False, monkeypatch)
    assert n_native == length - prompt - 1 and n_plain == 0
    steps = slice(1, None)  # the first position is the (shared) prefill's
    err_native = (native[:, steps].float() - exact[:, steps]).abs().mean()
    err_plain = (plain[:, steps].float() - exact[:, steps]).abs().mean()
    print(f"mean |logit - fp32|: native {err_native:.5f}, module path {err_plain:.5f}")
    assert err_native < err_plain, (err_native, err_plain)
    assert (native.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_a_quantized_model_with_bf16_activations_takes_the_step_too(monkeypatch):
    """`phi3.load(int4_dir, dtype="bfloat16")`: int4 linears beside bf16 norms and activations (fp16
    cache). The step computes in fp32 inside, the module path in bf16 between the kernels; their
    greedy choices agree."""
    model = quantized("phi-3-mini-4k-instruct").to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 24))
    pos = torch.arange(24)[None]
    native, n_native = decode_logits(model, ids, pos, 10, 14, True, monkeypatch)
    plain, n_plain = decode_logits(model, ids, pos, 10, 14, False, monkeypatch)
    assert n_native == 13 and n_plain == 0 and native.dtype == torch.bfloat16
    assert (native.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9


def test_a_step_is_reused_only_over_the_same_modules_and_buffers():
    """The server builds a new view of its slot rows each step: over the same k, v buffers and the
    same modules the model's last step is reused; another cache, or a swapped module, gets a new one."""
    from types import SimpleNamespace

    model = quantized("phi-3-mini-4k-instruct")
    cache = Cache(model, 2, 16)
    first = decode_step.for_cache(model, cache)
    assert first is not None
    assert decode_step.for_cache(model, SimpleNamespace(layers=cache.layers)) is first  # a new view, same buffers
    rows = SimpleNamespace(layers=[SimpleNamespace(k=kv.k[:1], v=kv.v[:1]) for kv in cache.layers])
    assert decode_step.for_cache(model, rows) is not first  # other rows: other shapes
    other = Cache(model, 2, 16)
    before = decode_step.for_cache(model, other)
    assert before is not first  # other buffers
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Int8Linear.quantize(mlp.down_proj.dequantize())
    swapped = decode_step.for_cache(model, SimpleNamespace(layers=other.layers))
    assert swapped is not None and swapped is not before and mlp.down_proj in swapped.parts

"""The native AVX2 int4/int8 kernels against a plain emulation of what they compute, and the layouts."""

import pytest
import torch

from phi3 import cpu_kernels
from phi3.quant import Int4Linear, Int8Linear

lib = cpu_kernels.library()
needs_native = pytest.mark.skipif(lib is None, reason="no AVX2/FMA/F16C CPU or no C compiler here")


def quantized_activations(x: torch.Tensor, block: int, levels: int = 1) -> torch.Tensor:
    """What the kernels do to x [m, k], as llama.cpp's Q8_0: int8 per block of `block`,
    q = round(x·127/amax), scale d = amax/127 rounded to fp16; with `levels` 2 the rounding error
    is quantized again, q2 = round((x − q·d)·200/d) (x ≈ d·(q + q2/200)). Returned dequantized in
    float64. The kernels must equal this times the dequantized weights: in particular the min term
    of int4 uses the same rounded activations, so that with Q4_0's min = −8·scale the two terms
    cancel as in the dequantized product."""
    m, k = x.shape
    xb = x.view(m, k // block, block)
    amax = xb.abs().amax(-1)
    q = torch.round(xb * (torch.full_like(amax, 127.0) / amax)[..., None])  # (127 / amax is 127 · 1/amax)
    d = (amax / 127).half().float()
    out = q.double() * d.double()[..., None]
    if levels == 2:
        q2 = torch.round((xb - q * d[..., None]) * (torch.full_like(d, 200.0) / d)[..., None]).clamp(-127, 127)
        out = d.double()[..., None] * (q.double() + q2.double() / 200)
    return out.view(m, k)


def test_native_kernels_are_built_on_this_ci_machine():
    """CI runs on x86-64 with gcc: the fast path must really be in use there."""
    import platform
    import shutil
    if platform.machine() == "x86_64" and shutil.which("cc") and "avx2" in open("/proc/cpuinfo").read():
        assert lib is not None


@needs_native
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n,k,group,m", [(40, 64, 32, 1), (37, 128, 64, 5), (64, 256, 128, 7), (24, 256, 256, 4)])
def test_int4_kernel_equals_emulation(n, k, group, m, levels, monkeypatch):
    monkeypatch.setenv("PHI3_ACTIVATION_LEVELS", str(levels))
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g).half()
    mins = torch.randn(n, k // group, generator=g).half() if n % 2 else (-8 * scales.float()).half()  # Q4_0
    x = torch.randn(m, k, generator=g) * (1 + 20 * (torch.rand(m, k, generator=g) > 0.98))  # outliers
    q4_0 = cpu_kernels.is_q4_0(scales, mins)
    assert q4_0 == (n % 2 == 0)
    packed = cpu_kernels.pack_int4(q, scales, None if q4_0 else mins, group)  # Q4_0: the scale-only layout
    assert packed.shape == (-(-n // 8), k // group, (16 if q4_0 else 32) + 4 * group)
    from phi3.quant import pack_nibbles
    assert torch.equal(cpu_kernels.pack_int4_nibbles(lib, pack_nibbles(q), scales, None if q4_0 else mins, group),
                       packed)
    q2, s2, m2 = cpu_kernels.unpack_int4(packed, n, k, group)
    assert torch.equal(q2.long(), q) and torch.equal(s2, scales) and torch.equal(m2, mins)

    w = q.double().view(n, k // group, group) * scales.double()[..., None] + mins.double()[..., None]
    expected = quantized_activations(x, group, levels) @ w.view(n, k).T
    got = cpu_kernels.int4_matmul(lib, x, packed, n, group)
    assert got.shape == (m, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())
    if q4_0 and levels == 1:
        # the scale-only layout sums (q − 8)·x in integers (as llama.cpp); the general layout adds
        # min·Σx apart, two float terms that nearly cancel: the first is the more exact
        general = cpu_kernels.int4_matmul(lib, x, cpu_kernels.pack_int4(q, scales, mins, group), n, group)
        assert (got.double() - expected).abs().max() <= (general.double() - expected).abs().max()


def test_kernel_isa_choice(monkeypatch):
    flags = cpu_kernels._cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        assert cpu_kernels.kernel_isa() is None
        return
    vnni = {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
    assert cpu_kernels.kernel_isa() == ("vnni" if vnni else "avx2")
    monkeypatch.setenv("PHI3_KERNEL_ISA", "avx2")
    assert cpu_kernels.kernel_isa() == "avx2"
    monkeypatch.setenv("PHI3_KERNEL_ISA", "sse9")
    from phi3.errors import Phi3Error
    with pytest.raises(Phi3Error, match="PHI3_KERNEL_ISA='sse9'"):
        cpu_kernels.kernel_isa()


has_vnni = {"avx512_vnni", "avx512vl", "avx512bw"} <= cpu_kernels._cpu_flags()


@needs_native
@pytest.mark.skipif(not has_vnni, reason="this CPU has no AVX-512 VNNI: only the AVX2 build runs here")
@pytest.mark.parametrize("levels", [1, 2])
def test_vnni_build_gives_the_avx2_builds_numbers_exactly(levels, monkeypatch):
    """The VNNI build sums the same integers with vpdpbusd: identical outputs, bit for bit, for int4
    (Q4_0 scale-only and scale+min layouts) and int8 (grouped and per-channel), one and two
    activation levels, extreme weights (q 0/15, int8 −128) and activations (outliers) included, at every
    token count the kernels tile differently (1..9)."""
    monkeypatch.setenv("PHI3_ACTIVATION_LEVELS", str(levels))
    builds = [cpu_kernels.load_build("avx2"), cpu_kernels.load_build("vnni")]
    assert all(b is not None for b in builds)
    g = torch.Generator().manual_seed(levels)
    n, k, group = 72, 256, 64
    q4 = torch.randint(0, 16, (n, k), generator=g)
    q4[0] = 15
    scales = torch.rand(n, k // group, generator=g).half()
    q8 = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    q8[1] = -128
    row_scales = cpu_kernels.pad_rows(torch.rand(n, generator=g))
    weights = [(cpu_kernels.pack_int4(q4, scales, None, group), "int4"),
               (cpu_kernels.pack_int4(q4, scales, torch.randn(n, k // group, generator=g).half(), group), "int4"),
               (cpu_kernels.pack_int8(q8, scales, group), "int8 grouped"),
               (cpu_kernels.pack_int8(q8, None, cpu_kernels.INT8_BLOCK), "int8")]
    for m in range(1, 10):
        x = torch.randn(m, k, generator=g) * (1 + 30 * (torch.rand(m, k, generator=g) > 0.97))
        for packed, kind in weights:
            if kind == "int4":
                outs = [cpu_kernels.int4_matmul(b, x, packed, n, group) for b in builds]
            else:
                block = group if kind == "int8 grouped" else cpu_kernels.INT8_BLOCK
                outs = [cpu_kernels.int8_matmul(b, x, packed, n, block, None if kind == "int8 grouped" else row_scales)
                        for b in builds]
            assert torch.equal(outs[0], outs[1]), (kind, m)


@needs_native
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n,k,group,m", [(40, 64, 32, 1), (37, 128, None, 5), (64, 96, 32, 6), (16, 64, None, 9)])
def test_int8_kernel_equals_emulation(n, k, group, m, levels, monkeypatch):
    monkeypatch.setenv("PHI3_ACTIVATION_LEVELS", str(levels))
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)  # −128 included: |w| must not overflow
    block = cpu_kernels.int8_block(k, group)
    scales = torch.rand(n, k // block, generator=g).half() if group else None
    row_scales = None if group else torch.rand(n, generator=g)
    packed = cpu_kernels.pack_int8(q, scales, block)
    assert torch.equal(cpu_kernels.pack_int8_native(lib, q, scales, block), packed)  # the C packer, same bytes
    q2, s2 = cpu_kernels.unpack_int8(packed, n, k, block, grouped=group is not None)
    assert torch.equal(q2, q) and (s2 is None if group is None else torch.equal(s2, scales))

    x = torch.randn(m, k, generator=g)
    w_scales = scales.double() if group else row_scales.double()[:, None].expand(n, k // block)
    w = q.double().view(n, k // block, block) * w_scales[..., None]
    expected = quantized_activations(x, block, levels) @ w.view(n, k).T
    got = cpu_kernels.int8_matmul(lib, x, packed, n, block,
                                  None if group else cpu_kernels.pad_rows(row_scales))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native" and lib is None:
        pytest.skip("no native kernels on this machine")
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("kind", ["int4-g32", "int4-g128", "int8", "q8_0"])
def test_both_backends_agree_with_dequantized_weights_and_round_trip(backend, kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(80, 256, generator=g)
    if kind.startswith("int4"):
        layer = Int4Linear.quantize(w, int(kind[6:]), bias=torch.randn(80, generator=g))
    elif kind == "int8":
        layer = Int8Linear.quantize(w)
    else:
        layer = Int8Linear(torch.randint(-128, 128, (80, 256), generator=g).to(torch.int8),
                           torch.rand(80, 8, generator=g).half())
    assert (layer._lib is not None) == (backend == "native")
    x = torch.randn(3, 4, 256, generator=g)
    expected = x @ layer.dequantize().T + (0 if layer.bias is None else layer.bias)
    got = layer(x)
    assert got.shape == (3, 4, 80) and got.dtype == x.dtype
    # both backends round the activations (bf16 for torch's kernels, int8 blocks for ours)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    stored = layer.stored()
    again = type(layer).from_stored(stored, getattr(layer, "group_size", None))
    assert stored.keys() == again.stored().keys()
    assert all(torch.equal(stored[k], again.stored()[k]) for k in stored)


def llama_cpp_attention(q, k, v, mask):
    """What the fp16-cache kernel computes, as llama.cpp does over its fp16 cache: the query rounded to
    fp16 against the fp16 keys, softmax in fp32, the weights rounded to fp16 against the fp16 values
    (products and sums in fp32). q [B, H, 1, D], k, v fp16 [B, KV, S, D], mask [B, 1, 1, S] or None."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.half().float() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, 1, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).half().float() @ v


@needs_native
@pytest.mark.parametrize("b,h,kv,s,d", [(1, 4, 4, 37, 32), (3, 8, 2, 70, 96), (2, 6, 3, 1, 64)])
def test_fp16_decode_attention_equals_its_definition(b, h, kv, s, d):
    """One query over the first s slots of an fp16 cache of 80 slots, GQA, per-row masks (padding,
    a sliding window), against `llama_cpp_attention` written with tensor ops, and within fp16
    rounding of SDPA on the same fp16 values upcast."""
    import torch.nn.functional as F
    from phi3.layers import attention
    g = torch.Generator().manual_seed(s)
    cache_k = torch.randn(b, kv, 80, d, generator=g).half()
    cache_v = torch.randn(b, kv, 80, d, generator=g).half()
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]
    q = torch.randn(b, h, 1, d, generator=g)
    mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
    mask[..., -1] = True  # the token itself is always visible
    assert cpu_kernels.can_attend_cache(q, k, v)
    for m in (mask, None):
        got = attention(q, k, v, m)
        torch.testing.assert_close(got, llama_cpp_attention(q, k, v, m), rtol=1e-5, atol=1e-5)
        exact = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=m, enable_gqa=h != kv)
        torch.testing.assert_close(got, exact, rtol=0, atol=4e-3)


def test_quantized_models_keep_an_fp16_cache_and_decode_like_a_fresh_forward():
    """The KV cache of a quantized model is fp16 where the native kernels run (as llama.cpp); greedy
    decoding through it matches recomputing the whole sequence with fp16-rounded k and v."""
    from phi3.config import ModelConfig
    from phi3.generate import SamplingParams, generate_tokens
    from phi3.layers import kv_cache_dtype
    from phi3.models.phi3 import Phi3ForCausalLM
    from phi3.quant import quantize_model

    from .conftest import scaled_down
    torch.manual_seed(0)
    model = Phi3ForCausalLM(ModelConfig.from_hf_dict(scaled_down("phi-3-mini-4k-instruct", vocab=256)))
    assert kv_cache_dtype(model) == torch.float32  # full precision stays exact
    quantize_model(model, bits=4, group_size=32)
    assert kv_cache_dtype(model) == (torch.float16 if lib is not None else torch.float32)
    prompt = [5, 17, 99, 3, 42, 7]
    out = [s[0] for s in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0),
                                         frozenset())]
    assert len(out) == 12
    # the same greedy tokens when every step recomputes the sequence from scratch (fresh cache each time)
    seq = list(prompt)
    for _ in range(12):
        step = next(iter(generate_tokens(model, [seq], SamplingParams(max_new_tokens=1, temperature=0.0),
                                         frozenset())))
        seq.append(step[0])
    assert seq[len(prompt):] == out


@needs_native
@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", "phi-3-medium-4k-instruct", "phi-4-mini-instruct"])
def test_fused_decode_attention_is_bit_identical_to_the_unfused_path(preset, monkeypatch):
    """A quantized model's decode step runs RoPE, the fp16 cache write and attention in one native
    call (`decode_attend_f16`); it gives exactly the unfused path's logits and cache, with GQA (medium),
    partial rotary (phi-4-mini) and left-padded rows of different lengths (a per-row mask)."""
    from phi3.config import ModelConfig
    from phi3.models.phi3 import Cache, Phi3ForCausalLM
    from phi3.quant import quantize_model

    from .conftest import scaled_down
    torch.manual_seed(0)
    model = quantize_model(Phi3ForCausalLM(ModelConfig.from_hf_dict(scaled_down(preset, vocab=256))).eval(),
                           bits=4, group_size=32)
    ids = torch.randint(0, 256, (2, 30))
    pos = torch.arange(30).expand(2, 30).clone()
    pos[1, :4] = -1  # row 1: 4 slots of left padding
    pos[1, 4:] -= 4

    def decode(fused: bool):
        monkeypatch.setenv("PHI3_DECODE_STEP", "0")  # the per-layer path (the whole-stack step: test_decode_step.py)
        calls = []
        real = cpu_kernels.decode_attend_f16
        monkeypatch.setattr(cpu_kernels, "decode_attend_f16", lambda *a: calls.append(1) or real(*a))
        if not fused:
            monkeypatch.setattr(cpu_kernels, "can_decode_attend_f16", lambda *a: False)
        cache = Cache(model, 2, 40)
        with torch.no_grad():
            model(ids[:, :20], pos[:, :20], cache, seq_len=20)
            logits = [model(ids[:, i:i + 1], pos[:, i:i + 1], cache, seq_len=i + 1) for i in range(20, 30)]
        monkeypatch.undo()
        return torch.cat(logits, 1), cache, len(calls)

    fused, fused_cache, n_fused = decode(True)
    plain, plain_cache, n_plain = decode(False)
    assert n_fused == 10 * model.config.num_hidden_layers and n_plain == 0
    assert torch.equal(fused, plain)
    for a, b in zip(fused_cache.layers, plain_cache.layers):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@needs_native
def test_fused_decode_attention_does_not_read_slots_before_lo():
    """`lo`: the slots before it are visible to no row (a sliding window has passed them). The kernel
    must not read them: here they hold other keys and values and `valid` marks them visible, and the
    result is still attention over slots lo .. S-1 alone."""
    b, h, kv, d, L, start, lo = 2, 8, 2, 32, 64, 40, 25
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, 1, (h + 2 * kv) * d, generator=g)
    cos, sin = torch.ones(1, 1, 1, d), torch.zeros(1, 1, 1, d)  # position 0: no rotation
    k, v = torch.randn(b, kv, L, d, generator=g).half(), torch.randn(b, kv, L, d, generator=g).half()
    visible = torch.ones(b, 1, 1, start + 1, dtype=torch.bool)
    outs = []
    for fill in (0.0, 100.0):
        kc, vc = k.clone(), v.clone()
        kc[:, :, :lo], vc[:, :, :lo] = fill, fill
        outs.append(cpu_kernels.decode_attend_f16(lib, qkv, cos, sin, kc, vc, start, visible, h, kv, lo))
    window = visible.clone()
    window[..., :lo] = False
    expected = cpu_kernels.decode_attend_f16(lib, qkv, cos, sin, k.clone(), v.clone(), start, window, h, kv)
    for out in outs:  # the same keys, summed in another order (the 8-key blocks start at lo)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("n,k", [(37, 64), (80, 259), (5, 44), (8, 3072)])
def test_bf16_kernel_equals_float64_product(n, k):
    """Dense bf16 weights, 1..3 tokens (the decode sizes): fp32 sums of the exact bf16 values, so
    within fp32 rounding of the float64 product; row and column tails (n % 4, k % 8) included."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g).bfloat16()
    for m in (1, 2, 3, 7):
        x = torch.randn(m, k, generator=g)
        got = cpu_kernels.bf16_matmul(lib, x, w)
        exact = x.double() @ w.double().T
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_native
def test_bf16_models_decode_on_the_native_kernel(monkeypatch):
    """A bf16 model built by the loader has `Bf16Linear`s (same parameters and state dict, tied
    head still tied); its decode steps call the kernel, its prefill and anything under autograd do
    not, and greedy decoding gives the tokens of the plain `nn.Linear` path."""
    from torch import nn

    from phi3.checkpoint import build_model
    from phi3.config import ModelConfig
    from phi3.generate import SamplingParams, generate_tokens
    from phi3.layers import Bf16Linear
    from phi3.models.phi3 import Phi3ForCausalLM

    from .conftest import scaled_down
    cfg = ModelConfig.from_hf_dict(scaled_down("phi-3-mini-4k-instruct", vocab=256))
    torch.manual_seed(0)
    sd = Phi3ForCausalLM(cfg).state_dict()
    model = build_model(cfg, dict(sd), torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is Bf16Linear for m in linears)
    assert model.state_dict().keys() == sd.keys()

    # the module path (the whole-stack native step, which also runs bf16 models: tests/test_decode_step.py)
    monkeypatch.setenv("PHI3_DECODE_STEP", "0")
    calls = []
    real = cpu_kernels.bf16_matmul
    monkeypatch.setattr(cpu_kernels, "bf16_matmul", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    prompt = [5, 17, 99, 3, 42, 7]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    native = [s[0] for s in generate_tokens(model, [prompt], params)]
    assert calls and set(calls) == {1}  # one row at a time: the 6-token prefill took nn.Linear
    n_decode_calls = len(calls)
    # 9 steps after the prefill, 4 linears a layer + the head; + the prefill's head (last position only)
    assert n_decode_calls == 9 * (4 * cfg.num_hidden_layers + 1) + 1

    monkeypatch.setattr(cpu_kernels, "BF16_MAX_ROWS", 0)  # everything on nn.Linear
    plain = [s[0] for s in generate_tokens(model, [prompt], params)]
    assert len(calls) == n_decode_calls and native == plain

    monkeypatch.setattr(cpu_kernels, "BF16_MAX_ROWS", 3)
    x = torch.randn(1, 1, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    model.model.layers[0].mlp.gate_up_proj(x).sum().backward()  # autograd: nn.Linear's path
    assert len(calls) == n_decode_calls and x.grad is not None


@needs_native
@pytest.mark.parametrize("b,h,kv,s,d", [(1, 4, 4, 37, 32), (3, 8, 2, 70, 96)])
def test_bf16_cache_decode_attention_equals_float64(b, h, kv, s, d):
    """One bf16 query over the first s slots of a bf16 cache (a bf16 model's decode) takes the native
    kernel and equals softmax attention in float64 on the same bf16 values, up to the output's bf16
    rounding; with autograd on q it takes SDPA."""
    from phi3.layers import attention
    g = torch.Generator().manual_seed(s)
    cache_k = torch.randn(b, kv, 80, d, generator=g).bfloat16()
    cache_v = torch.randn(b, kv, 80, d, generator=g).bfloat16()
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]
    q = torch.randn(b, h, 1, d, generator=g).bfloat16()
    mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
    mask[..., -1] = True
    assert cpu_kernels.can_attend_cache(q, k, v)
    kernel = cpu_kernels.attend_cache(lib, q, k, v, mask)  # fp32, before the output's rounding
    group = h // kv
    kd, vd = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ kd.transpose(-1, -2) * d ** -0.5).masked_fill(~mask, float("-inf"))
    exact = scores.softmax(-1) @ vd
    torch.testing.assert_close(kernel.double(), exact, rtol=0, atol=1e-5)
    got = attention(q, k, v, mask)
    assert got.dtype == torch.bfloat16 and torch.equal(got, kernel.bfloat16())
    qg = q.clone().requires_grad_()
    via_sdpa = attention(qg, k, v, mask)
    via_sdpa.float().sum().backward()
    assert qg.grad is not None
    torch.testing.assert_close(via_sdpa.double(), exact, rtol=0, atol=2e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_quantizers_give_the_tensor_ops_bytes(dtype):
    """`phi3_quantize_int4` / `phi3_quantize_int8_rows` against `quant.quantize_int4` /
    `quantize_int8_rows` (the PyTorch references): without refinement the same bytes; with it the same
    fit but for the order of the float sums (a level or an fp16 scale may move by one step, rarely);
    per-channel int8 the same bytes, also for rows that are not a multiple of 8 long."""
    from phi3.quant import pack_nibbles, quantize_int4, quantize_int8_rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 512, generator=g) * torch.rand(72, 1, generator=g) * 0.1
    w[3, :128] = 0.25  # flat groups: the range is zero
    w[5, 64:96] *= 1000  # a group far from the others
    w = w.to(dtype)
    for group in (32, 64, 128):
        q, s, m = quantize_int4(w, group)
        assert all(torch.equal(a, b) for a, b in zip(cpu_kernels.quantize_int4(lib, w, group), (pack_nibbles(q), s, m)))
        q, s, m = quantize_int4(w, group, refine=2)
        qn, sn, mn = cpu_kernels.quantize_int4(lib, w, group, 2)
        assert (qn != pack_nibbles(q)).float().mean() < 1e-3
        assert (sn != s).float().mean() < 0.01 and (mn != m).float().mean() < 0.01
        back = (pack_nibbles(q), s, m), (qn, sn, mn)
        err = [(_dequantize_nibbles(*parts, group) - w.float()).norm() for parts in back]
        assert abs(err[1] / err[0] - 1) < 1e-3
    for k in (512, 300):
        assert all(torch.equal(a, b) for a, b in zip(cpu_kernels.quantize_int8_rows(lib, w[:, :k]),
                                                     quantize_int8_rows(w[:, :k])))


@needs_native
@pytest.mark.parametrize("qtype", list(cpu_kernels.DEQUANT_TYPES))
def test_c_quantizers_read_gguf_blocks_as_their_weights(qtype):
    """A GGUF tensor handed to the C quantizers as blocks (`GGMLRows`, dequantized a row at a time)
    gives the bytes its dequantized float weight gives: every quantizer, every type dequantized in C."""
    from phi3.gguf import GGUFTensor, dequantize
    from tests.test_gguf import _raw_for
    shape = (24, 512)
    raw = _raw_for(qtype, shape)
    w = dequantize(GGUFTensor("t", qtype, shape, raw))
    rows = cpu_kernels.GGMLRows(torch.from_numpy(raw.copy()).view(shape[0], -1), qtype, shape)
    for out in cpu_kernels.GGML_QUANTIZERS:
        assert torch.equal(cpu_kernels.quantize_ggml(lib, rows, out), cpu_kernels.quantize_ggml(lib, w, out)), out
    for a, b in zip(cpu_kernels.quantize_int4(lib, rows, 64, 2), cpu_kernels.quantize_int4(lib, w, 64, 2)):
        assert torch.equal(a, b)
    for a, b in zip(cpu_kernels.quantize_int8_rows(lib, rows), cpu_kernels.quantize_int8_rows(lib, w)):
        assert torch.equal(a, b)


def _dequantize_nibbles(qweight, scales, mins, group):
    from phi3.quant import unpack_nibbles
    n = qweight.shape[0]
    q = unpack_nibbles(qweight, torch.float32).view(n, -1, group)
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, -1)


@needs_native
@pytest.mark.parametrize("n,k,group", [(37, 128, 32), (64, 256, 64), (21, 256, 128)])
@pytest.mark.parametrize("q4_0", [False, True])
def test_c_unpackers_invert_the_packers(n, k, group, q4_0):
    """`unpack_int4_nibbles` / `unpack_int8_native` (what saving a quantized model runs) give back what
    was packed, as the tensor-op `unpack_int4` / `unpack_int8` do; padding rows are dropped."""
    from phi3.quant import pack_nibbles
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // group, generator=g).half()
    mins = (-8 * scales.float()).half() if q4_0 else torch.randn(n, k // group, generator=g).half()
    packed = cpu_kernels.pack_int4(q, scales, None if q4_0 else mins, group)
    got = cpu_kernels.unpack_int4_nibbles(lib, packed, n, k, group)
    assert all(torch.equal(a, b) for a, b in zip(got, (pack_nibbles(q), scales, mins)))
    q8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    for grouped in (False, True):
        packed = cpu_kernels.pack_int8(q8, scales if grouped else None, group)
        q2, s2 = cpu_kernels.unpack_int8_native(lib, packed, n, k, group, grouped)
        assert torch.equal(q2, q8) and (torch.equal(s2, scales) if grouped else s2 is None)
        ref = cpu_kernels.unpack_int8(packed, n, k, group, grouped)
        assert torch.equal(ref[0], q2)
